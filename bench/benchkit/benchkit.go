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
