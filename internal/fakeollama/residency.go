package fakeollama

import (
	"cmp"
	"math"
	"slices"
	"sync/atomic"
	"time"
)

// Residency and speed, for routing benchmarks: a box with room for Config.MaxLoaded models
// evicts one to load another, as Ollama's scheduler does under OLLAMA_MAX_LOADED_MODELS (the
// idle model whose blob path sorts first: victimLocked; a load waits until one is idle); concurrent
// requests for a model that is loading share that one load; SetSpeed makes the box slower or
// faster mid-run. ColdLoads and Evictions count what happened, for a benchmark to report.
//
// /api/ps lists a model once its load is done; the victim is gone from the start of the load.
// Ollama v0.17.4 lists a model when its runner has started (server/sched.go, load), which for
// a llama model is the end of the load: polled every millisecond while a server of room one
// swapped its model, the rig's tiny-llama was listed 318 ms into a 324 ms load, and the list
// was empty until then; tiny-bert was listed 78 ms into 330 ms.

// residencyState is the Server's part for residency and speed.
type residencyState struct {
	loading   map[string]chan struct{} // models being loaded, closed when done; under mu
	active    map[string]int           // requests using each resident model; under mu
	coldLoads atomic.Int64
	evictions atomic.Int64
	speed     atomic.Uint64 // float64 bits of the time factor; 0 means 1
}

// SetSpeed multiplies the box's times (FirstByteDelay, PromptTokenCost, TokenGap, LoadDelay)
// by factor for requests from now on: 4 makes it four times slower, as another model loaded
// beside it or a CPU fallback would. 1 restores it.
func (s *Server) SetSpeed(factor float64) {
	if factor <= 0 || math.IsNaN(factor) || math.IsInf(factor, 0) {
		factor = 1
	}
	s.speed.Store(math.Float64bits(factor))
}

// Speed is the factor SetSpeed set (1 by default).
func (s *Server) Speed() float64 {
	if bits := s.speed.Load(); bits != 0 {
		return math.Float64frombits(bits)
	}
	return 1
}

// scaled is d at the box's current speed.
func (s *Server) scaled(d time.Duration) time.Duration {
	bits := s.speed.Load()
	if bits == 0 || d <= 0 {
		return d
	}
	return time.Duration(float64(d) * math.Float64frombits(bits))
}

// ColdLoads is the number of model loads since the start or ResetStats: requests that found
// their model not resident and loaded it (a request that waited for another's load counts
// once, with it).
func (s *Server) ColdLoads() int { return int(s.coldLoads.Load()) }

// Evictions is the number of models unloaded to make room for another (Config.MaxLoaded) since
// the start or ResetStats.
func (s *Server) Evictions() int { return int(s.evictions.Load()) }

// loadModel makes m resident for c, as Ollama's scheduler does: at once when it is; else after
// LoadDelay, sharing a load already under way, and, when Config.MaxLoaded models are resident
// (or loading), after evicting one (victimLocked), waiting until it is idle. load_duration
// counts from here: the wait for a slot before it is not a load.
func (c *call) loadModel(m model) bool {
	s := c.s
	c.loadStart = time.Now()
	for {
		s.mu.Lock()
		if slices.Contains(s.loaded, m.key) {
			s.useLocked(c, m.key)
			s.mu.Unlock()
			return true
		}
		if ch := s.loading[m.key]; ch != nil {
			s.mu.Unlock()
			if !c.waitFor(ch) {
				return false
			}
			continue
		}
		if room := s.cfg.MaxLoaded; room > 0 && len(s.loaded)+len(s.loading) >= room {
			victim := s.victimLocked()
			if victim == "" || s.active[victim] > 0 {
				s.mu.Unlock()
				if !c.wait(time.Millisecond) { // every resident model is at work: wait for the victim to idle
					return false
				}
				continue
			}
			s.loaded = slices.DeleteFunc(s.loaded, func(k string) bool { return k == victim })
			s.dropCache(victim) // its runner is gone, and its prompt cache with it
			s.evictions.Add(1)
		}
		ch := make(chan struct{})
		if s.loading == nil {
			s.loading = map[string]chan struct{}{}
		}
		s.loading[m.key] = ch
		s.mu.Unlock()
		ok := c.wait(s.scaled(s.cfg.LoadDelay))
		s.mu.Lock()
		delete(s.loading, m.key)
		close(ch)
		if ok {
			if !slices.Contains(s.loaded, m.key) {
				s.loaded = append(s.loaded, m.key)
				s.dropCache(m.key) // a new runner: its cache slots start empty
			}
			s.coldLoads.Add(1)
			s.useLocked(c, m.key)
		}
		s.mu.Unlock()
		return ok
	}
}

// useLocked marks key in use by c until c's slot is released.
func (s *Server) useLocked(c *call, key string) {
	if s.active == nil {
		s.active = map[string]int{}
	}
	if c.using == "" {
		s.active[key]++
		c.using = key
	}
}

// unuse ends c's use of its model.
func (c *call) unuse() {
	if c.using == "" {
		return
	}
	c.s.mu.Lock()
	c.s.active[c.using]--
	c.s.mu.Unlock()
	c.using = ""
}

// victimLocked is the resident model a load evicts, as Ollama v0.17.4 picks it
// (server/sched.go, findRunnerToUnload): of the models no request is using, the one whose
// path (/api/show's FROM: the model blob) sorts first; when every one is in use, the first of
// all, which the load waits for. Not the least recently used: Ollama sorts by keep_alive
// (which the fake does not keep: every model's is the default), then by path. On the rig, at
// OLLAMA_MAX_LOADED_MODELS=2, tl2, tl1, tl2, tl3 (blobs sha256-1bad…, -f0d9…, -3d3e…) evicted
// tl2, the model used last; tl3, tl1, tl3, tl2 evicted tl3. "" when nothing is resident.
func (s *Server) victimLocked() string {
	var first, idle, firstPath, idlePath string
	for _, k := range s.loaded {
		p := s.modelPathLocked(k)
		if first == "" || p < firstPath {
			first, firstPath = k, p
		}
		if s.active[k] == 0 && (idle == "" || p < idlePath) {
			idle, idlePath = k, p
		}
	}
	return cmp.Or(idle, first)
}

// modelPathLocked is where the model of key is kept, as /api/show's modelfile names it.
func (s *Server) modelPathLocked(key string) string {
	if i := slices.IndexFunc(s.models, func(o model) bool { return o.key == key }); i >= 0 {
		return s.models[i].file(s.cfg.ModelsDir)
	}
	return s.newModel(key, s.started).file(s.cfg.ModelsDir)
}
