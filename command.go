package ollamaflow

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	// The filter encoder and its delete filter, for the access log.
	_ "github.com/caddyserver/caddy/v2/modules/logging"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "ollamaflow",
		Usage: `--to <backend> [--to <backend>...] [--from <addr>] [--policy <name>] [--model <name>...] [--allow-model-management] [--admin <addr>] [--explorer] [--access-log] [--debug]`,
		Short: "Serves several Ollama servers as one endpoint, with no config file",
		Long: `
Runs one ollamaflow frontend that receives Ollama and OpenAI-compatible API
traffic on the --from address and spreads it over the --to backends, with
health checks, model-aware routing and retries, as a Caddyfile with one
ollamaflow block would. Repeat --to for each backend.

--to takes a backend as the Caddyfile's backend line does: host[:port]
(http and Ollama's port 11434 by default) or an http:// or https:// URL,
optionally preceded by a name and "=" (gpu1=10.0.0.5:11434). Without a name,
the backend is named after its host, or host-port when two share a host.

--from is where clients connect (default :11434, Ollama's own port, so
clients work unchanged). With no host, a loopback host, localhost or an IP
address it serves plain HTTP on that address (port 11434 unless given); with
a domain name it serves HTTPS with Caddy's automatic certificates (port 443
unless given, HTTP redirected), as reverse-proxy does. An http:// or
https:// prefix forces the scheme.

--policy sets lb_policy (least_delay by default), --model limits the models
clients may use (repeatable), --allow-model-management lets clients pull,
create and delete models on every backend through the endpoint. --admin
serves Caddy's admin API, with ollamaflow's status page at /ollamaflow/, on
the given address (disabled by default). --explorer serves the API
Explorer, a page for trying requests and small load tests from a browser, at
/explorer/ on the --from address.
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.Flags().StringP("from", "f", ":11434", "Address on which to receive traffic")
			cmd.Flags().StringArrayP("to", "t", nil, "Backend [name=]address (repeatable)")
			cmd.Flags().String("policy", "", "Load balancing policy (lb_policy)")
			cmd.Flags().StringArray("model", nil, "A model clients may use (repeatable; default: any)")
			cmd.Flags().Bool("allow-model-management", false, "Let clients pull, create, copy and delete models on every backend")
			cmd.Flags().String("admin", "", "Serve Caddy's admin API on this address (default: disabled)")
			cmd.Flags().Bool("explorer", false, "Serve the API Explorer at /explorer/")
			cmd.Flags().Bool("access-log", false, "Enable the access log")
			cmd.Flags().BoolP("debug", "v", false, "Enable verbose debug logs")
			cmd.RunE = caddycmd.WrapCommandFuncForCobra(cmdOllamaflow)
		},
	})
}

// commandOptions are the command's flags, read and checked.
type commandOptions struct {
	from                 string
	to                   []string
	policy               string
	models               []string
	allowModelManagement bool
	admin                string
	explorer             bool
	accessLog            bool
	debug                bool
}

func commandOptionsFromFlags(fs caddycmd.Flags) (commandOptions, error) {
	var o commandOptions
	var err error
	o.from = fs.String("from")
	if o.to, err = fs.GetStringArray("to"); err != nil {
		return o, fmt.Errorf("--to: %v", err)
	}
	if o.models, err = fs.GetStringArray("model"); err != nil {
		return o, fmt.Errorf("--model: %v", err)
	}
	o.policy = fs.String("policy")
	o.allowModelManagement = fs.Bool("allow-model-management")
	o.admin = fs.String("admin")
	o.explorer = fs.Bool("explorer")
	o.accessLog = fs.Bool("access-log")
	o.debug = fs.Bool("debug")
	return o, nil
}

func cmdOllamaflow(fs caddycmd.Flags) (int, error) {
	caddy.TrapSignals()
	opts, err := commandOptionsFromFlags(fs)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	cfg, err := commandConfig(opts)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if err := caddy.Run(cfg); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	caddy.Log().Info("ollamaflow serving", zap.String("from", opts.from), zap.Strings("to", opts.to))
	select {}
}

// commandConfig builds the Caddy config the command runs: one HTTP server
// with one route whose handler is an ollamaflow frontend over the backends.
// It is the whole config, so it can be checked (and run) without the command.
func commandConfig(o commandOptions) (*caddy.Config, error) {
	if len(o.to) == 0 {
		return nil, errors.New("--to is required: name at least one Ollama server")
	}
	backends, err := commandBackends(o.to)
	if err != nil {
		return nil, err
	}
	h := Handler{
		LBPolicy:             o.policy,
		Models:               o.models,
		AllowModelManagement: o.allowModelManagement,
		Backends:             backends,
	}
	if o.explorer {
		h.ExplorerPath = defaultExplorerPath
	}

	from, err := commandFromAddress(o.from)
	if err != nil {
		return nil, err
	}
	route := caddyhttp.Route{
		HandlersRaw: []json.RawMessage{caddyconfig.JSONModuleObject(&h, "handler", "ollamaflow", nil)},
	}
	server := &caddyhttp.Server{Routes: caddyhttp.RouteList{route}, Listen: []string{from.listen}}
	if from.domain != "" {
		// The host matcher is also what tells Caddy's automatic HTTPS which
		// name to get a certificate for.
		server.Routes[0].MatcherSetsRaw = []caddy.ModuleMap{{"host": caddyconfig.JSON(caddyhttp.MatchHost{from.domain}, nil)}}
	}
	if !from.https {
		server.AutoHTTPS = &caddyhttp.AutoHTTPSConfig{Disabled: true}
	}
	if o.accessLog {
		server.Logs = &caddyhttp.ServerLogConfig{DefaultLoggerName: accessLoggerName}
	}
	httpApp := caddyhttp.App{Servers: map[string]*caddyhttp.Server{"ollamaflow": server}}

	persist := false
	cfg := &caddy.Config{
		Admin: &caddy.AdminConfig{
			Disabled: o.admin == "",
			Listen:   o.admin,
			Config:   &caddy.ConfigSettings{Persist: &persist},
		},
		AppsRaw: caddy.ModuleMap{"http": caddyconfig.JSON(httpApp, nil)},
	}
	if o.debug || o.accessLog {
		cfg.Logging = &caddy.Logging{Logs: map[string]*caddy.CustomLog{"default": {}}}
	}
	if o.debug {
		cfg.Logging.Logs["default"].Level = zap.DebugLevel.CapitalString()
	}
	if o.accessLog {
		// The access log gets its own log, so its encoder can drop the
		// headers that carry API keys, and the default log leaves it out
		// so no line is written twice, once unfiltered.
		access := "http.log.access." + accessLoggerName
		cfg.Logging.Logs["default"].Exclude = []string{access}
		cfg.Logging.Logs["access"] = &caddy.CustomLog{
			BaseLog: caddy.BaseLog{EncoderRaw: accessLogEncoder()},
			Include: []string{access},
		}
	}
	return cfg, nil
}

// accessLoggerName names the command's access log, http.log.access.ollamaflow.
const accessLoggerName = "ollamaflow"

// secretRequestHeaders are request headers that carry API keys and that
// Caddy's access log, which redacts Authorization, Proxy-Authorization and
// Cookie only, would print: X-Api-Key (OpenAI-style clients, tenants' key
// header) and Api-Key (Azure OpenAI clients).
var secretRequestHeaders = []string{"X-Api-Key", "Api-Key"}

// accessLogEncoder is Caddy's filter encoder over its default encoder,
// deleting secretRequestHeaders from each line.
func accessLogEncoder() json.RawMessage {
	fields := make(map[string]json.RawMessage, len(secretRequestHeaders))
	for _, h := range secretRequestHeaders {
		// Caddy logs request headers under their canonical names.
		fields["request>headers>"+http.CanonicalHeaderKey(h)] = json.RawMessage(`{"filter":"delete"}`)
	}
	return caddyconfig.JSONModuleObject(map[string]any{"fields": fields}, "format", "filter", nil)
}

// commandBackends turns the --to values into backends. Names are left to the
// user or derived from the host, so that they read well in the status page,
// metrics and X-OllamaFlow-Backend.
func commandBackends(to []string) ([]*Backend, error) {
	type parsed struct{ name, addr, host, port string }
	var all []parsed
	hosts := map[string]int{}
	for _, t := range to {
		name, addr, named := strings.Cut(t, "=")
		if !named || strings.Contains(name, "/") {
			name, addr = "", t // an '=' inside a URL is not a name
		}
		u, err := parseBackendURL(addr)
		if err != nil {
			return nil, fmt.Errorf("--to %s: %v", t, err)
		}
		p := parsed{name: name, addr: strings.TrimSpace(addr), host: u.Hostname(), port: u.Port()}
		hosts[p.host]++
		all = append(all, p)
	}
	backends := make([]*Backend, 0, len(all))
	for _, p := range all {
		name := p.name
		if name == "" {
			name = p.host
			if hosts[p.host] > 1 {
				name += "-" + p.port
			}
			// An IPv6 host has colons, which a name may not.
			name = strings.ReplaceAll(name, ":", "_")
		}
		backends = append(backends, &Backend{Name: name, URL: p.addr})
	}
	return backends, nil
}

// fromAddress is where the command serves.
type fromAddress struct {
	listen string // the listener address
	domain string // the host the site answers for, and gets a certificate for over HTTPS; empty: any
	https  bool
}

// commandFromAddress reads --from as reverse-proxy does, with two
// differences that suit Ollama's clients: a loopback name, localhost or an IP
// address means plain HTTP (clients expect http://host:11434), and plain HTTP
// defaults to Ollama's port rather than 80.
func commandFromAddress(from string) (fromAddress, error) {
	a, err := httpcaddyfile.ParseAddress(from)
	if err != nil {
		return fromAddress{}, fmt.Errorf("--from %s: %v", from, err)
	}
	if a.Path != "" {
		return fromAddress{}, fmt.Errorf("--from %s: a path is not allowed", from)
	}
	host := strings.ToLower(a.Host)
	local := host == "" || host == "localhost" || net.ParseIP(host) != nil
	var f fromAddress
	switch a.Scheme {
	case "https":
		f.https = true
	case "http":
	case "":
		f.https = !local && a.Port != strconv.Itoa(caddyhttp.DefaultHTTPPort)
	default:
		return fromAddress{}, fmt.Errorf("--from %s: scheme must be http or https", from)
	}
	port := a.Port
	if port == "" {
		port = defaultOllamaPort
		if f.https {
			port = strconv.Itoa(caddyhttp.DefaultHTTPSPort)
		}
	}
	switch {
	case f.https && host == "":
		return fromAddress{}, fmt.Errorf("--from %s: HTTPS needs a host name to get a certificate for", from)
	case f.https || !local:
		// A name (or, over HTTPS, an address: Caddy's internal CA certifies
		// IPs and localhost) is served on every interface, like reverse-proxy.
		f.listen, f.domain = ":"+port, host
	default:
		f.listen = net.JoinHostPort(host, port)
	}
	return f, nil
}
