package fakeollama

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"
)

// The OpenAI-compatible API, answered the way Ollama v0.17.4 answers it. Quirks kept on purpose:
//   - errors found while parsing the request (bad JSON, no messages) are
//     {"error":{"message","type","param":null,"code":null}} with the type of their status and
//     "application/json; charset=utf-8"; errors from the model layer (unknown model) keep their
//     status but always have type "api_error", "application/json" and a trailing newline;
//   - streams are "text/event-stream", one "data: {json}\n\n" event per token; the final event
//     (finish_reason set), the usage event (stream_options.include_usage, "choices":[]) and
//     "data: [DONE]\n\n" arrive in one write;
//   - /v1/completions chunks have object "text_completion" and, with include_usage, carry zero
//     usage on every chunk;
//   - /v1/models lists "data":null when there are no models.

const jsonPlain = "application/json"

type oaiMessage struct {
	Role    string `json:"role"`
	Content any    `json:"content"`
}

type oaiUsage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func usage(m metrics) oaiUsage {
	return oaiUsage{m.PromptEvalCount, m.EvalCount, m.PromptEvalCount + m.EvalCount}
}

type oaiStreamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type oaiChoice struct {
	Index        int         `json:"index"`
	Message      *oaiMessage `json:"message,omitempty"`
	Delta        *oaiMessage `json:"delta,omitempty"`
	FinishReason *string     `json:"finish_reason"`
}

type oaiChat struct {
	ID                string      `json:"id"`
	Object            string      `json:"object"`
	Created           int64       `json:"created"`
	Model             string      `json:"model"`
	SystemFingerprint string      `json:"system_fingerprint"`
	Choices           []oaiChoice `json:"choices"`
	Usage             *oaiUsage   `json:"usage,omitempty"`
}

type oaiTextChoice struct {
	Text         string  `json:"text"`
	Index        int     `json:"index"`
	FinishReason *string `json:"finish_reason"`
}

// oaiTextChunk has Ollama's field order for completion chunks: choices before model.
type oaiTextChunk struct {
	ID                string          `json:"id"`
	Object            string          `json:"object"`
	Created           int64           `json:"created"`
	Choices           []oaiTextChoice `json:"choices"`
	Model             string          `json:"model"`
	SystemFingerprint string          `json:"system_fingerprint"`
	Usage             *oaiUsage       `json:"usage,omitempty"`
}

type oaiText struct {
	ID                string          `json:"id"`
	Object            string          `json:"object"`
	Created           int64           `json:"created"`
	Model             string          `json:"model"`
	SystemFingerprint string          `json:"system_fingerprint"`
	Choices           []oaiTextChoice `json:"choices"`
	Usage             oaiUsage        `json:"usage"`
}

func (s *Server) openaiChat(c *call) {
	var req struct {
		Model         string            `json:"model"`
		Messages      []oaiMessage      `json:"messages"`
		Stream        bool              `json:"stream"`
		StreamOptions *oaiStreamOptions `json:"stream_options"`
		MaxTokens     *int              `json:"max_tokens"`
	}
	if !c.decodeOpenAI(&req) {
		return
	}
	if len(req.Messages) == 0 {
		c.openaiRequestError(http.StatusBadRequest, "[] is too short - 'messages'")
		return
	}
	if strings.TrimSpace(req.Model) == "" {
		c.openaiModelError(http.StatusBadRequest, "model is required")
		return
	}
	m, ok := s.lookup(req.Model)
	if !ok {
		c.openaiModelError(http.StatusNotFound, fmt.Sprintf("model '%s' not found", req.Model))
		return
	}
	if m.embed {
		c.openaiModelError(http.StatusBadRequest, cannot(req.Model, "chat"))
		return
	}
	var msgs []message
	for _, msg := range req.Messages {
		msgs = append(msgs, message{Role: msg.Role, Content: contentText(msg.Content)})
	}
	p := s.plan(m, deref(req.MaxTokens), promptOf(nil, msgs...))
	id := fmt.Sprintf("chatcmpl-%d", rand.IntN(999))
	chunk := func(delta string, finish *string) oaiChat {
		return oaiChat{ID: id, Object: "chat.completion.chunk", Created: time.Now().Unix(), Model: req.Model,
			SystemFingerprint: "fp_ollama", Choices: []oaiChoice{{Delta: &oaiMessage{Role: "assistant", Content: delta}, FinishReason: finish}}}
	}
	if req.Stream {
		c.streaming = true
		c.header(http.StatusOK, "text/event-stream")
		mt, ok := c.run(p, func(tok string) bool { return c.event(chunk(tok, nil)) })
		if !ok {
			return
		}
		var end bytes.Buffer
		writeEvent(&end, chunk("", &p.reason))
		if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
			u := chunk("", nil)
			u.Choices, u.Usage = []oaiChoice{}, ptr(usage(mt))
			writeEvent(&end, u)
		}
		end.WriteString("data: [DONE]\n\n")
		c.chunk(end.Bytes())
		return
	}
	var text strings.Builder
	created := time.Now()
	mt, ok := c.run(p, func(tok string) bool { text.WriteString(tok); return true })
	if !ok {
		return
	}
	c.openaiJSON(oaiChat{ID: id, Object: "chat.completion", Created: created.Unix(), Model: req.Model, SystemFingerprint: "fp_ollama",
		Choices: []oaiChoice{{Message: &oaiMessage{Role: "assistant", Content: text.String()}, FinishReason: &p.reason}},
		Usage:   ptr(usage(mt))})
}

func (s *Server) openaiCompletion(c *call) {
	var req struct {
		Model         string            `json:"model"`
		Prompt        string            `json:"prompt"`
		Stream        bool              `json:"stream"`
		StreamOptions *oaiStreamOptions `json:"stream_options"`
		MaxTokens     *int              `json:"max_tokens"`
	}
	if !c.decodeOpenAI(&req) {
		return
	}
	m, ok := s.lookup(req.Model)
	if !ok {
		c.openaiModelError(http.StatusNotFound, fmt.Sprintf("model '%s' not found", req.Model))
		return
	}
	if m.embed {
		c.openaiModelError(http.StatusBadRequest, cannot(req.Model, "generate"))
		return
	}
	p := s.plan(m, deref(req.MaxTokens), promptOf(nil, message{Role: "user", Content: req.Prompt}))
	id := fmt.Sprintf("cmpl-%d", rand.IntN(999))
	withUsage := req.StreamOptions != nil && req.StreamOptions.IncludeUsage
	chunk := func(text string, finish *string) oaiTextChunk {
		ch := oaiTextChunk{ID: id, Object: "text_completion", Created: time.Now().Unix(), Model: req.Model,
			SystemFingerprint: "fp_ollama", Choices: []oaiTextChoice{{Text: text, FinishReason: finish}}}
		if withUsage {
			ch.Usage = &oaiUsage{}
		}
		return ch
	}
	if req.Stream {
		c.streaming = true
		c.header(http.StatusOK, "text/event-stream")
		mt, ok := c.run(p, func(tok string) bool { return c.event(chunk(tok, nil)) })
		if !ok {
			return
		}
		var end bytes.Buffer
		writeEvent(&end, chunk("", &p.reason))
		if withUsage {
			u := chunk("", nil)
			u.Choices, u.Usage = []oaiTextChoice{}, ptr(usage(mt))
			writeEvent(&end, u)
		}
		end.WriteString("data: [DONE]\n\n")
		c.chunk(end.Bytes())
		return
	}
	var text strings.Builder
	created := time.Now()
	mt, ok := c.run(p, func(tok string) bool { text.WriteString(tok); return true })
	if !ok {
		return
	}
	c.openaiJSON(oaiText{ID: id, Object: "text_completion", Created: created.Unix(), Model: req.Model, SystemFingerprint: "fp_ollama",
		Choices: []oaiTextChoice{{Text: text.String(), FinishReason: &p.reason}}, Usage: usage(mt)})
}

func (s *Server) openaiEmbeddings(c *call) {
	var req struct {
		Input          any    `json:"input"`
		Model          string `json:"model"`
		Dimensions     int    `json:"dimensions"`
		EncodingFormat string `json:"encoding_format"`
	}
	if !c.decodeOpenAI(&req) {
		return
	}
	if f := req.EncodingFormat; f != "" && !strings.EqualFold(f, "float") && !strings.EqualFold(f, "base64") {
		c.openaiRequestError(http.StatusBadRequest, fmt.Sprintf("Invalid value for 'encoding_format' = %s. Supported values: ['float', 'base64'].", f))
		return
	}
	if req.Input == "" {
		req.Input = []any{""}
	}
	if a, isArray := req.Input.([]any); req.Input == nil || isArray && len(a) == 0 {
		c.openaiRequestError(http.StatusBadRequest, "invalid input")
		return
	}
	inputs, ok := embedInputs(req.Input)
	if !ok {
		c.openaiModelError(http.StatusBadRequest, "invalid input type")
		return
	}
	if strings.TrimSpace(req.Model) == "" {
		c.openaiModelError(http.StatusInternalServerError, unqualifiedEmpty)
		return
	}
	m, ok := s.lookup(req.Model)
	if !ok {
		c.openaiModelError(http.StatusNotFound, notFoundTryPulling(req.Model))
		return
	}
	vecs, mt, ok := c.embedAll(m, inputs)
	if !ok {
		return
	}
	type item struct {
		Object    string `json:"object"`
		Embedding any    `json:"embedding"`
		Index     int    `json:"index"`
	}
	var data []item
	for i, v := range vecs {
		if d := req.Dimensions; d > 0 && d < len(v) {
			v = normalize(v[:d])
		}
		var e any = v
		if strings.EqualFold(req.EncodingFormat, "base64") {
			var b bytes.Buffer
			binary.Write(&b, binary.LittleEndian, v)
			e = base64.StdEncoding.EncodeToString(b.Bytes())
		}
		data = append(data, item{"embedding", e, i})
	}
	type embedUsage struct {
		PromptTokens int `json:"prompt_tokens"`
		TotalTokens  int `json:"total_tokens"`
	}
	c.openaiJSON(struct {
		Object string     `json:"object"`
		Data   []item     `json:"data"`
		Model  string     `json:"model"`
		Usage  embedUsage `json:"usage"`
	}{"list", data, req.Model, embedUsage{mt.PromptEvalCount, mt.PromptEvalCount}})
}

type oaiModel struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

func (s *Server) openaiModels(c *call) {
	var data []oaiModel // null when empty, as in Ollama
	s.mu.Lock()
	for _, m := range s.models {
		data = append(data, oaiModel{m.name, "model", m.modified.Unix(), namespace(m.name)})
	}
	s.mu.Unlock()
	c.openaiJSON(struct {
		Object string     `json:"object"`
		Data   []oaiModel `json:"data"`
	}{"list", data})
}

func (s *Server) openaiModel(c *call) {
	name := strings.TrimPrefix(c.r.URL.Path, "/v1/models/")
	m, ok := s.lookup(name)
	if !ok {
		c.openaiModelError(http.StatusNotFound, fmt.Sprintf("model '%s' not found", name))
		return
	}
	c.openaiJSON(oaiModel{name, "model", m.modified.Unix(), namespace(name)})
}

// namespace is the namespace Ollama reports as owned_by: "library" unless the name has one.
func namespace(name string) string {
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		name = name[:i]
	}
	parts := strings.Split(name, "/")
	if len(parts) >= 2 {
		return parts[len(parts)-2]
	}
	return "library"
}

// contentText is the text of an OpenAI message content: a string or an array of parts.
func contentText(content any) string {
	switch v := content.(type) {
	case string:
		return v
	case []any:
		var b strings.Builder
		for _, p := range v {
			if part, ok := p.(map[string]any); ok {
				if t, ok := part["text"].(string); ok {
					b.WriteString(t + " ")
				}
			}
		}
		return b.String()
	}
	return ""
}

func (c *call) decodeOpenAI(v any) bool {
	if err := json.NewDecoder(bytes.NewReader(c.body)).Decode(v); err != nil {
		c.openaiRequestError(http.StatusBadRequest, err.Error())
		return false
	}
	return true
}

type oaiError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   any     `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func newOAIError(typ, msg string) oaiError {
	var e oaiError
	e.Error.Type, e.Error.Message = typ, msg
	return e
}

// openaiRequestError is an error of Ollama's OpenAI middleware (the request did not parse).
func (c *call) openaiRequestError(status int, msg string) {
	typ := "api_error"
	switch status {
	case http.StatusBadRequest:
		typ = "invalid_request_error"
	case http.StatusNotFound:
		typ = "not_found_error"
	}
	c.json(status, newOAIError(typ, msg))
}

// openaiModelError is an error of Ollama's handlers seen through the OpenAI middleware.
func (c *call) openaiModelError(status int, msg string) {
	c.header(status, "")
	c.openaiJSON(newOAIError("api_error", msg))
}

// openaiJSON answers v as Ollama's OpenAI writers do: "application/json", trailing newline.
func (c *call) openaiJSON(v any) bool {
	var b bytes.Buffer
	if err := json.NewEncoder(&b).Encode(v); err != nil {
		panic(err)
	}
	c.w.Header().Set("Content-Type", jsonPlain)
	return c.send(b.Bytes(), false)
}

// event writes v as one server-sent event.
func (c *call) event(v any) bool {
	var b bytes.Buffer
	writeEvent(&b, v)
	return c.chunk(b.Bytes())
}

func writeEvent(b *bytes.Buffer, v any) {
	d, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	b.WriteString("data: ")
	b.Write(d)
	b.WriteString("\n\n")
}

func ptr[T any](v T) *T { return &v }

func deref(p *int) int {
	if p == nil {
		return 0
	}
	return *p
}
