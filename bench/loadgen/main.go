// Command loadgen is a closed-loop load generator for Ollama-compatible endpoints: each of -c
// workers sends a chat request, reads the whole response, checks it, and sends the next.
//
// It compares targets: every scenario (non-streaming and streaming chat at each concurrency)
// gets a warm-up per target, then -rounds rounds that alternate between the targets, and the
// result is a table of requests/s and latency percentiles with the ratio of the second target
// to the first (the median of the per-round ratios).
//
//	loadgen -target rp=http://127.0.0.1:8001 -target of=http://127.0.0.1:8002 -d 5s -rounds 3
//	loadgen -free-ports 5   # prints 5 free TCP ports of 127.0.0.1, for scripts
//
// A response counts as an error when its status is not 200, its body cannot be read to the end,
// or it lacks the final "done":true object (a short stream).
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

type target struct{ name, url string }

type targets []target

func (t *targets) String() string { return fmt.Sprint(*t) }

func (t *targets) Set(v string) error {
	name, url, ok := strings.Cut(v, "=")
	if !ok || name == "" || url == "" {
		return fmt.Errorf("want NAME=URL, got %q", v)
	}
	*t = append(*t, target{name, strings.TrimRight(url, "/")})
	return nil
}

type scenario struct {
	name   string
	stream bool
	conc   int
}

type result struct {
	n, errs  int
	elapsed  time.Duration
	p50, p99 time.Duration
	errKinds map[string]int
}

func (r result) rps() float64 { return float64(r.n) / r.elapsed.Seconds() }

func main() {
	var tgts targets
	flag.Var(&tgts, "target", "NAME=URL of a target (repeat; the first is the baseline)")
	dur := flag.Duration("d", 5*time.Second, "duration of each measured run")
	warm := flag.Duration("warmup", time.Second, "warm-up per target and scenario")
	rounds := flag.Int("rounds", 3, "measured rounds per target and scenario")
	concs := flag.String("c", "1,32", "comma-separated concurrencies")
	model := flag.String("model", "tiny-llama", "model to ask for")
	modes := flag.String("modes", "chat,chat-stream", "comma-separated scenarios: chat (stream:false), chat-stream (NDJSON)")
	freePorts := flag.Int("free-ports", 0, "print this many free ports of 127.0.0.1 and exit")
	flag.Parse()

	if *freePorts > 0 {
		printFreePorts(*freePorts)
		return
	}
	if len(tgts) == 0 {
		fmt.Fprintln(os.Stderr, "loadgen: at least one -target NAME=URL")
		os.Exit(2)
	}

	var scenarios []scenario
	for _, m := range strings.Split(*modes, ",") {
		for _, c := range strings.Split(*concs, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(c))
			if err != nil || n < 1 {
				fmt.Fprintf(os.Stderr, "loadgen: bad concurrency %q\n", c)
				os.Exit(2)
			}
			m = strings.TrimSpace(m)
			if m != "chat" && m != "chat-stream" {
				fmt.Fprintf(os.Stderr, "loadgen: unknown mode %q\n", m)
				os.Exit(2)
			}
			scenarios = append(scenarios, scenario{fmt.Sprintf("%s c=%d", m, n), m == "chat-stream", n})
		}
	}

	all := map[string][][]result{} // scenario -> round -> per target
	failed := false
	for _, sc := range scenarios {
		client := newClient(sc.conc)
		body := chatBody(*model, sc.stream)
		for _, t := range tgts {
			r := run(client, t.url, body, sc, *warm)
			fmt.Fprintf(os.Stderr, "%-16s %-4s warm-up  %8.1f req/s  errors %d\n", sc.name, t.name, r.rps(), r.errs)
		}
		for round := range *rounds {
			var row []result
			for _, t := range tgts {
				r := run(client, t.url, body, sc, *dur)
				row = append(row, r)
				fmt.Fprintf(os.Stderr, "%-16s %-4s round %d  %8.1f req/s  p50 %-9v p99 %-9v errors %d %v\n",
					sc.name, t.name, round+1, r.rps(), r.p50.Round(time.Microsecond), r.p99.Round(time.Microsecond), r.errs, kinds(r))
				failed = failed || r.errs > 0
			}
			all[sc.name] = append(all[sc.name], row)
		}
		client.CloseIdleConnections()
	}
	printTable(os.Stdout, tgts, scenarios, all)
	if failed {
		os.Exit(1)
	}
}

func newClient(conc int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        conc * 2,
		MaxIdleConnsPerHost: conc * 2,
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
	}}
}

func chatBody(model string, stream bool) []byte {
	s := ""
	if !stream {
		s = `,"stream":false`
	}
	return fmt.Appendf(nil, `{"model":%q,"messages":[{"role":"user","content":"Why is the sky blue?"}]%s}`, model, s)
}

// run drives url with sc.conc workers for d and measures every completed request.
func run(client *http.Client, url string, body []byte, sc scenario, d time.Duration) result {
	var (
		mu       sync.Mutex
		lat      []time.Duration
		errKinds = map[string]int{}
		wg       sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(d)
	for range sc.conc {
		wg.Go(func() {
			var mine []time.Duration
			mineErr := map[string]int{}
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := one(client, url+"/api/chat", body, sc.stream); err != nil {
					mineErr[err.Error()]++
					time.Sleep(time.Millisecond) // no hot spin against a failing target
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			defer mu.Unlock()
			lat = append(lat, mine...)
			for k, v := range mineErr {
				errKinds[k] += v
			}
		})
	}
	wg.Wait()
	r := result{n: len(lat), elapsed: time.Since(start), errKinds: errKinds}
	for _, v := range errKinds {
		r.errs += v
	}
	slices.Sort(lat)
	r.p50, r.p99 = percentile(lat, 0.50), percentile(lat, 0.99)
	return r
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted)) + 0.5)
	return sorted[min(max(i-1, 0), len(sorted)-1)]
}

// one sends a request and reads its response to the end, checking that it is complete.
func one(client *http.Client, url string, body []byte, stream bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return errors.New("transport error")
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		io.Copy(io.Discard, resp.Body)
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	if !stream {
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return errors.New("body cut")
		}
		if !bytes.Contains(b, []byte(`"done":true`)) {
			return errors.New("incomplete body")
		}
		return nil
	}
	br := bufio.NewReader(resp.Body)
	var last []byte
	lines := 0
	for {
		l, err := br.ReadBytes('\n')
		if len(bytes.TrimSpace(l)) > 0 {
			last = l
			lines++
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return errors.New("short stream (cut)")
		}
	}
	if lines < 2 || !bytes.Contains(last, []byte(`"done":true`)) {
		return errors.New("short stream (no final line)")
	}
	return nil
}

func kinds(r result) string {
	if len(r.errKinds) == 0 {
		return ""
	}
	return fmt.Sprint(r.errKinds)
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ms(d float64) string { return fmt.Sprintf("%.2fms", d/float64(time.Millisecond)) }

// printTable prints the medians over rounds per target and, for each later target, the median
// of its per-round ratios to the first target.
func printTable(w io.Writer, tgts targets, scenarios []scenario, all map[string][][]result) {
	base := tgts[0].name
	head := []string{"scenario"}
	for _, t := range tgts {
		head = append(head, t.name+" req/s")
	}
	for _, t := range tgts[1:] {
		head = append(head, t.name+"/"+base+" req/s")
	}
	for _, t := range tgts {
		head = append(head, t.name+" p50")
	}
	for _, t := range tgts[1:] {
		head = append(head, t.name+"/"+base+" p50")
	}
	for _, t := range tgts {
		head = append(head, t.name+" p99")
	}
	head = append(head, "errors")
	rows := [][]string{head}
	for _, sc := range scenarios {
		rounds := all[sc.name]
		col := func(i int, f func(result) float64) []float64 {
			var v []float64
			for _, row := range rounds {
				v = append(v, f(row[i]))
			}
			return v
		}
		ratio := func(i int, f func(result) float64) float64 {
			var v []float64
			for _, row := range rounds {
				v = append(v, f(row[i])/f(row[0]))
			}
			return median(v)
		}
		rps := func(r result) float64 { return r.rps() }
		p50 := func(r result) float64 { return float64(r.p50) }
		p99 := func(r result) float64 { return float64(r.p99) }
		cells := []string{sc.name}
		for i := range tgts {
			cells = append(cells, fmt.Sprintf("%.0f", median(col(i, rps))))
		}
		for i := 1; i < len(tgts); i++ {
			cells = append(cells, fmt.Sprintf("%.2f", ratio(i, rps)))
		}
		for i := range tgts {
			cells = append(cells, ms(median(col(i, p50))))
		}
		for i := 1; i < len(tgts); i++ {
			cells = append(cells, fmt.Sprintf("%.2f", ratio(i, p50)))
		}
		for i := range tgts {
			cells = append(cells, ms(median(col(i, p99))))
		}
		var errs []string
		for i := range tgts {
			n := 0
			for _, row := range rounds {
				n += row[i].errs
			}
			errs = append(errs, strconv.Itoa(n))
		}
		cells = append(cells, strings.Join(errs, "/"))
		rows = append(rows, cells)
	}
	widths := make([]int, len(head))
	for _, r := range rows {
		for i, c := range r {
			widths[i] = max(widths[i], len(c))
		}
	}
	for ri, r := range rows {
		var b strings.Builder
		for i, c := range r {
			if i == 0 {
				fmt.Fprintf(&b, "| %-*s ", widths[i], c)
			} else {
				fmt.Fprintf(&b, "| %*s ", widths[i], c)
			}
		}
		fmt.Fprintln(w, b.String()+"|")
		if ri == 0 {
			b.Reset()
			for i := range r {
				b.WriteString("|" + strings.Repeat("-", widths[i]+2))
			}
			fmt.Fprintln(w, b.String()+"|")
		}
	}
}

func printFreePorts(n int) {
	var lns []net.Listener
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
			os.Exit(1)
		}
		lns = append(lns, ln)
	}
	var ports []string
	for _, ln := range lns {
		ports = append(ports, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
		ln.Close()
	}
	fmt.Println(strings.Join(ports, " "))
}
