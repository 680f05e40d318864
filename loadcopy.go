package ollamaflow

import (
	"net/http"
	"time"
)

// Load copies. A model short of copies for its share of the requests gets
// one more where demand placement finds room (placementMove). The request
// that found the shortage used to be sent there itself, to load the model,
// and its client waited for the load: on the fakes' slow servers 1.5 to 6
// seconds, on real GPUs tens of seconds, for a copy that pays off only for
// the requests after it. Instead a copy of that request, its output capped
// at one token and its answer read by the proxy alone, loads the model
// there, while the request itself goes where the policy sends it now (a
// queue on a copy already loaded, most often). The load is the same; no
// client waits for it.
//
// The copy is the request as that server would run it (the frontend's and
// the server's pins, so the model loads with the options its requests will
// ask for), sent like a measuring copy (measurecopy.go: maxCopies at once,
// a body of at most copyMaxBody, outside max_body_memory, charged to no
// tenant, recording no conversation); it takes a slot there as a request
// does, and its answer teaches that server's load time. It is counted in
// ollamaflow_load_copies_total. The load is planned when the move is
// chosen (planLoad), so the requests that follow see it under way and the
// next move waits for it; a request that may not be copied (not a
// completion, or too large) is sent to load the model itself, as before.

// loadCopyTokens caps a load copy's answer: one token shows the model
// loaded and how fast it was.
const loadCopyTokens = 1

// claimLoadCopy claims a load copy of j's request for b, the server a
// demand move chose, and plans the load there; false when j may not be
// copied (the request itself must be sent to load it).
func (h *Handler) claimLoadCopy(b *backend, j *job) bool {
	if !j.copyable || j.loadTo != nil {
		return false
	}
	j.loadTo = b
	b.srv.speed.planLoad(j.model, time.Now())
	return true
}

// sendLoadCopy sends the load copy claimed for j, if any.
func (h *Handler) sendLoadCopy(r *http.Request, api apiFormat, kind routeKind, body []byte, j *job) {
	b := j.loadTo
	if b == nil {
		return
	}
	j.loadTo = nil
	if !h.launchCopy(r, api, kind, body, b, j, loadCopyTokens, false) {
		b.srv.speed.unplanLoad(j.model)
	}
}
