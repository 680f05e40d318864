package ollamaflow

import (
	"strings"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("ollamaflow", parseCaddyfile)
	// An ollamaflow site usually answers the Ollama API and hands anything
	// else to a reverse_proxy or file_server, so it runs before them and
	// users need no order line.
	httpcaddyfile.RegisterDirectiveOrder("ollamaflow", httpcaddyfile.Before, "reverse_proxy")

	httpcaddyfile.RegisterHandlerDirective("ollamaflow_status", parseStatusCaddyfile)
	// The dashboard is a page that answers, like Caddy's own metrics: it
	// sits right after metrics, so after respond and basic_auth/forward_auth
	// and before ollamaflow and reverse_proxy. A site sharing the dashboard
	// with a frontend scopes it with a path matcher (ollamaflow_status
	// /ops/*) and the frontend gets every other path, with no order line.
	httpcaddyfile.RegisterDirectiveOrder("ollamaflow_status", httpcaddyfile.After, "metrics")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	if err := handler.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return handler, nil
}

func parseStatusCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	s := new(StatusPage)
	if err := s.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return s, nil
}

// UnmarshalCaddyfile sets up the dashboard handler from Caddyfile tokens.
// Syntax:
//
//	ollamaflow_status [<matcher>] [{
//		read_only [true|false]
//	}]
func (s *StatusPage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		opt := d.Val()
		if seen[opt] {
			return d.Errf("%s given twice", opt)
		}
		seen[opt] = true
		switch opt {
		case "read_only":
			v, err := parseFlag(d)
			if err != nil {
				return err
			}
			s.ReadOnly = v
		default:
			return d.Errf("unknown ollamaflow_status option %q", opt)
		}
	}
	return nil
}

// Options that may be given more than once in a block; their values
// accumulate. Any other option given twice is an error, because the second
// value would silently replace the first.
var (
	repeatableHandlerOptions = map[string]bool{"models": true, "labels": true, "backend": true, "backends_from": true, "required_models": true, "cors_origins": true}
	repeatableBackendOptions = map[string]bool{"labels": true, "header": true}
)

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	ollamaflow [<matcher>] {
//		name                   <name>
//		lb_policy              least_delay|least_conn|round_robin|random|first
//		retries                <count>
//		max_request_body       <size>
//		max_body_memory        <size>
//		dial_timeout           <duration>
//		first_byte_timeout     <duration>
//		response_timeout       <duration>
//		stream_idle_timeout    <duration>
//		client_write_timeout   <duration>
//		max_queue              <count>
//		max_queue_per_client   <count>
//		queue_timeout          <duration>
//		allow_embeddings       [true|false]
//		allow_completions      [true|false]
//		allow_model_management [true|false]
//		models                 <model...>
//		labels                 <label...>
//		label_header           <header>
//		pin_completions        <json-object> | {
//			<path> <value>
//		}
//		pin_embeddings         <json-object> | {
//			<path> <value>
//		}
//		required_models        <model...>
//		insecure_pulls         [true|false]
//		sticky {
//			headers   <header...>
//			client_ip
//		}
//		conversation_affinity  [on|off]
//		cors_origins           <origin...> | off
//		tenants {
//			# see Tenants.UnmarshalCaddyfile
//		}
//		explorer               [<path>]
//
//		backend <name> <url> [{
//			# see Backend.UnmarshalCaddyfile
//		}]
//		backends_from a <host> [<port>] | srv <name> [{
//			# see BackendSource.UnmarshalCaddyfile
//		}]
//	}
//
// A flag without an argument means true. Sizes accept units (64MiB, 10MB)
// or plain bytes; durations use Caddy's syntax (5s, 2m, 1d). models, labels,
// required_models, cors_origins, backend and backends_from may repeat;
// every other option may be given once. At least one backend or
// backends_from is required.
//
// cors_origins lists origins (https://app.example.com), patterns with one *
// (http://localhost:*), * (any origin), null, and default (Ollama's own
// list, which applies when the option is absent); cors_origins off, alone,
// turns CORS off.
//
// explorer serves the API Explorer page on this site, at /explorer/ unless
// a path is given.
//
// pin_completions and pin_embeddings take one JSON object (quote it with
// backticks) or a block of lines that each set one value at an sjson path:
// options.temperature 0.7 pins {"options":{"temperature":0.7}}. A value that
// parses as JSON is that JSON; anything else is a string. Escape a dot in a
// key as \., write :N for a numeric key, and pin an array whole.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the directive name
	if d.NextArg() {
		return d.ArgErr()
	}

	seen := make(map[string]bool)
	backendNames := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && !repeatableHandlerOptions[opt] {
			return d.Errf("duplicate ollamaflow option '%s'", opt)
		}
		seen[opt] = true

		var err error
		switch opt {
		case "name":
			h.Name, err = oneArg(d)
		case "lb_policy":
			h.LBPolicy, err = parsePolicy(d)
		case "retries":
			var n int
			n, err = parseInt(d, 0)
			h.Retries = &n
		case "max_request_body":
			h.MaxRequestBody, err = parseSize(d)
		case "max_body_memory":
			h.MaxBodyMemory, err = parseSize(d)
		case "dial_timeout":
			h.DialTimeout, err = parseDuration(d)
		case "first_byte_timeout":
			h.FirstByteTimeout, err = parseDuration(d)
		case "stream_idle_timeout":
			h.StreamIdleTimeout, err = parseDuration(d)
		case "response_timeout":
			h.ResponseTimeout, err = parseDuration(d)
		case "client_write_timeout":
			h.ClientWriteTimeout, err = parseDuration(d)
		case "max_queue":
			h.MaxQueue, err = parseInt(d, 1)
		case "max_queue_per_client":
			h.MaxQueuePerClient, err = parseInt(d, 1)
		case "queue_timeout":
			h.QueueTimeout, err = parseDuration(d)
		case "allow_embeddings":
			h.AllowEmbeddings, err = parseFlagPtr(d)
		case "allow_completions":
			h.AllowCompletions, err = parseFlagPtr(d)
		case "allow_model_management":
			h.AllowModelManagement, err = parseFlag(d)
		case "models":
			var models []string
			models, err = someArgs(d)
			h.Models = append(h.Models, models...)
		case "labels":
			var labels []string
			labels, err = someArgs(d)
			h.Labels = append(h.Labels, labels...)
		case "label_header":
			h.LabelHeader, err = oneArg(d)
		case "required_models":
			var models []string
			models, err = someArgs(d)
			h.RequiredModels = append(h.RequiredModels, models...)
		case "insecure_pulls":
			h.InsecurePulls, err = parseFlag(d)
		case "sticky":
			h.Sticky, err = parseSticky(d)
		case "conversation_affinity":
			h.ConversationAffinity, err = parseSwitch(d)
		case "pin_completions":
			h.PinCompletions, err = parsePinOption(d)
		case "pin_embeddings":
			h.PinEmbeddings, err = parsePinOption(d)
		case "cors_origins":
			var origins []string
			origins, err = someArgs(d)
			h.CORSOrigins = append(h.CORSOrigins, origins...)
			if err == nil {
				err = checkCORSOrigins(d, h.CORSOrigins, origins)
			}
		case "tenants":
			h.Tenants = new(Tenants)
			err = h.Tenants.UnmarshalCaddyfile(caddyfile.NewDispenser(d.NextSegment()))
		case "explorer":
			h.ExplorerPath, err = parseExplorer(d)
		case "backends_from":
			src := new(BackendSource)
			err = src.UnmarshalCaddyfile(caddyfile.NewDispenser(d.NextSegment()))
			h.BackendsFrom = append(h.BackendsFrom, src)
		case "backend":
			var b *Backend
			b, err = parseBackendSegment(d, backendNames)
			if b != nil {
				h.Backends = append(h.Backends, b)
			}
		default:
			return unrecognized(d, "ollamaflow")
		}
		if err != nil {
			return err
		}
	}

	if len(h.Backends) == 0 && len(h.BackendsFrom) == 0 {
		// Point at the directive itself: the block is where the backend
		// is missing, and its last token may be anything.
		d.Reset()
		d.Next()
		return d.Errf("at least one backend is required (backend <name> <url>, or backends_from a <host> [<port>])")
	}
	return nil
}

// checkCORSOrigins reports, at the line that wrote it, an origin of added
// that provision would refuse, and off given with anything else. Entries
// with placeholders are checked at provision, once they are replaced.
func checkCORSOrigins(d *caddyfile.Dispenser, all, added []string) error {
	for _, o := range all {
		if strings.EqualFold(o, corsOff) && len(all) > 1 {
			return d.Err("cors_origins: off turns CORS off and cannot be combined with origins")
		}
	}
	for _, entry := range added {
		if strings.Contains(entry, "{") {
			continue
		}
		for _, o := range strings.Split(entry, ",") {
			o = strings.ToLower(strings.TrimSpace(o))
			if o == "" || o == corsOff || o == corsDefault {
				continue
			}
			if err := checkOrigin(o); err != nil {
				return d.Errf("cors_origins: %v", err)
			}
		}
	}
	return nil
}

// parseExplorer reads `explorer [<path>]`.
func parseExplorer(d *caddyfile.Dispenser) (string, error) {
	args := d.RemainingArgs()
	switch len(args) {
	case 0:
		return defaultExplorerPath, nil
	case 1:
		if _, err := normalizeExplorerPath(args[0]); err != nil {
			return "", d.Errf("explorer: %v", err)
		}
		return args[0], nil
	}
	return "", d.Errf("explorer: want at most one argument (a path), got %d", len(args))
}

// The helpers below are called with the cursor on an option name; they
// consume that option's arguments and report errors at its line, naming it.

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Backend)(nil)
)
