package e2e

import (
	"bytes"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestConversationAffinity: two multi-turn conversations, interleaved turn
// by turn, through the proxy over the three real servers, without any
// session header. Through main (the default config: least_delay with
// conversation affinity) every follow-up lands on the server that served
// its first turn, where Ollama still holds the conversation in its prompt
// cache: prompt_eval_count is the whole prompt either way, but
// prompt_eval_duration drops. Through a round_robin frontend (affinity off,
// its default there) the follow-ups land where the other conversation was
// last, and Ollama evaluates every prompt from the start. The round-robin
// pass runs first, so its prompts are new to every server.
func TestConversationAffinity(t *testing.T) {
	scenario(t)
	useConfig(t, "\t\tlb_policy round_robin\n")
	// Warm-up: least_delay's estimates (shared by every frontend naming a
	// server) see each server serve the same small chat a few times, so
	// three equal servers look about equal; new conversations are spread
	// only over servers about as fast as the best.
	for range 6 * len(env.servers) {
		res, body, err := postJSON(env.extraURL, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":8}}`)
		if err != nil || res.StatusCode != http.StatusOK {
			t.Fatalf("warm-up: %v %s", err, body)
		}
	}
	rr := converse(t, env.extraURL)
	// What least_delay believes of each server as the affinity pass
	// starts, for the log when the first turns do not spread (once in a
	// CI run: both on one server, the others outside the band of servers
	// about as fast as the best after the round-robin pass's samples).
	var learned json.RawMessage
	learnedErr := getJSON("http://"+env.admin+"/ollamaflow/backends", &learned)
	var compact bytes.Buffer
	if learnedErr == nil {
		learnedErr = json.Compact(&compact, learned)
	}
	aff := converse(t, env.mainURL)

	// Affinity: the first turns went to two servers (a new conversation
	// goes where fewest are held), each follow-up to its first turn's.
	homes := map[int]string{}
	for _, r := range aff {
		if r.turn == 0 {
			homes[r.conv] = r.backend
			if r.route != "policy" {
				t.Errorf("conversation %d turn 1: X-OllamaFlow-Route %q, want policy (a new conversation)", r.conv, r.route)
			}
			continue
		}
		if r.backend != homes[r.conv] || r.route != "affinity-hit" {
			t.Errorf("conversation %d turn %d: served by %s (%s), want %s (affinity-hit), where turn 1 was", r.conv, r.turn+1, r.backend, r.route, homes[r.conv])
		}
	}
	if homes[0] == homes[1] {
		t.Errorf("both conversations started on %s: Ollama's cache holds one of them; learned before the pass (%v): %s", homes[0], learnedErr, compact.Bytes())
	}
	// Round robin: follow-ups move.
	moved := 0
	for i, r := range rr {
		if r.turn > 0 && r.backend != rr[i-2].backend {
			moved++
		}
		if r.route != "policy" {
			t.Errorf("round_robin, conversation %d turn %d: X-OllamaFlow-Route %q, want policy", r.conv, r.turn+1, r.route)
		}
	}

	// The same prompts both ways: the same counts (the model answers
	// deterministically with temperature 0 and a seed).
	var countsAff, countsRR []int
	var durAff, durRR []time.Duration
	for i := range aff {
		if aff[i].turn == 0 {
			continue
		}
		countsAff, countsRR = append(countsAff, aff[i].count), append(countsRR, rr[i].count)
		durAff, durRR = append(durAff, aff[i].evalDur), append(durRR, rr[i].evalDur)
		if aff[i].count != rr[i].count {
			t.Errorf("conversation %d turn %d: prompt_eval_count %d with affinity, %d with round_robin: the same prompt is counted whole either way", aff[i].conv, aff[i].turn+1, aff[i].count, rr[i].count)
		}
	}
	medAff, medRR := median(durAff), median(durRR)
	t.Logf("FIGURE conversation affinity on real Ollama (3 servers, 2 conversations x %d turns interleaved, no session header): follow-up prompt_eval_duration median %.1f ms with affinity (%d of %d on the first turn's server) vs %.1f ms with round_robin (%d of %d moved), %.1fx; prompt_eval_count %v both ways",
		turnsPerConversation, ms(medAff), len(durAff)-countMismatch(aff, homes), len(durAff), ms(medRR), moved, len(durRR), float64(medRR)/float64(max(medAff, 1)), countsAff)
	t.Logf("follow-up prompt_eval_duration, affinity: %v; round_robin: %v", durAff, durRR)
	if moved != len(durRR) {
		t.Errorf("round_robin: %d of %d follow-ups moved, want all (three servers, two conversations)", moved, len(durRR))
	}
	if medAff*2 > medRR {
		t.Errorf("follow-up prompt evaluation with affinity (median %v) is not under half of round_robin's (median %v): the cache did not work", medAff, medRR)
	}
}

// turnsPerConversation is the turns each conversation has: the prompt of
// the last stays within tiny-llama's num_ctx (512), beyond which Ollama
// shifts the context and the cache no longer matches.
const turnsPerConversation = 4

// conversationTurn is one turn's answer as a client sees it.
type conversationTurn struct {
	conv, turn     int
	backend, route string
	count          int
	evalDur        time.Duration
}

// converse holds two conversations with base, turn by turn: a long system
// prompt (about 270 tokens with tiny-llama's vocabulary, a few hundred
// milliseconds of prompt evaluation here), then a short question per turn,
// each answer sent back with the next question as a chat client does.
func converse(t *testing.T, base string) []conversationTurn {
	t.Helper()
	words := strings.Repeat("the model is a fast server and the proxy is a slow backend to answer the request of the chat stream ", 3)
	convs := [][]map[string]string{
		{{"role": "system", "content": "alpha " + words}},
		{{"role": "system", "content": "beta " + words}},
	}
	questions := []string{"hi", "why is it slow", "how is the proxy", "what is the answer"}
	var out []conversationTurn
	for turn := range turnsPerConversation {
		for c := range convs {
			convs[c] = append(convs[c], map[string]string{"role": "user", "content": questions[turn]})
			body, err := json.Marshal(map[string]any{"model": chatModel, "messages": convs[c], "stream": false,
				"options": map[string]any{"num_predict": 8, "temperature": 0, "seed": 42}})
			if err != nil {
				t.Fatal(err)
			}
			res, answer, err := postJSON(base, "/api/chat", string(body))
			if err != nil || res.StatusCode != http.StatusOK {
				t.Fatalf("conversation %d turn %d: %v %s", c, turn+1, err, answer)
			}
			var a struct {
				Message            struct{ Content string }
				PromptEvalCount    int           `json:"prompt_eval_count"`
				PromptEvalDuration time.Duration `json:"prompt_eval_duration"`
			}
			if err := json.Unmarshal(answer, &a); err != nil {
				t.Fatalf("conversation %d turn %d: %v: %s", c, turn+1, err, answer)
			}
			convs[c] = append(convs[c], map[string]string{"role": "assistant", "content": a.Message.Content})
			out = append(out, conversationTurn{conv: c, turn: turn, backend: res.Header.Get("X-OllamaFlow-Backend"),
				route: res.Header.Get("X-OllamaFlow-Route"), count: a.PromptEvalCount, evalDur: a.PromptEvalDuration})
		}
	}
	return out
}

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// countMismatch is the number of follow-ups not served by their first
// turn's server.
func countMismatch(turns []conversationTurn, homes map[int]string) int {
	n := 0
	for _, r := range turns {
		if r.turn > 0 && r.backend != homes[r.conv] {
			n++
		}
	}
	return n
}
