package ollamaflow

// Route classification (SPEC §3's route table) and error bodies in the
// format of the API a request came in on.

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
)

// routeKind is what a request asks for, which decides how it is gated and
// where it may go.
type routeKind int

const (
	kindRoot routeKind = iota
	kindVersion
	kindCompletion
	kindEmbedding
	kindModelRead
	kindManagement
)

func (k routeKind) String() string {
	switch k {
	case kindCompletion:
		return "completion"
	case kindEmbedding:
		return "embedding"
	case kindModelRead:
		return "model read"
	case kindManagement:
		return "model management"
	case kindVersion:
		return "version"
	default:
		return "root"
	}
}

// apiFormat is the API a request came in on; errors answer in its format.
type apiFormat int

const (
	apiOllama apiFormat = iota
	apiOpenAI
)

type route struct {
	kind    routeKind
	methods string    // allowed methods, as for the Allow header
	model   modelFrom // where the request names its model
}

// modelFrom says where a request names the model it is about.
type modelFrom int

const (
	modelNone       modelFrom = iota
	modelInBody               // "model" in the JSON body, required
	modelInBodyName           // "model", or Ollama's older "name", required
	modelInPath               // the last path segment
)

// routes is SPEC §3's route table for exact paths; prefixRoutes covers the
// paths that end in a parameter.
var routes = map[string]route{
	"/":                    {kindRoot, "HEAD, GET", modelNone},
	"/api/version":         {kindVersion, "HEAD, GET", modelNone},
	"/api/generate":        {kindCompletion, "POST", modelInBody},
	"/api/chat":            {kindCompletion, "POST", modelInBody},
	"/v1/completions":      {kindCompletion, "POST", modelInBody},
	"/v1/chat/completions": {kindCompletion, "POST", modelInBody},
	"/api/embed":           {kindEmbedding, "POST", modelInBody},
	"/api/embeddings":      {kindEmbedding, "POST", modelInBody},
	"/v1/embeddings":       {kindEmbedding, "POST", modelInBody},
	"/api/tags":            {kindModelRead, "HEAD, GET", modelNone},
	"/api/ps":              {kindModelRead, "GET", modelNone},
	"/api/show":            {kindModelRead, "POST", modelInBodyName},
	"/v1/models":           {kindModelRead, "GET", modelNone},
	"/api/pull":            {kindManagement, "POST", modelInBodyName},
	"/api/delete":          {kindManagement, "DELETE", modelInBodyName},
	"/api/copy":            {kindManagement, "POST", modelNone},
	"/api/create":          {kindManagement, "POST", modelNone},
	"/api/push":            {kindManagement, "POST", modelInBodyName},
}

var prefixRoutes = []struct {
	prefix string
	route  route
}{
	{"/v1/models/", route{kindModelRead, "GET", modelInPath}},
	{"/api/blobs/", route{kindManagement, "HEAD, POST", modelNone}},
}

// classify maps a request to its route. ok is false for an unknown path;
// allowed is false for a known path with a method it does not take.
func classify(method, path string) (rt route, ok, allowed bool) {
	rt, ok = routes[path]
	if !ok {
		for _, p := range prefixRoutes {
			if strings.HasPrefix(path, p.prefix) && len(path) > len(p.prefix) && !strings.Contains(path[len(p.prefix):], "/") {
				rt, ok = p.route, true
				break
			}
		}
	}
	if !ok {
		return rt, false, false
	}
	for ms := rt.methods; ms != ""; {
		var m string
		m, ms, _ = strings.Cut(ms, ", ")
		if m == method {
			return rt, true, true
		}
	}
	return rt, true, false
}

func apiOf(path string) apiFormat {
	if strings.HasPrefix(path, "/v1/") {
		return apiOpenAI
	}
	return apiOllama
}

// fail writes an error in the format of the API the request came in on.
// It returns nil: the response is complete, Caddy has nothing to add.
func (h *Handler) fail(w http.ResponseWriter, api apiFormat, status int, msg string) error {
	return h.failCode(w, api, status, nil, msg)
}

// failCode is fail with an explicit OpenAI error code (nil: by status).
func (h *Handler) failCode(w http.ResponseWriter, api apiFormat, status int, code any, msg string) error {
	typ, byStatus := openAIErrorKind(status)
	if code == nil {
		code = byStatus
	}
	body := errorBody(api, msg, typ, code)
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json; charset=utf-8")
	hdr.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
	return nil
}

// errorBody is msg as an error document in the format of api: Ollama's
// {"error":"…"} or OpenAI's {"error":{"message":…,"type":…,"code":…}}
// (typ and code are for OpenAI only). Every error the handler writes, whole
// answers and stream ends alike, is built here so both APIs' shapes live in
// one place.
func errorBody(api apiFormat, msg, typ string, code any) []byte {
	var body []byte
	if api == apiOpenAI {
		body, _ = json.Marshal(map[string]any{"error": map[string]any{"message": msg, "type": typ, "code": code}})
	} else {
		body, _ = json.Marshal(map[string]string{"error": msg})
	}
	return body
}

// openAIErrorKind maps a status to the error type and code OpenAI clients
// expect.
func openAIErrorKind(status int) (typ string, code any) {
	switch status {
	case http.StatusBadRequest, http.StatusMethodNotAllowed:
		return "invalid_request_error", nil
	case http.StatusUnauthorized:
		return "invalid_request_error", "invalid_api_key"
	case http.StatusForbidden:
		return "permission_error", "forbidden"
	case http.StatusNotFound:
		return "invalid_request_error", "not_found"
	case http.StatusRequestEntityTooLarge:
		return "invalid_request_error", "request_too_large"
	case http.StatusTooManyRequests:
		return "rate_limit_error", "queue_full"
	case http.StatusGatewayTimeout:
		return "server_error", "timeout"
	default:
		return "server_error", nil
	}
}
