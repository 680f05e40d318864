package ollamaflow

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"
	"go.yaml.in/yaml/v3"
)

// k8sObject is the part of a Kubernetes manifest the test reads.
type k8sObject struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name      string            `yaml:"name"`
		Namespace string            `yaml:"namespace"`
		Labels    map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Data map[string]string `yaml:"data"`
	Spec struct {
		ClusterIP   string           `yaml:"clusterIP"`
		ServiceName string           `yaml:"serviceName"`
		Selector    yaml.Node        `yaml:"selector"`
		Ports       []k8sServicePort `yaml:"ports"`
		Template    k8sPodTemplate   `yaml:"template"`
	} `yaml:"spec"`
}

type k8sServicePort struct {
	Name       string `yaml:"name"`
	Port       int    `yaml:"port"`
	TargetPort any    `yaml:"targetPort"`
}

type k8sPodTemplate struct {
	Metadata struct {
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Spec struct {
		Containers []struct {
			Name  string   `yaml:"name"`
			Image string   `yaml:"image"`
			Args  []string `yaml:"args"`
			Ports []struct {
				Name          string `yaml:"name"`
				ContainerPort int    `yaml:"containerPort"`
			} `yaml:"ports"`
			ReadinessProbe struct {
				HTTPGet struct {
					Path string `yaml:"path"`
					Port any    `yaml:"port"`
				} `yaml:"httpGet"`
			} `yaml:"readinessProbe"`
			VolumeMounts []struct {
				Name      string `yaml:"name"`
				MountPath string `yaml:"mountPath"`
			} `yaml:"volumeMounts"`
		} `yaml:"containers"`
		Volumes []struct {
			Name      string `yaml:"name"`
			ConfigMap struct {
				Name string `yaml:"name"`
			} `yaml:"configMap"`
		} `yaml:"volumes"`
	} `yaml:"spec"`
}

// selectorLabels reads a Service's selector (a plain map) or a workload's
// (matchLabels).
func selectorLabels(t *testing.T, n yaml.Node) map[string]string {
	t.Helper()
	var plain map[string]any
	require.NoError(t, n.Decode(&plain))
	out := map[string]string{}
	if ml, ok := plain["matchLabels"].(map[string]any); ok {
		for k, v := range ml {
			out[k] = fmt.Sprint(v)
		}
		return out
	}
	for k, v := range plain {
		out[k] = fmt.Sprint(v)
	}
	return out
}

func matches(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// TestKubernetesExample reads every manifest in examples/kubernetes: each
// YAML document parses and is a named Kubernetes object; the pieces fit
// together (the StatefulSet's headless Service selects its pods, the
// Deployment mounts the ConfigMap where its args read the Caddyfile, its
// probes hit the port the Caddyfile serves); the Caddyfile adapts without a
// warning, its backends_from names the headless Service's DNS name and
// port, and the config validates and discovers servers from a DNS server
// that answers for that name like the cluster's would.
func TestKubernetesExample(t *testing.T) {
	files, err := filepath.Glob("examples/kubernetes/*.yaml")
	require.NoError(t, err)
	require.NotEmpty(t, files, "no examples/kubernetes/*.yaml")
	byKind := map[string][]k8sObject{}
	for _, file := range files {
		data, err := os.ReadFile(file)
		require.NoError(t, err)
		dec := yaml.NewDecoder(bytes.NewReader(data))
		for i := 0; ; i++ {
			var obj k8sObject
			err := dec.Decode(&obj)
			if errors.Is(err, io.EOF) {
				break
			}
			require.NoError(t, err, "%s: document %d", file, i)
			require.NotEmpty(t, obj.APIVersion, "%s: document %d has no apiVersion", file, i)
			require.NotEmpty(t, obj.Kind, "%s: document %d has no kind", file, i)
			require.NotEmpty(t, obj.Metadata.Name, "%s: document %d has no metadata.name", file, i)
			if obj.Kind != "Namespace" {
				assert.Equal(t, "ai", obj.Metadata.Namespace, "%s: %s %s", file, obj.Kind, obj.Metadata.Name)
			}
			byKind[obj.Kind] = append(byKind[obj.Kind], obj)
		}
	}
	for kind, n := range map[string]int{"Namespace": 1, "Service": 2, "StatefulSet": 1, "Deployment": 1, "ConfigMap": 1} {
		require.Len(t, byKind[kind], n, "objects of kind %s", kind)
	}

	// The Ollama side: a StatefulSet behind a headless Service.
	sts := byKind["StatefulSet"][0]
	var headless, front *k8sObject
	for i, svc := range byKind["Service"] {
		if svc.Spec.ClusterIP == "None" {
			headless = &byKind["Service"][i]
		} else {
			front = &byKind["Service"][i]
		}
	}
	require.NotNil(t, headless, "no headless Service (clusterIP: None)")
	require.NotNil(t, front, "no Service in front of Caddy")
	assert.Equal(t, headless.Metadata.Name, sts.Spec.ServiceName, "the StatefulSet's serviceName is the headless Service")
	assert.True(t, matches(selectorLabels(t, headless.Spec.Selector), sts.Spec.Template.Metadata.Labels), "the headless Service does not select the Ollama pods")
	assert.True(t, matches(selectorLabels(t, sts.Spec.Selector), sts.Spec.Template.Metadata.Labels))
	require.Len(t, headless.Spec.Ports, 1)
	ollamaPort := headless.Spec.Ports[0].Port

	// The Caddy side: a Deployment that reads the ConfigMap's Caddyfile.
	dep, cm := byKind["Deployment"][0], byKind["ConfigMap"][0]
	assert.True(t, matches(selectorLabels(t, front.Spec.Selector), dep.Spec.Template.Metadata.Labels), "the front Service does not select the Caddy pods")
	caddyfile, ok := cm.Data["Caddyfile"]
	require.True(t, ok, "the ConfigMap has no Caddyfile key")
	require.Len(t, dep.Spec.Template.Spec.Containers, 1)
	ctr := dep.Spec.Template.Spec.Containers[0]
	var mountPath string
	for _, v := range dep.Spec.Template.Spec.Volumes {
		if v.ConfigMap.Name == cm.Metadata.Name {
			for _, m := range ctr.VolumeMounts {
				if m.Name == v.Name {
					mountPath = m.MountPath
				}
			}
		}
	}
	require.NotEmpty(t, mountPath, "the Deployment does not mount the ConfigMap")
	i := slices.Index(ctr.Args, "--config")
	require.True(t, i >= 0 && i+1 < len(ctr.Args), "caddy run without --config: %v", ctr.Args)
	assert.Equal(t, mountPath+"/Caddyfile", ctr.Args[i+1])

	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	require.NoError(t, err)
	assert.Empty(t, warnings, "caddy adapt warns")
	servers := gjson.GetBytes(adapted, "apps.http.servers").Map()
	require.Len(t, servers, 1)
	var serverName string
	for name, srv := range servers {
		serverName = name
		require.Len(t, srv.Get("listen").Array(), 1)
		listen := srv.Get("listen.0").String()
		require.Len(t, ctr.Ports, 1)
		assert.Equal(t, fmt.Sprintf(":%d", ctr.Ports[0].ContainerPort), listen, "the container port is not the one Caddy listens on")
		assert.Equal(t, ctr.Ports[0].Name, ctr.ReadinessProbe.HTTPGet.Port, "the readiness probe does not hit Caddy's port")
		assert.Equal(t, "/", ctr.ReadinessProbe.HTTPGet.Path)
	}

	path := findHandler(adapted, "apps.http.servers."+serverName, "ollamaflow")
	require.NotEmpty(t, path, "no ollamaflow handler in %s", adapted)
	handler := gjson.GetBytes(adapted, path)
	sources := handler.Get("backends_from").Array()
	require.Len(t, sources, 1)
	host := fmt.Sprintf("%s.%s.svc.cluster.local", headless.Metadata.Name, headless.Metadata.Namespace)
	assert.Equal(t, "a", sources[0].Get("type").String())
	assert.Equal(t, host, sources[0].Get("host").String(), "backends_from does not name the headless Service")
	assert.EqualValues(t, ollamaPort, sources[0].Get("port").Int())

	// Provision the config as a pod would, with the cluster's DNS played
	// by a loopback server: it finds the two Ollama pods.
	z := newDNSZone(t)
	z.setA(host, "127.0.0.2", "127.0.0.3")
	adapted, err = sjson.SetBytes(adapted, path+".backends_from.0.resolvers", []string{z.addr})
	require.NoError(t, err)
	var cfg caddy.Config
	require.NoError(t, json.Unmarshal(adapted, &cfg))
	require.NoError(t, caddy.Validate(&cfg), "caddy validate")

	h := new(Handler)
	require.NoError(t, json.Unmarshal([]byte(gjson.GetBytes(adapted, path).Raw), h))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	require.NoError(t, h.Provision(ctx))
	defer h.Cleanup()
	assert.Equal(t, []string{fmt.Sprintf("127.0.0.2:%d", ollamaPort), fmt.Sprintf("127.0.0.3:%d", ollamaPort)}, poolNames(h))
	assert.Equal(t, h.Sticky.Headers, []string{"x-conversation-id"})
}

// findHandler returns the gjson path of the first handler named name in
// the routes under at, looking into subroutes.
func findHandler(config []byte, at, name string) string {
	for i, route := range gjson.GetBytes(config, at+".routes").Array() {
		for j, h := range route.Get("handle").Array() {
			path := fmt.Sprintf("%s.routes.%d.handle.%d", at, i, j)
			switch h.Get("handler").String() {
			case name:
				return path
			case "subroute":
				if p := findHandler(config, path, name); p != "" {
					return p
				}
			}
		}
	}
	return ""
}
