package ollamaflow

// How often a conversation's prompt cache is really there when affinity
// sends a follow-up back to it.
//
// The affinity table's belief of what a server's slots hold (hosted) is a
// count, exact only where the server evicts the least recently used slot
// (OLLAMA_MULTIUSER_CACHE). Ollama's default takes the lowest free slot
// sharing the longest prefix, so a conversation counted out may still be
// cached in a slot the others never reach, and one counted in is gone
// when busy slots sent a turn into its own. Crediting the whole saving on
// the count's word, follow-ups waited behind a busy server for a cache
// that was not there (the conversations workload's tail: waits of 0.5 s
// for a prompt evaluated in full), and moving every one counted out
// evicted a live conversation elsewhere, whose next turn then moved in
// turn (124 of 191 follow-ups). Each follow-up sent back tells which it
// was: its prompt evaluation is short by about the saving where the cache
// held it. So each server learns how often the count's word held, once for
// conversations it counted in and once for those it counted out, and a
// follow-up is credited the saving times those odds.

const (
	// cacheOddsKeep is what an earlier outcome weighs at each new one
	// (about the last ten count).
	cacheOddsKeep = 0.9
	// cacheOddsPrior is how many outcomes the prior odds weigh as.
	cacheOddsPrior = 2.0
)

// cacheClass is what is known of a follow-up's cache on its server
// before it is sent: whether the table counts it evicted (countedOut) and
// whether the conversation's last turn there missed its cache. The last
// outcome is the better witness under Ollama's default: the conversation
// in the slot the others never reach finds it turn after turn, and those
// that share the other slot miss turn after turn (the conversations
// workload: 62 of 65 found it after a turn that found it, 5 of 71 after
// one that missed).
type cacheClass uint8

func classOf(countedOut, missedLast bool) cacheClass {
	c := cacheClass(0)
	if countedOut {
		c |= 1
	}
	if missedLast {
		c |= 2
	}
	return c
}

// cachePrior are the odds of each class before any outcome: a
// conversation counted in whose last turn missed nothing is taken to be
// cached, as the count says; the others are a coin toss, or less, so
// that some go back and teach the odds (at 0, only a tie would ever send
// one back).
var cachePrior = [4]float64{1, 0.5, 0.5, 0.25}

// cacheOdds are one server's outcomes of follow-ups sent to their cache,
// by class. speed.mu guards it.
type cacheOdds struct {
	found, tried [4]float64
}

// odds is the chance that a follow-up of class c finds its prefix cached.
func (o *cacheOdds) odds(c cacheClass) float64 {
	return (o.found[c] + cachePrior[c]*cacheOddsPrior) / (o.tried[c] + cacheOddsPrior)
}

func (o *cacheOdds) note(c cacheClass, found bool) {
	o.found[c] *= cacheOddsKeep
	o.tried[c] *= cacheOddsKeep
	o.tried[c]++
	if found {
		o.found[c]++
	}
}

// cacheOdds is the chance that a follow-up of class c sent here finds its
// prefix in a cache slot.
func (sp *speed) cacheOdds(c cacheClass) float64 {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.cache.odds(c)
}

// Outcomes of a conversation's last turn on its server (convActivity.found).
const (
	turnUnknown int32 = iota // not sent to its cache, or its timing did not tell
	turnFound
	turnMissed
)

// noteCacheOutcomeLocked learns from a follow-up that affinity sent to its
// cache here whether the cache was there: its prompt, evaluated in sec,
// took less than the fit predicts for the whole prompt by more than half
// the saving expected. A prompt the fit cannot price yet teaches nothing.
// The conversation remembers the outcome for its next turn.
func (sp *speed) noteCacheOutcomeLocked(r *rates, j *job, tokens, sec float64) {
	if j.cacheSaving <= 0 || tokens <= 0 || sec < 0 {
		return
	}
	pred, determined := r.promptSecs(tokens)
	if !determined {
		return
	}
	found := sec < pred-j.cacheSaving/2
	sp.cache.note(j.cacheClass, found)
	if j.turn != nil {
		outcome := turnMissed
		if found {
			outcome = turnFound
		}
		j.turn.found.Store(outcome)
	}
}
