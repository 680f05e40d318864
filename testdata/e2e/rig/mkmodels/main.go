// Command mkmodels writes the e2e rig's two tiny models, and a Modelfile for
// each, into a directory:
//
//	go run ./rig/mkmodels DIR    (from testdata/e2e)
//
// tiny-llama is a generation model (llama architecture, SentencePiece vocabulary
// with byte fallback) and tiny-bert an embedding model (bert architecture,
// WordPiece vocabulary, mean pooling, 32 dimensions). Their weights are random
// with a fixed seed, so every run writes the same bytes, and what they say is
// gibberish: the suite tests the proxy, not the model. The files are written
// with Ollama's own GGUF writer, so Ollama reads them as it reads any model.
//
// The suite relies on two properties. tiny-llama never emits an end-of-text,
// control or byte token, so each generated token is one visible stream chunk
// and generation always runs to num_predict. tiny-bert returns vectors of 32
// dimensions.
package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/ollama/ollama/fs/ggml"
)

// GGUF token types (llama.cpp's llama_token_type).
const (
	tokNormal  int32 = 1
	tokUnknown int32 = 2
	tokControl int32 = 3
	tokByte    int32 = 6
)

// ggmlF32 is GGML's tensor type number for 32-bit floats.
const ggmlF32 = 0

// spaceMark is SentencePiece's word-boundary marker (U+2581), which both
// tokenizers here use to mark a token that starts a word.
const spaceMark = "\u2581"

// words give both vocabularies some whole-word tokens, so prompts in plain
// English tokenize into a few tokens rather than one per letter.
var words = []string{
	"hi", "hello", "the", "a", "is", "of", "and", "to", "in", "on", "it", "you", "we",
	"model", "server", "proxy", "backend", "request", "reply", "stream", "token",
	"chat", "embed", "prompt", "answer", "fast", "slow", "ok", "why", "what", "how",
}

// vocab collects tokens in id order. Duplicates are dropped: llama.cpp refuses
// a vocabulary that repeats a token.
type vocab struct {
	tokens []string
	types  []int32
	scores []float32
	have   map[string]bool
}

func (v *vocab) add(tok string, typ int32, score float32) {
	if v.have == nil {
		v.have = map[string]bool{}
	}
	if v.have[tok] {
		return
	}
	v.have[tok] = true
	v.tokens = append(v.tokens, tok)
	v.types = append(v.types, typ)
	v.scores = append(v.scores, score)
}

func (v *vocab) size() uint64 { return uint64(len(v.tokens)) }

// floats is a tensor's data, written little-endian as GGUF stores it.
type floats []float32

func (f floats) WriteTo(w io.Writer) (int64, error) {
	if err := binary.Write(w, binary.LittleEndian, []float32(f)); err != nil {
		return 0, err
	}
	return int64(4 * len(f)), nil
}

// builder makes tensors from one seeded source, so the output is reproducible.
type builder struct {
	rnd     *rand.Rand
	tensors []*ggml.Tensor
}

// tensor adds a tensor of the given shape (GGUF order: the innermost
// dimension first) whose i-th element is value(i).
func (b *builder) tensor(name string, value func(i int) float32, shape ...uint64) {
	n := uint64(1)
	for _, d := range shape {
		n *= d
	}
	data := make(floats, n)
	for i := range data {
		data[i] = value(i)
	}
	b.tensors = append(b.tensors, &ggml.Tensor{Name: name, Kind: ggmlF32, Shape: shape, WriterTo: data})
}

func (b *builder) normal(scale float32) func(int) float32 {
	return func(int) float32 { return float32(b.rnd.NormFloat64()) * scale }
}

func constant(c float32) func(int) float32 { return func(int) float32 { return c } }

func tinyLlama() (ggml.KV, []*ggml.Tensor) {
	const (
		dim     = 64
		blocks  = 2
		heads   = 4
		hidden  = 128
		context = 2048
	)
	var v vocab
	v.add("<unk>", tokUnknown, 0)
	v.add("<s>", tokControl, 0)
	v.add("</s>", tokControl, 0)
	for c := range 256 {
		v.add(fmt.Sprintf("<0x%02X>", c), tokByte, 0)
	}
	v.add(spaceMark, tokNormal, -1)
	for c := '!'; c <= '~'; c++ {
		v.add(string(c), tokNormal, -2)
		if c >= 'a' && c <= 'z' {
			v.add(spaceMark+string(c), tokNormal, -1.5)
		}
	}
	for i, w := range words {
		v.add(spaceMark+w, tokNormal, -float32(i)/64)
	}

	kv := ggml.KV{
		"general.architecture":                   "llama",
		"general.name":                           "ollamaflow-e2e-tiny-llama",
		"general.file_type":                      uint32(0), // all F32
		"llama.vocab_size":                       uint32(v.size()),
		"llama.context_length":                   uint32(context),
		"llama.embedding_length":                 uint32(dim),
		"llama.block_count":                      uint32(blocks),
		"llama.feed_forward_length":              uint32(hidden),
		"llama.attention.head_count":             uint32(heads),
		"llama.attention.head_count_kv":          uint32(heads),
		"llama.attention.layer_norm_rms_epsilon": float32(1e-5),
		"llama.rope.dimension_count":             uint32(dim / heads),
		"llama.rope.freq_base":                   float32(10000),
		"tokenizer.ggml.model":                   "llama",
		"tokenizer.ggml.tokens":                  v.tokens,
		"tokenizer.ggml.token_type":              v.types,
		"tokenizer.ggml.scores":                  v.scores,
		"tokenizer.ggml.unknown_token_id":        uint32(0),
		"tokenizer.ggml.bos_token_id":            uint32(1),
		"tokenizer.ggml.eos_token_id":            uint32(2),
		"tokenizer.ggml.add_bos_token":           true,
		"tokenizer.ggml.add_eos_token":           false,
	}

	b := builder{rnd: rand.New(rand.NewPCG(0x011a3a, 1))}
	b.tensor("token_embd.weight", b.normal(0.5), dim, v.size())
	b.tensor("output_norm.weight", constant(1), dim)
	// The output projection decides what can be generated: a token whose row
	// is zero always scores 0, while the rows of ordinary tokens are large, so
	// the default top_k (40) only ever holds ordinary tokens. Never ending
	// early and never emitting half a UTF-8 sequence (byte tokens) is what
	// makes "one chunk per token, num_predict tokens" hold.
	b.tensor("output.weight", func(i int) float32 {
		if v.types[i/dim] != tokNormal {
			return 0
		}
		return float32(b.rnd.NormFloat64()) * 2
	}, dim, v.size())
	for blk := range blocks {
		p := fmt.Sprintf("blk.%d.", blk)
		b.tensor(p+"attn_norm.weight", constant(1), dim)
		for _, n := range []string{"attn_q", "attn_k", "attn_v", "attn_output"} {
			b.tensor(p+n+".weight", b.normal(0.1), dim, dim)
		}
		b.tensor(p+"ffn_norm.weight", constant(1), dim)
		b.tensor(p+"ffn_gate.weight", b.normal(0.1), dim, hidden)
		b.tensor(p+"ffn_up.weight", b.normal(0.1), dim, hidden)
		b.tensor(p+"ffn_down.weight", b.normal(0.1), hidden, dim)
	}
	return kv, b.tensors
}

func tinyBert() (ggml.KV, []*ggml.Tensor) {
	const (
		dim     = 32 // the embedding dimension /api/embed returns
		blocks  = 2
		heads   = 2
		hidden  = 64
		context = 512
	)
	var v vocab
	for _, s := range []string{"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"} {
		typ := tokControl
		if s == "[UNK]" {
			typ = tokUnknown
		}
		v.add(s, typ, 0)
	}
	// GGML's WordPiece: a token with the marker starts a word, one without
	// continues it (what Hugging Face writes as "##x"). BERT lowercases input,
	// so capitals are left out.
	for c := '!'; c <= '~'; c++ {
		if c >= 'A' && c <= 'Z' {
			continue
		}
		v.add(spaceMark+string(c), tokNormal, 0)
		v.add(string(c), tokNormal, 0)
	}
	for _, w := range words {
		v.add(spaceMark+w, tokNormal, 0)
	}

	kv := ggml.KV{
		"general.architecture":              "bert",
		"general.name":                      "ollamaflow-e2e-tiny-bert",
		"general.file_type":                 uint32(0),
		"bert.context_length":               uint32(context),
		"bert.embedding_length":             uint32(dim),
		"bert.block_count":                  uint32(blocks),
		"bert.feed_forward_length":          uint32(hidden),
		"bert.attention.head_count":         uint32(heads),
		"bert.attention.layer_norm_epsilon": float32(1e-12),
		"bert.attention.causal":             false,
		"bert.pooling_type":                 uint32(1), // mean
		"tokenizer.ggml.model":              "bert",
		"tokenizer.ggml.tokens":             v.tokens,
		"tokenizer.ggml.token_type":         v.types,
		"tokenizer.ggml.padding_token_id":   uint32(0),
		"tokenizer.ggml.unknown_token_id":   uint32(1),
		"tokenizer.ggml.cls_token_id":       uint32(2),
		// The key is spelled this way in llama.cpp and in every BERT GGUF.
		"tokenizer.ggml.seperator_token_id": uint32(3),
		"tokenizer.ggml.mask_token_id":      uint32(4),
		"tokenizer.ggml.add_bos_token":      true,
		"tokenizer.ggml.add_eos_token":      true,
	}

	b := builder{rnd: rand.New(rand.NewPCG(0xbe27, 2))}
	b.tensor("token_embd.weight", b.normal(0.5), dim, v.size())
	b.tensor("token_types.weight", b.normal(0.1), dim, 2)
	b.tensor("position_embd.weight", b.normal(0.1), dim, context)
	b.tensor("token_embd_norm.weight", constant(1), dim)
	b.tensor("token_embd_norm.bias", constant(0), dim)
	for blk := range blocks {
		p := fmt.Sprintf("blk.%d.", blk)
		for _, n := range []string{"attn_q", "attn_k", "attn_v", "attn_output"} {
			b.tensor(p+n+".weight", b.normal(0.1), dim, dim)
			b.tensor(p+n+".bias", constant(0), dim)
		}
		b.tensor(p+"attn_output_norm.weight", constant(1), dim)
		b.tensor(p+"attn_output_norm.bias", constant(0), dim)
		b.tensor(p+"ffn_up.weight", b.normal(0.1), dim, hidden)
		b.tensor(p+"ffn_up.bias", constant(0), hidden)
		b.tensor(p+"ffn_down.weight", b.normal(0.1), hidden, dim)
		b.tensor(p+"ffn_down.bias", constant(0), dim)
		b.tensor(p+"layer_output_norm.weight", constant(1), dim)
		b.tensor(p+"layer_output_norm.bias", constant(0), dim)
	}
	return kv, b.tensors
}

// Modelfiles. num_thread 1: two busy servers with two threads each starve one
// another on a 2-core machine. tiny-llama's template is a plain role-tagged
// transcript; num_predict bounds a request that sets none.
const (
	llamaModelfile = "FROM ./tiny-llama.gguf\n" +
		"TEMPLATE \"\"\"{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}\n{{ end }}<|assistant|>\"\"\"\n" +
		"PARAMETER num_predict 32\n" +
		"PARAMETER num_ctx 512\n" +
		"PARAMETER num_thread 1\n"
	bertModelfile = "FROM ./tiny-bert.gguf\n" +
		"PARAMETER num_thread 1\n"
)

// writeAtomically writes a file next to its final name and renames it, so a
// reader (or an interrupted run) never sees half a model.
func writeAtomically(path string, write func(*os.File) error) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".mkmodels-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := write(tmp); err != nil {
		tmp.Close()
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func run(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, m := range []struct {
		name      string
		build     func() (ggml.KV, []*ggml.Tensor)
		modelfile string
	}{
		{"tiny-llama", tinyLlama, llamaModelfile},
		{"tiny-bert", tinyBert, bertModelfile},
	} {
		kv, tensors := m.build()
		gguf := filepath.Join(dir, m.name+".gguf")
		if err := writeAtomically(gguf, func(f *os.File) error { return ggml.WriteGGUF(f, kv, tensors) }); err != nil {
			return err
		}
		mf := filepath.Join(dir, "Modelfile."+m.name)
		if err := writeAtomically(mf, func(f *os.File) error { _, err := f.WriteString(m.modelfile); return err }); err != nil {
			return err
		}
		st, err := os.Stat(gguf)
		if err != nil {
			return err
		}
		fmt.Printf("%s: %d bytes, %d tensors\n", gguf, st.Size(), len(tensors))
	}
	return nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: mkmodels DIR")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "mkmodels:", err)
		os.Exit(1)
	}
}
