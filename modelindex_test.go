package ollamaflow

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func indexedFrontend(list ...*backend) *Handler {
	for i, b := range list {
		b.pos.Store(int64(i))
	}
	return &Handler{backends: list}
}

func snapshot(present []string, loaded ...string) *modelSnapshot {
	m := &modelSnapshot{known: true, present: map[string][]byte{}, loaded: map[string][]byte{}}
	for _, p := range present {
		m.present[p] = nil
	}
	for _, l := range loaded {
		m.loaded[l] = nil
	}
	return m
}

// The index answers as the servers' lists do, and follows them: a change
// of what a server has (readModels bumps missGeneration) or has loaded
// (markLoaded) shows in the next answer.
func TestModelIndexFollowsTheServersLists(t *testing.T) {
	a, b, c := testBackend("a", nil), testBackend("b", nil), testBackend("c", nil)
	a.srv.models.Store(snapshot([]string{"m1:latest"}))
	b.srv.models.Store(snapshot([]string{"m1:latest", "m2:latest"}, "m1:latest"))
	// c's lists are unknown: it may have anything.
	h := indexedFrontend(a, b, c)

	assert.Equal(t, []string{"a", "b", "c"}, names(h.withModel(h.backends, "m1:latest")))
	assert.Equal(t, []string{"b", "c"}, names(h.withModel(h.backends, "m2:latest")))
	assert.Equal(t, []string{"c"}, names(h.withModel(h.backends, "nowhere:latest")), "unknown lists only")
	assert.Equal(t, []string{"a", "c"}, names(h.withModel([]*backend{a, c}, "m1:latest")), "a subset of the candidates")
	assert.Equal(t, []string{"b"}, names(h.loadedOn(h.withModel(h.backends, "m1:latest"), "m1:latest")))
	assert.True(t, h.coldFor(a, "m1:latest"))
	assert.False(t, h.coldFor(b, "m1:latest"))

	a.srv.markLoaded("m1:latest") // a request found it loaded there
	assert.Equal(t, []string{"a", "b"}, names(h.loadedOn(h.withModel(h.backends, "m1:latest"), "m1:latest")))
	assert.False(t, h.coldFor(a, "m1:latest"))

	b.srv.models.Store(snapshot([]string{"m2:latest"})) // b's next refresh: m1 deleted
	modelListsChanged()
	assert.Equal(t, []string{"a", "c"}, names(h.withModel(h.backends, "m1:latest")))
	assert.Equal(t, []string{"a"}, names(h.loadedOn([]*backend{a, b, c}, "m1:latest")))

	other := testBackend("z", nil) // a backend of another list: answered from its own lists
	other.srv.models.Store(snapshot([]string{"m1:latest"}))
	assert.Equal(t, []string{"z"}, names(h.withModel([]*backend{other}, "m1:latest")))
}

// The index holds at most modelIndexMax models, however many the servers
// list and clients ask for, and never one that no server has.
func TestModelIndexIsBounded(t *testing.T) {
	var many []string
	for i := range 3 * modelIndexMax {
		many = append(many, fmt.Sprintf("m%d:latest", i))
	}
	a := testBackend("a", nil)
	a.srv.models.Store(snapshot(many))
	h := indexedFrontend(a)
	for _, m := range many {
		require.Equal(t, []string{"a"}, names(h.withModel(h.backends, m)))
		require.LessOrEqual(t, len(h.index.Load().byModel), modelIndexMax)
	}
	for i := range 1000 {
		h.withModel(h.backends, fmt.Sprintf("absent-%d:latest", i))
	}
	for m := range h.index.Load().byModel {
		assert.NotContains(t, m, "absent", "a model no server has is not indexed")
	}
}
