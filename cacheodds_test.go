package ollamaflow

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fittedBackend is ruleBackend with a prompt fit that prices long prompts
// too (a second sample of 1,000 tokens in 1 s), so that a follow-up's
// prompt time tells whether its cache was there.
func fittedBackend(name string, inFlight int64) *backend {
	b := ruleBackend(name, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "m", promptChars: 4000, maxOutput: 10}, time.Now(), finalGen(time.Second, 10*ms, 0, 0, 1000, 10))
	b.srv.inFlight.Store(inFlight)
	return b
}

// longChat is a follow-up turn whose history (a 2,000-character system
// prompt, 0.5 s of prompt on fittedBackend) the previous turn left in
// home's cache, with the table that knows it.
func longChat(t *testing.T, home string) (*job, conversation, *affinityTable) {
	history := longHistory()
	chat := func(msgs []map[string]string) ([]byte, conversation) { return chatTurn(t, msgs) }
	_, prev := chat(history[:len(history)-1])
	body, conv := chat(append(slices.Clone(history), map[string]string{"role": "user", "content": "next question"}))
	tab := newAffinityTable(100, time.Hour)
	tab.record(prev, home, 0, time.Now())
	return newJob("m", apiOllama, body), conv, tab
}

// A follow-up kept on a busy server for its cache learns there whether the
// cache was there: when turns sent back keep evaluating their whole prompt
// (Ollama's default slot choice gave the slot to another conversation), the
// saving is no longer credited and the next one goes where it starts at
// once; when they find it again, it is.
func TestAffinityLearnsWhetherTheCacheWasThere(t *testing.T) {
	home, other := fittedBackend("home", 0), fittedBackend("other", 0)
	j, conv, tab := longChat(t, home.srv.key)
	h := &Handler{affinity: tab}
	key, id, depth := tab.lookup(conv, time.Now())
	require.Equal(t, home.srv.key, key)
	require.True(t, conv.followUp)
	// keeps asks with busy requests at work on home's slots, none on
	// other.
	keeps := func(class cacheClass, busy int64) (*backend, float64) {
		defer hold(home, int(busy), time.Now())()
		dHome, _ := h.estimateOf(home, j)
		dOther, _ := h.estimateOf(other, j)
		require.Greater(t, dHome.wait, 0.2, "home is busy")
		require.Greater(t, dHome.total(), dOther.total()+0.1)
		return h.keepsConversation([]*backend{other, home}, key, conv, depth, j, class)
	}
	kept, saving := keeps(0, 4)
	require.Same(t, home, kept, "0.5 s of cached prompt outweighs the wait while the cache is believed there")
	require.Greater(t, saving, 0.3)

	// Turns sent back that evaluated their whole prompt: the cache was gone.
	at := time.Now().Add(-time.Minute) // one a second, answered by now
	sentBack := func(promptTime time.Duration) {
		at = at.Add(time.Second)
		home.srv.inFlight.Store(1) // one at a time
		sj := &job{model: "m", promptChars: 2000, maxOutput: 10, cachedOn: &home.srv.speed, cacheSaving: saving,
			turn: tab.record(conv, home.srv.key, id, time.Now())}
		serve(home, sj, at, finalGen(promptTime, 10*ms, 0, 0, 530, 10))
		home.srv.inFlight.Store(0)
	}
	for range 6 {
		sentBack(530 * ms)
	}
	assert.Less(t, home.srv.speed.cacheOdds(0), 0.5)
	assert.True(t, tab.missedLast(id), "its last turn missed")
	assert.Nil(t, keptBackend(keeps(0, 4)), "a saving that did not come is no reason to wait: the policy chooses")
	assert.Nil(t, keptBackend(keeps(classOf(false, true), 4)))

	// Turns that found it again (30 ms for the question after the cached
	// history): the saving is credited again.
	for range 10 {
		sentBack(30 * ms)
	}
	assert.False(t, tab.missedLast(id))
	assert.Greater(t, home.srv.speed.cacheOdds(0), 0.75)
	// (The answers it learned from lengthened its typical service, so
	// two at work now wait about as long as four did.)
	assert.Same(t, home, keptBackend(keeps(0, 2)))
}

// Odds are kept per class: what the last turn showed, and whether the
// table counts the conversation evicted, are learned apart, each from its
// prior.
func TestCacheOddsByClass(t *testing.T) {
	var o cacheOdds
	assert.Equal(t, 1.0, o.odds(classOf(false, false)), "counted in, nothing missed: cached")
	assert.Equal(t, 0.5, o.odds(classOf(true, false)))
	assert.Equal(t, 0.5, o.odds(classOf(false, true)))
	assert.Equal(t, 0.25, o.odds(classOf(true, true)))
	for range 20 {
		o.note(classOf(true, false), true)
		o.note(classOf(false, true), false)
	}
	assert.Greater(t, o.odds(classOf(true, false)), 0.9, "counted out, yet found every time: the count overstates evictions")
	assert.Less(t, o.odds(classOf(false, true)), 0.1)
	assert.Equal(t, 1.0, o.odds(classOf(false, false)), "other classes keep their prior")
	// Recent outcomes weigh most: ten found after twenty missed.
	for range 10 {
		o.note(classOf(false, true), true)
	}
	assert.Greater(t, o.odds(classOf(false, true)), 0.5)
}

// longHistory is a conversation of three turns under a 2,000-character
// system prompt (500 tokens, 0.5 s of prompt on fittedBackend).
func longHistory() []map[string]string {
	history := []map[string]string{{"role": "system", "content": strings.Repeat("Be brief and exact. ", 100)}}
	for i := range 3 {
		history = append(history, map[string]string{"role": "user", "content": fmt.Sprint("question ", i)}, map[string]string{"role": "assistant", "content": "answer"})
	}
	return history
}

// chatTurn is an /api/chat body of msgs for model m and its conversation.
func chatTurn(t *testing.T, msgs []map[string]string) ([]byte, conversation) {
	body := []byte(mustJSON(t, map[string]any{"model": "m", "messages": msgs, "options": map[string]any{"num_predict": 10}}))
	return body, conversationOf("/api/chat", "m", body)
}
