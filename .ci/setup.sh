#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine (run as root).
# Idempotent: packages already present and a Kubo already built are not redone.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_DIR="${CIDBOOT_TOOLS:-$HOME/.cache/cidboot/bin}"
KUBO_VERSION="v0.41.0"
# IPFS Cluster (pinset orchestration over Kubo nodes: docs/scale-out.md).
CLUSTER_VERSION="v1.1.6"

pkgs=$(grep -v '^#' .ci/apt-packages.txt | xargs)
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# tftpd-hpa and dnsmasq are benchmark references, never system services here.
for svc in tftpd-hpa dnsmasq; do (systemctl stop "$svc" || service "$svc" stop) >/dev/null 2>&1 || true; done

python3 -m pip install -q --disable-pip-version-check -e '.[dev]'

# Go tools (Kubo, the real IPFS node the interop tests and benches run against).
# (ipfs/gateway-conformance is not served by the Go module proxy reachable here: see docs/gateway.md.)
# Go tools: `go install mod@version` asks the proxy for the version list (deprecation check),
# which this proxy refuses; building from the downloaded module gives the same pinned binary.
build_go_tool() { # module version package-subdir binary
  local mod=$1 ver=$2 sub=$3 bin=$4
  [ -x "$TOOLS_DIR/$bin" ] && [ "$(cat "$TOOLS_DIR/$bin.version" 2>/dev/null)" = "$mod@$ver" ] && return 0
  mkdir -p "$TOOLS_DIR"
  echo "building $mod@$ver (once; cached in $TOOLS_DIR)" >&2
  local dir
  dir=$(go mod download -json "$mod@$ver" | python3 -c 'import json,sys
m = json.load(sys.stdin)
if "Dir" not in m: sys.exit("cannot download " + m["Path"] + "@" + m["Version"] + ": " + m.get("Error", "?"))
print(m["Dir"])')
  (cd "$dir" && go build -buildvcs=false -trimpath -o "$TOOLS_DIR/$bin" "./$sub")
  echo "$mod@$ver" > "$TOOLS_DIR/$bin.version"
}
build_go_tool github.com/ipfs/kubo "$KUBO_VERSION" cmd/ipfs ipfs
# ipfs-cluster-service and -ctl share one module: the second build reuses the first one's cache.
build_go_tool github.com/ipfs-cluster/ipfs-cluster "$CLUSTER_VERSION" cmd/ipfs-cluster-service ipfs-cluster-service
build_go_tool github.com/ipfs-cluster/ipfs-cluster "$CLUSTER_VERSION" cmd/ipfs-cluster-ctl ipfs-cluster-ctl
