#!/usr/bin/env bash
# Runs every test of Parley on a fresh machine: installs what the tests need (Debian's
# Chromium, Node.js, coturn, Janus), checks formatting and lints, runs the Rust tests (unit,
# deterministic SFU simulations, signaling protocol against the real binary), the end-to-end
# tests in headless Chromium against a release build, and a short load test of every adapter
# of `parley lt` (Parley, Janus, the UDP floor).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to install: $*" >&2; return 1; fi
}

need_pkgs=()
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || need_pkgs+=(chromium)
command -v node >/dev/null || need_pkgs+=(nodejs)
command -v npm >/dev/null || need_pkgs+=(npm)
command -v iptables >/dev/null || need_pkgs+=(iptables)
command -v ip >/dev/null && command -v tc >/dev/null || need_pkgs+=(iproute2)
command -v turnserver >/dev/null || need_pkgs+=(coturn)
command -v janus >/dev/null || need_pkgs+=(janus)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]} from Debian's packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

log "deployment files (Helm chart rendered and checked, Grafana dashboard JSON)"
python3 -c "import yaml" 2>/dev/null || python3 -m pip install -q pyyaml
python3 deploy/helm/check.py
python3 -m json.tool deploy/grafana/parley-dashboard.json >/dev/null

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --release --workspace --all-targets -q -- -D warnings

log "Rust tests (release profile, shared with the binary the browser tests use)"
cargo test --release --workspace

log "building parley and the UDP floor (release)"
cargo build --release -p parley -p parley-floor

log "browser tests (headless Chromium)"
(
    cd tests/e2e
    npm ci --no-audit --no-fund --loglevel=error
    export PARLEY_BIN="$PWD/../../target/release/parley"
    node group_call.mjs
    node reconnect.mjs
    node messages.mjs
    node tls.mjs
    node speaking.mjs
    node simulcast.mjs
    node screenshare.mjs
    node bandwidth.mjs
    node lastn.mjs
    node operations.mjs
    node direct_call.mjs
    node ice_tcp.mjs
    node turn.mjs
    node diag.mjs
    node denied.mjs
    node failover.mjs
)

log "load tester end to end against Parley, Janus and the UDP floor (bench/run.sh --quick)"
bench/run.sh --quick --no-build --profile release --out "$(mktemp -d -t parley-bench-smoke.XXXXXX)"

log "all tests passed"
