package ollamaflow

import "strings"

// normalizeModel gives the form model names are compared in: lowercase,
// without Ollama's default registry and namespace, with ":latest" when no
// tag is given. Tags must then match exactly: "llama3" is "llama3:latest",
// never "llama3:70b". A registry host with a port keeps its colon: the tag
// is only looked for after the last slash.
func normalizeModel(name string) string {
	n := strings.ToLower(strings.TrimSpace(name))
	n = strings.TrimPrefix(n, "registry.ollama.ai/")
	n = strings.TrimPrefix(n, "library/")
	if n == "" {
		return ""
	}
	last := n[strings.LastIndexByte(n, '/')+1:]
	if !strings.Contains(last, ":") && !strings.Contains(last, "@") {
		n += ":latest"
	}
	return n
}
