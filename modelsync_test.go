package ollamaflow

import "testing"

func TestNormalizeModel(t *testing.T) {
	cases := []struct{ in, want string }{
		{"llama3", "llama3:latest"},
		{"llama3:latest", "llama3:latest"},
		{"llama3:70b", "llama3:70b"},
		{"Llama3:70B", "llama3:70b"},
		{"  llama3 ", "llama3:latest"},
		{"registry.ollama.ai/library/llama3", "llama3:latest"},
		{"registry.ollama.ai/library/llama3:8b", "llama3:8b"},
		{"library/llama3", "llama3:latest"},
		{"registry.ollama.ai/jmorgan/tiny:q4", "jmorgan/tiny:q4"},
		{"registry.internal:5000/library/llama3.2", "registry.internal:5000/library/llama3.2:latest"},
		{"registry.internal:5000/library/llama3.2:1b", "registry.internal:5000/library/llama3.2:1b"},
		{"", ""},
	}
	for _, c := range cases {
		if got := normalizeModel(c.in); got != c.want {
			t.Errorf("normalizeModel(%q) = %q, want %q", c.in, got, c.want)
		}
	}
	if normalizeModel("llama3") == normalizeModel("llama3:70b") {
		t.Error("llama3 must not match llama3:70b")
	}
}

func TestMarkLoaded(t *testing.T) {
	s := &server{}
	s.models.Store(&modelSnapshot{known: true, present: map[string][]byte{"a:latest": []byte(`{}`), "b:latest": []byte(`{}`)}, loaded: map[string][]byte{}})
	before := s.models.Load()
	s.markLoaded("a:latest")
	if !s.models.Load().isLoaded("a:latest") {
		t.Fatal("a request that completed marks its model loaded")
	}
	if has, _ := s.models.Load().has("b:latest"); !has {
		t.Fatal("other models stay")
	}
	if before.isLoaded("a:latest") {
		t.Fatal("snapshots are never modified in place")
	}
}
