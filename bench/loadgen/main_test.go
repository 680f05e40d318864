package main

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

func TestOneCountsIncompleteResponsesAsErrors(t *testing.T) {
	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 8})
	defer f.Close()
	client := newClient(1)
	url := f.URL + "/api/chat"

	assert.NoError(t, one(client, url, chatBody("tiny-llama", true), true))
	assert.NoError(t, one(client, url, chatBody("tiny-llama", false), false))
	assert.EqualError(t, one(client, url, chatBody("nope", true), true), "status 404")

	f.DieMidStream(3)
	assert.EqualError(t, one(client, url, chatBody("tiny-llama", true), true), "short stream (cut)")
	f.DieMidStream(0)
	assert.EqualError(t, one(client, url, chatBody("tiny-llama", false), false), "body cut")

	f.ClearFaults()
	f.FailWith(http.StatusServiceUnavailable, fakeollama.ServerBusy)
	assert.EqualError(t, one(client, url, chatBody("tiny-llama", true), true), "status 503")
}
