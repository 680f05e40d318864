package ollamaflow

import "sync/atomic"

// Routing a request by model asks every candidate whether its server has
// the model, and the policies ask whether it has it loaded. A map lookup
// per server per request grows with the pool (tens of microseconds at
// 1,000 servers), so each frontend keeps, per model, bitsets over the
// positions of its backends: computed once per generation of the servers'
// lists, then a bit test per candidate, or, when every backend is a
// candidate (the common case), a list ready to use. The generations are
// missGeneration, bumped whenever a server's set of models changes or it
// turns healthy, and loadedGeneration, bumped whenever a server's set of
// loaded models changes.

// loadedGeneration changes whenever a server's set of loaded models does.
var loadedGeneration atomic.Uint64

// modelIndexMax bounds the models a frontend's index holds: only models
// some server lists are indexed, and past this many the index starts over,
// so a client naming endless models cannot grow it.
const modelIndexMax = 256

// modelIndex is immutable once published; a new model or generation
// publishes a copy.
type modelIndex struct {
	gen, loadedGen uint64
	backends       []*backend // the list the positions refer to
	byModel        map[string]*modelHolders
	// recent is the entry asked for last: a policy asks once per
	// candidate, and a string compare is cheaper than a map lookup.
	recent atomic.Pointer[modelHolders]
}

// modelHolders is the index of one model: the backends that may have it,
// and those that have it loaded.
type modelHolders struct {
	model  string
	may    []uint64   // bit i: backends[i] has the model or its lists are unknown
	loaded []uint64   // bit i: backends[i] has it loaded
	list   []*backend // the backends of may, in order
	warm   []*backend // those of list that have it loaded
	// kept is withModel's last answer for a large candidate list other
	// than the pool (a server down or disabled), so the next request
	// with the same candidates does not filter them again.
	kept atomic.Pointer[keptList]
}

// keptList is a filter's answer out for the list in.
type keptList struct{ in, out []*backend }

// holders returns the index of model over h.pool(), and the list its
// positions refer to; nil when the model is not indexed (no server is
// known to have it: the slower path costs nothing a miss does not).
func (h *Handler) holders(model string) (*modelHolders, []*backend) {
	list := h.pool()
	// Read before any list: a change during the scan invalidates.
	gen, loadedGen := missGeneration.Load(), loadedGeneration.Load()
	idx := h.index.Load()
	if idx != nil && idx.gen == gen && idx.loadedGen == loadedGen && sameList(idx.backends, list) {
		if e := idx.recent.Load(); e != nil && e.model == model {
			return e, idx.backends
		}
		if e, ok := idx.byModel[model]; ok {
			idx.recent.Store(e)
			return e, idx.backends
		}
	} else {
		idx = nil
	}
	words := (len(list) + 63) / 64
	e := &modelHolders{model: model, may: make([]uint64, words), loaded: make([]uint64, words)}
	anyHas := false
	for i, b := range list {
		snap := b.srv.models.Load()
		has, known := snap.has(model)
		if has || !known {
			e.may[i/64] |= 1 << (i % 64)
			e.list = append(e.list, b)
		}
		if snap.isLoaded(model) {
			e.loaded[i/64] |= 1 << (i % 64)
			if has || !known {
				e.warm = append(e.warm, b)
			}
		}
		anyHas = anyHas || has
	}
	if !anyHas {
		return nil, nil
	}
	// Shared: an append copies.
	e.list, e.warm = e.list[:len(e.list):len(e.list)], e.warm[:len(e.warm):len(e.warm)]
	next := &modelIndex{gen: gen, loadedGen: loadedGen, backends: list, byModel: make(map[string]*modelHolders)}
	if idx != nil && len(idx.byModel) < modelIndexMax {
		for m, old := range idx.byModel {
			next.byModel[m] = old
		}
	}
	next.byModel[model] = e
	next.recent.Store(e)
	h.index.Store(next)
	return e, list
}

// sameList reports whether a and b are the same slice of backends.
func sameList(a, b []*backend) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// bit reports whether b's bit is set in bits over list, and whether the
// index covers b at all (a backend from another list does not).
func bit(bits []uint64, list []*backend, b *backend) (set, covered bool) {
	i := int(b.pos.Load())
	if bits == nil || i >= len(list) || list[i] != b {
		return false, false
	}
	return bits[i/64]&(1<<(i%64)) != 0, true
}

// withModel keeps the candidates whose server has model or whose lists
// are not known yet, in order. The result is shared: callers never modify
// it in place.
func (h *Handler) withModel(cands []*backend, model string) []*backend {
	e, list := h.holders(model)
	if e != nil && sameList(cands, list) {
		return e.list // every backend is a candidate
	}
	if e != nil && len(cands) > largePool {
		if k := e.kept.Load(); k != nil && sameList(k.in, cands) {
			return k.out
		}
	}
	out := filterBackends(cands, func(b *backend) bool {
		if e != nil {
			if set, ok := bit(e.may, list, b); ok {
				return set
			}
		}
		has, known := b.srv.models.Load().has(model)
		return has || !known
	})
	if e != nil && len(cands) > largePool {
		e.kept.Store(&keptList{in: cands, out: out})
	}
	return out
}

// loadedOn keeps the backends of list that have model loaded.
func (h *Handler) loadedOn(list []*backend, model string) []*backend {
	e, all := h.holders(model)
	if e != nil && sameList(list, e.list) {
		return e.warm // every backend that may have it is in list
	}
	return filterBackends(list, func(b *backend) bool {
		if e != nil {
			if loaded, ok := bit(e.loaded, all, b); ok {
				return loaded
			}
		}
		return b.srv.models.Load().isLoaded(model)
	})
}

// loadedOnInto is loadedOn appending to out, for a short list (a sample)
// whose answer the caller keeps on its stack.
func (h *Handler) loadedOnInto(out, list []*backend, model string) []*backend {
	e, all := h.holders(model)
	if e != nil && sameList(list, e.list) {
		return e.warm
	}
	if len(list) > cap(out) {
		return h.loadedOn(list, model)
	}
	for _, b := range list {
		if e != nil {
			if loaded, ok := bit(e.loaded, all, b); ok {
				if loaded {
					out = append(out, b)
				}
				continue
			}
		}
		if b.srv.models.Load().isLoaded(model) {
			out = append(out, b)
		}
	}
	return out
}

// filterBackends returns the backends of list that keep accepts, in order:
// list itself when every one does, so the common case allocates nothing,
// else one copy. Callers never modify the result in place.
func filterBackends(list []*backend, keep func(*backend) bool) []*backend {
	var out []*backend
	for i, b := range list {
		switch {
		case keep(b):
			if out != nil {
				out = append(out, b)
			}
		case out == nil:
			out = make([]*backend, i, len(list)-1)
			copy(out, list[:i])
		}
	}
	if out == nil {
		return list[:len(list):len(list)]
	}
	return out
}

// isLoaded reports whether b's server has model loaded.
func (h *Handler) isLoaded(b *backend, model string) bool {
	if e, all := h.holders(model); e != nil {
		if loaded, ok := bit(e.loaded, all, b); ok {
			return loaded
		}
	}
	return b.srv.models.Load().isLoaded(model)
}
