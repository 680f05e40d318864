#!/usr/bin/env bash
# The e2e rig: a real Ollama server binary (CPU only) built from source, and two tiny models it can
# serve, so the end-to-end suite and the fake's conformance tests run on any machine without a
# model hub. Everything is cached under $OLLAMAFLOW_RIG (default ~/.cache/ollamaflow-rig); a second
# run does nothing. The last line printed is that directory:
#
#   bin/ollama              Ollama $OLLAMAFLOW_OLLAMA_VERSION (default v0.17.4, the version the
#                           e2e module's Go client is pinned to)
#   models/                 tiny-llama.gguf, tiny-bert.gguf and Modelfile.tiny-llama,
#                           Modelfile.tiny-bert (OLLAMAFLOW_E2E_MODELS points here)
#
# Needs Go, a C/C++ toolchain, and, once, two Debian header packages (installed with apt-get when
# run as root or with sudo). Modules come through your own GOPROXY setting.
set -euo pipefail

version=${OLLAMAFLOW_OLLAMA_VERSION:-v0.17.4}
rig=${OLLAMAFLOW_RIG:-$HOME/.cache/ollamaflow-rig}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$rig/bin" "$rig/models" "$rig/include"

say() { echo "rig: $*" >&2; }

# Ollama's cgo code compiles llama.cpp, whose sources include headers that Go module zips do not
# carry (llama.cpp vendors them; the module zip drops the vendor directories). nlohmann/json and
# stb come from Debian; miniaudio.h ships inside another Go module, gen2brain/malgo.
need_pkgs=()
[ -f /usr/include/nlohmann/json.hpp ] || need_pkgs+=(nlohmann-json3-dev)
[ -f /usr/include/stb/stb_image.h ] || need_pkgs+=(libstb-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
	sudo=""
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null || { say "need ${need_pkgs[*]}: install them as root"; exit 1; }
		sudo=sudo
	fi
	say "installing ${need_pkgs[*]} with apt-get"
	# Wait for another apt (an unattended upgrade, a parallel setup) rather than fail on its lock.
	$sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if [ ! -f "$rig/include/miniaudio/miniaudio.h" ]; then
	malgo_dir=$(cd "$rig" && go mod download -json github.com/gen2brain/malgo@v0.11.24 | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	mkdir -p "$rig/include/miniaudio"
	cp "$malgo_dir/miniaudio.h" "$rig/include/miniaudio/miniaudio.h"
	chmod 644 "$rig/include/miniaudio/miniaudio.h"
fi

# The binary is kept per version, so changing the version builds again instead of reusing a stale one.
if [ ! -x "$rig/bin/ollama-$version" ]; then
	say "building ollama $version with cgo (a few minutes on 2 cores the first time)"
	tmp=$(mktemp -d "$rig/build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	CGO_ENABLED=1 CGO_CPPFLAGS="-I$rig/include" GOBIN="$tmp" \
		go install -trimpath -ldflags "-s -w -X github.com/ollama/ollama/version.Version=${version#v}" \
		"github.com/ollama/ollama@$version"
	mv "$tmp/ollama" "$rig/bin/ollama-$version"
fi
ln -sfn "ollama-$version" "$rig/bin/ollama"

# The models are deterministic: regenerating them gives the same bytes, so only a missing file
# (or a changed generator, noticed by its checksum) runs it again.
gen_sum=$(cat "$here/mkmodels/"*.go | sha256sum | cut -c1-16)
if [ "$(cat "$rig/models/.generator" 2>/dev/null)" != "$gen_sum" ]; then
	say "writing the tiny models"
	(cd "$here/.." && go run ./rig/mkmodels "$rig/models")
	echo "$gen_sum" >"$rig/models/.generator"
fi

echo "$rig"
