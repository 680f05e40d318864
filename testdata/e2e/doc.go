// Package e2e is ollamaflow's end-to-end suite: real Ollama servers, the
// official clients, and Caddy with the module, all on loopback.
//
// It is a module of its own so that the Ollama and OpenAI clients never enter
// the root module's go.mod; it lives under testdata/ so that `go test ./...` at
// the root skips it. It builds ollamaflow from this checkout (a replace
// directive points at ../..).
//
// TestMain starts, in this process's care:
//
//   - three `ollama serve` instances (a, b, c) on free ports of 127.0.0.1, each
//     with its own model store, holding the chat model tiny-llama and the
//     embedding model tiny-bert;
//   - an in-memory OCI registry that Ollama can push to and pull from, for
//     pulls through the proxy and required-model sync;
//   - Caddy, in-process, with ollamaflow in front of the three servers; each
//     scenario loads the config it needs through caddy.Load.
//
// Every scenario is a Test function that leaves the servers as it found them,
// so any subset can run (-run). The suite prints how long setup and each
// scenario took.
//
// Environment:
//
//	OLLAMAFLOW_E2E_OLLAMA   path of the ollama binary (required), e.g. the rig's bin/ollama
//	OLLAMAFLOW_E2E_MODELS   directory holding Modelfile.tiny-llama and Modelfile.tiny-bert and
//	                        the files they name (required), e.g. the rig's models/
//	OLLAMAFLOW_E2E_WORKDIR  where instances keep their stores and logs (default: a temporary
//	                        directory, removed afterwards unless OLLAMAFLOW_E2E_KEEP=1)
//	OLLAMAFLOW_E2E_KEEP     1 keeps the work directory (logs of every server and of Caddy)
//
// The npm scenario needs node and npm on PATH; it runs `npm ci` in node/.
//
// The usual way to run it is ../../.ci/e2e, which builds the rig (rig/setup.sh:
// Ollama from source and the tiny models, written by rig/mkmodels) and sets
// the variables.
package e2e
