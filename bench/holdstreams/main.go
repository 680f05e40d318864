// Command holdstreams opens many streaming chats through a proxy and keeps them open: each
// connection sends one /api/chat with "stream":true, reads the response headers and the first
// NDJSON line, then holds. When every stream has its first chunk it prints "open N" (and how many
// failed) and waits for SIGINT/SIGTERM or for its standard input to close, then closes them all.
// It measures nothing itself: bench/streammem.sh reads the proxy's resident memory meanwhile.
//
//	holdstreams -url http://127.0.0.1:8080 -n 5000 -dial 200
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	target := flag.String("url", "", "base URL of the proxy (http only)")
	n := flag.Int("n", 5000, "streams to open")
	dial := flag.Int("dial", 200, "streams being opened at once")
	model := flag.String("model", "tiny-llama", "model to ask for")
	timeout := flag.Duration("timeout", 30*time.Second, "longest wait for one stream's first chunk")
	flag.Parse()
	u, err := url.Parse(*target)
	if err != nil || u.Scheme != "http" || u.Host == "" {
		fmt.Fprintln(os.Stderr, "holdstreams: -url must be an http:// URL")
		os.Exit(2)
	}
	body := fmt.Sprintf(`{"model":%q,"stream":true,"messages":[{"role":"user","content":"hi"}]}`, *model)
	req := fmt.Sprintf("POST /api/chat HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		u.Host, len(body), body)

	var (
		mu    sync.Mutex
		conns []net.Conn
		fails = map[string]int{}
		wg    sync.WaitGroup
		slots = make(chan struct{}, *dial)
	)
	started := time.Now()
	for range *n {
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			c, err := open(u.Host, req, *timeout)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				fails[err.Error()]++
				return
			}
			conns = append(conns, c)
		}()
	}
	wg.Wait()
	fmt.Printf("open %d failed %d in %s\n", len(conns), *n-len(conns), time.Since(started).Round(time.Millisecond))
	for msg, k := range fails {
		fmt.Fprintf(os.Stderr, "holdstreams: %d× %s\n", k, msg)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); stop <- syscall.SIGTERM }()
	<-stop
	for _, c := range conns {
		c.Close()
	}
}

// open sends the request on a new connection and reads the response headers and the first line
// of the body (the first token); the connection then stays open with the stream in flight.
func open(host, req string, timeout time.Duration) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", host, timeout)
	if err != nil {
		return nil, fmt.Errorf("dial: %v", err)
	}
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, req); err != nil {
		c.Close()
		return nil, fmt.Errorf("write: %v", err)
	}
	br := bufio.NewReaderSize(c, 4096)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("response: %v", err)
	}
	if res.StatusCode != http.StatusOK {
		c.Close()
		return nil, fmt.Errorf("status %d", res.StatusCode)
	}
	line, err := bufio.NewReader(res.Body).ReadString('\n')
	if err != nil || !strings.Contains(line, `"message"`) {
		c.Close()
		return nil, fmt.Errorf("first chunk: %q %v", line, err)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}
