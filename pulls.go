package ollamaflow

// Required-model pulls (required_models): each server pulls, one or a few
// at a time, the models its frontends require and it lacks, retrying with
// backoff and giving up on a stalled pull.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"time"

	"github.com/tidwall/gjson"
	"go.uber.org/zap"
)

// requiredModel is one of a frontend's required_models.
type requiredModel struct {
	name     string // as configured: the name pulled
	key      string // normalised
	insecure bool
}

// pullState is the progress of one pull of a required model, kept for the
// admin API and for routing (a model only being pulled answers 503).
type pullState struct {
	Model     string    `json:"model"`
	Status    string    `json:"status"`
	Completed int64     `json:"completed"`
	Total     int64     `json:"total"`
	Error     string    `json:"error,omitempty"`
	Started   time.Time `json:"started"`
	Attempts  int       `json:"attempts"`
	Active    bool      `json:"active"`
	NextRetry time.Time `json:"next_retry,omitzero"`
}

// setRequired records the models a handler requires of this server and
// wakes the sync. owner is the handler; dropRequired forgets it.
func (s *server) setRequired(owner any, models []requiredModel) {
	s.pullMu.Lock()
	if len(models) == 0 {
		delete(s.required, owner)
	} else {
		s.required[owner] = models
	}
	s.pullMu.Unlock()
	s.poke()
}

func (s *server) dropRequired(owner any) {
	s.pullMu.Lock()
	delete(s.required, owner)
	s.pullMu.Unlock()
}

// pulling reports whether a pull of model (normalised) is under way.
func (s *server) pulling(model string) bool {
	s.pullMu.Lock()
	defer s.pullMu.Unlock()
	p, ok := s.pulls[model]
	return ok && p.Active
}

// pullSnapshot copies the pull states, for the admin API.
func (s *server) pullSnapshot() []pullState {
	s.pullMu.Lock()
	defer s.pullMu.Unlock()
	out := make([]pullState, 0, len(s.pulls))
	for _, p := range s.pulls {
		out = append(out, *p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Model < out[j].Model })
	return out
}

// syncRequired starts pulls of required models the server lacks, at most
// pull_concurrency at a time, skipping those waiting out a backoff.
func (s *server) syncRequired() {
	snap := s.models.Load()
	if !snap.known || !s.healthy() {
		return
	}
	limit := s.settings.Load().pullConc
	if limit <= 0 {
		limit = defaultPullConc
	}
	now := time.Now()
	s.pullMu.Lock()
	defer s.pullMu.Unlock()
	active := 0
	for _, p := range s.pulls {
		if p.Active {
			active++
		}
	}
	for _, m := range s.wantedLocked() {
		if _, ok := snap.present[m.key]; ok {
			if p, ok := s.pulls[m.key]; ok && !p.Active {
				delete(s.pulls, m.key) // present now: history no longer matters
			}
			continue
		}
		p := s.pulls[m.key]
		if p != nil && (p.Active || now.Before(p.NextRetry)) {
			continue
		}
		if active >= limit {
			return
		}
		if p == nil {
			p = &pullState{Model: m.name}
			s.pulls[m.key] = p
		}
		p.Active, p.Started, p.Error, p.Status, p.Completed, p.Total = true, now, "", "starting", 0, 0
		p.NextRetry = time.Time{}
		p.Attempts++
		active++
		m := m
		s.goSafe("pull", func() { s.pull(m, p) })
	}
}

// wantedLocked is the union of every handler's required models, in a
// stable order. s.pullMu must be held.
func (s *server) wantedLocked() []requiredModel {
	seen := make(map[string]bool)
	var out []requiredModel
	for _, list := range s.required {
		for _, m := range list {
			if !seen[m.key] {
				seen[m.key] = true
				out = append(out, m)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].key < out[j].key })
	return out
}

var errPullStalled = errors.New("no progress")

// pull runs one pull of m and records its outcome: success refreshes the
// model lists so requests route to the server at once; failure schedules a
// retry with exponential backoff.
func (s *server) pull(m requiredModel, p *pullState) {
	log := s.logger().Named("pull").With(zap.String("model", m.name))
	s.pullMu.Lock()
	attempt := p.Attempts
	s.pullMu.Unlock()
	log.Info("pulling required model", zap.Int("attempt", attempt))
	err := s.runPull(m, p)
	s.pullMu.Lock()
	started := p.Started
	p.Active = false
	if err == nil {
		p.Status = "success"
	} else {
		p.Error = err.Error()
		backoff := pullBackoffBase << min(p.Attempts-1, 16)
		if backoff > pullBackoffMax || backoff <= 0 {
			backoff = pullBackoffMax
		}
		p.NextRetry = time.Now().Add(backoff)
	}
	nextRetry := p.NextRetry
	s.pullMu.Unlock()
	if s.ctx.Err() != nil {
		return
	}
	outcome := "success"
	if err != nil {
		outcome = "failure"
	}
	metrics.pulls.WithLabelValues(s.settings.Load().name, m.name, outcome).Inc()
	if err != nil {
		log.Warn("pull failed", zap.Error(err), zap.Time("next_retry", nextRetry))
		return
	}
	log.Info("pulled required model", zap.Duration("took", time.Since(started)))
	modelListsChanged()
	_ = s.refreshModels(s.ctx, 0)
	s.poke() // start the next queued pull
}

// runPull streams POST /api/pull and follows its NDJSON progress: an error
// line or a stream that ends without "success" is a failure, and so is
// pullStallTimeout without any line.
func (s *server) runPull(m requiredModel, p *pullState) error {
	ctx, cancel := context.WithCancelCause(s.ctx)
	defer cancel(nil)
	stall := time.AfterFunc(pullStallTimeout, func() { cancel(errPullStalled) })
	defer stall.Stop()

	body := fmt.Appendf(nil, `{"model":%q,"insecure":%t,"stream":true}`, m.name, m.insecure)
	res, err := s.do(ctx, http.MethodPost, "/api/pull", body)
	if err != nil {
		if errors.Is(context.Cause(ctx), errPullStalled) {
			return fmt.Errorf("no answer for %s", pullStallTimeout)
		}
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(res.Body, 4<<10))
		if e := gjson.GetBytes(msg, "error").String(); e != "" {
			return fmt.Errorf("status %d: %s", res.StatusCode, e)
		}
		return fmt.Errorf("status %d", res.StatusCode)
	}
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		stall.Reset(pullStallTimeout)
		if e := gjson.GetBytes(line, "error"); e.Exists() {
			return errors.New(e.String())
		}
		status := gjson.GetBytes(line, "status").String()
		s.pullMu.Lock()
		p.Status = status
		if t := gjson.GetBytes(line, "total"); t.Exists() {
			p.Total = t.Int()
			p.Completed = gjson.GetBytes(line, "completed").Int()
		}
		s.pullMu.Unlock()
		if status == "success" {
			return nil
		}
	}
	if errors.Is(context.Cause(ctx), errPullStalled) {
		return fmt.Errorf("no progress for %s", pullStallTimeout)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("progress stream broken: %v", err)
	}
	return errors.New(`progress stream ended without "success"`)
}
