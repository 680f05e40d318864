// Package benchkit holds what the benchmark commands under bench/ share:
// loading the in-process Caddy, waiting for a site, free ports, percentiles.
package benchkit

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// Fail prints a message prefixed with the command's name and exits 1.
func Fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, filepath.Base(os.Args[0])+": "+format+"\n", args...)
	os.Exit(1)
}

// Load (re)loads the in-process Caddy with a Caddyfile.
func Load(caddyfile string) {
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		Fail("adapting the Caddyfile: %v\n%s", err, caddyfile)
	}
	for _, w := range warnings {
		fmt.Fprintln(os.Stderr, "caddyfile:", w.String())
	}
	if err := caddy.Load(cfg, true); err != nil {
		Fail("loading the config: %v", err)
	}
}

// WaitUp waits until the site of url proxies a request. It asks for
// /api/version, which names no model, so the policies learn nothing from it
// (a load-only chat would teach least_delay a service time of a millisecond).
func WaitUp(url string) {
	url = strings.TrimSuffix(url, "/api/chat") + "/api/version"
	for range 200 {
		res, err := http.Get(url)
		if err == nil {
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(25 * time.Millisecond)
	}
	Fail("site never came up at %s", url)
}

// FreePort is a loopback TCP port free at the time of the call.
func FreePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		Fail("%v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Pct is the p-quantile (0..1) of lat, rounded to the millisecond.
func Pct(lat []time.Duration, p float64) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	s := slices.Clone(lat)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)].Round(time.Millisecond)
}

// Site is a site block's body fronting the servers at addrs: Caddy's own
// reverse_proxy (least_conn, flushing at once) when policy is
// "reverse_proxy", else an ollamaflow frontend with that lb_policy, one
// backend per name and the extra lines given (subdirectives).
func Site(policy string, names, addrs []string, extra ...string) string {
	if policy == "reverse_proxy" {
		return fmt.Sprintf("\treverse_proxy %s {\n\t\tlb_policy least_conn\n\t\tflush_interval -1\n\t}", strings.Join(addrs, " "))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\tollamaflow {\n\t\tlb_policy %s\n", policy)
	for _, line := range extra {
		fmt.Fprintf(&b, "\t\t%s\n", line)
	}
	for i, name := range names {
		fmt.Fprintf(&b, "\t\tbackend %s %s\n", name, addrs[i])
	}
	b.WriteString("\t}")
	return b.String()
}

// Serve (re)loads the in-process Caddy with site on port, quiet (no
// admin endpoint, errors only in the log), waits until it proxies and
// returns its base URL.
func Serve(port int, site string) string {
	Load(fmt.Sprintf("{\n\tadmin off\n\tpersist_config off\n\tlog {\n\t\tlevel ERROR\n\t}\n}\n:%d {\n%s\n}\n", port, site))
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	WaitUp(base)
	return base
}

// Client is an HTTP client for up to idle concurrent closed-loop clients,
// keeping their connections, with no compression (the proxies forward
// bodies as they are).
func Client(idle int) *http.Client {
	return &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: idle, DisableCompression: true}}
}

// Table renders rows, the first one the header, as a Markdown table with
// padded columns; numbers right-aligns every column after the first.
func Table(rows [][]string, numbers bool) string {
	var b strings.Builder
	widths := make([]int, len(rows[0]))
	for _, r := range rows {
		for i, c := range r {
			widths[i] = max(widths[i], len(c))
		}
	}
	for ri, r := range rows {
		for i, c := range r {
			if numbers && i > 0 {
				fmt.Fprintf(&b, "| %*s ", widths[i], c)
			} else {
				fmt.Fprintf(&b, "| %-*s ", widths[i], c)
			}
		}
		b.WriteString("|\n")
		if ri == 0 {
			for i := range r {
				b.WriteString("|" + strings.Repeat("-", widths[i]+2))
			}
			b.WriteString("|\n")
		}
	}
	return b.String()
}
