#!/usr/bin/env bash
# Prometheus for the metrics pipeline of the test control plane (docs/scaling.md):
# Debian's package (bookworm: 2.42), run as a host process on 127.0.0.1 and a free
# port, scraping every target file in its state directory once a second.
#
#   prometheus.sh install                 apt-get install prometheus (once; instant when
#                                         /usr/bin/prometheus exists). Never starts the
#                                         Debian service: only `up` runs Prometheus.
#   prometheus.sh up [DIR]                start it (idempotent: a running one is kept);
#                                         prints its URL, also written to DIR/prometheus.url
#   prometheus.sh target DIR NAME ADDR [LABEL=VALUE...]
#                                         scrape http://ADDR/metrics (a balancer's management
#                                         address), its series labelled LABEL=VALUE (e.g.
#                                         namespace=team-a: the adapter rule of
#                                         charts/paddler needs `namespace`); scraped
#                                         within about 5 s (file service discovery; its
#                                         updates reach the scraper every 5 s)
#   prometheus.sh untarget DIR NAME       stop scraping target NAME
#   prometheus.sh down [DIR]              stop it (by its pid file) and drop its data
#
# DIR defaults to ${PADDLER_K8S_DIR:-<repo>/.k8s}/metrics. Files there: prometheus.url, prometheus.yml,
# targets/NAME.json, pids/prometheus.pid, logs/prometheus.log, data/ (TSDB).
# Environment: PROMETHEUS (binary, default /usr/bin/prometheus),
# PROMETHEUS_SCRAPE_INTERVAL (default 1s), PROMETHEUS_UP_TIMEOUT (seconds, 60).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STATE="${PADDLER_K8S_DIR:-$REPO/.k8s}"
PROMETHEUS="${PROMETHEUS:-/usr/bin/prometheus}"
INTERVAL="${PROMETHEUS_SCRAPE_INTERVAL:-1s}"
TIMEOUT="${PROMETHEUS_UP_TIMEOUT:-60}"

log() { printf '[prometheus %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { echo "prometheus.sh: $*" >&2; exit 1; }

install() {
  if [[ -x "$PROMETHEUS" ]]; then return 0; fi
  local sudo=; [[ "$(id -u)" == 0 ]] || sudo=sudo
  local t0=$SECONDS
  log "installing Debian's prometheus package"
  # The package's maintainer scripts may try to start the system service (port 9090):
  # RUNLEVEL=1 keeps invoke-rc.d from it, and one started anyway is stopped below.
  $sudo apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null
  $sudo env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends prometheus >/dev/null
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  if [[ -x /etc/init.d/prometheus ]] && /etc/init.d/prometheus status >/dev/null 2>&1; then
    $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
  [[ -x "$PROMETHEUS" ]] || die "apt-get did not install $PROMETHEUS"
  log "installed $("$PROMETHEUS" --version 2>&1 | head -1) in $((SECONDS - t0))s"
}

alive() {
  local f="$1/pids/prometheus.pid" pid
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null || echo prometheus)")" == prometheus ]]
}

ready() { python3 - "$1/-/ready" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

up() {
  local dir="$1"
  install
  mkdir -p "$dir"/{pids,logs,targets}
  if alive "$dir" && [[ -f "$dir/prometheus.url" ]] && ready "$(cat "$dir/prometheus.url")"; then
    cat "$dir/prometheus.url"; return 0
  fi
  down "$dir" 2>/dev/null
  mkdir -p "$dir"/{pids,logs,targets}
  local port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
  cat >"$dir/prometheus.yml" <<YML
# Written by scripts/k8s/prometheus.sh: one job, its targets from targets/*.json.
global:
  scrape_interval: $INTERVAL
  scrape_timeout: $INTERVAL
  evaluation_interval: $INTERVAL
scrape_configs:
  - job_name: paddler-balancer
    metrics_path: /metrics
    file_sd_configs:
      - files: ['$dir/targets/*.json']
        refresh_interval: 1s
YML
  setsid "$PROMETHEUS" --config.file "$dir/prometheus.yml" \
    --storage.tsdb.path "$dir/data" --storage.tsdb.retention.time 2h \
    --web.listen-address "127.0.0.1:$port" --log.level warn \
    </dev/null >"$dir/logs/prometheus.log" 2>&1 &
  echo $! >"$dir/pids/prometheus.pid"
  local url="http://127.0.0.1:$port" deadline=$((SECONDS + TIMEOUT))
  until ready "$url"; do
    alive "$dir" || { tail -n 20 "$dir/logs/prometheus.log" >&2; die "prometheus exited"; }
    (( SECONDS < deadline )) || { down "$dir"; die "not ready after ${TIMEOUT}s"; }
    sleep 0.2
  done
  echo "$url" >"$dir/prometheus.url"
  log "up at $url (pid $(cat "$dir/pids/prometheus.pid")), scraping $dir/targets/*.json every $INTERVAL"
  echo "$url"
}

down() {
  local dir="$1" pid
  if alive "$dir"; then
    pid="$(cat "$dir/pids/prometheus.pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    log "stopped (pid $pid)"
  fi
  rm -rf "$dir/pids/prometheus.pid" "$dir/prometheus.url" "$dir/data"
}

target() {
  local dir="$1" name="$2" addr="$3"; shift 3
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "target name must be [A-Za-z0-9_.-]+: $name"
  mkdir -p "$dir/targets"
  python3 - "$dir/targets/$name.json" "$addr" "$@" <<'PY'
import json, os, sys
path, addr, *pairs = sys.argv[1:]
labels = dict(p.split("=", 1) for p in pairs)
with open(path + ".tmp", "w") as f:
    json.dump([{"targets": [addr], "labels": labels}], f)
os.replace(path + ".tmp", path)  # atomic: Prometheus never reads half a file
PY
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install ;;
  up) up "${1:-$STATE/metrics}" ;;
  down) down "${1:-$STATE/metrics}" ;;
  target) [[ $# -ge 3 ]] || die "usage: prometheus.sh target DIR NAME ADDR [LABEL=VALUE...]"; target "$@" ;;
  untarget) [[ $# -eq 2 ]] || die "usage: prometheus.sh untarget DIR NAME"; rm -f "$1/targets/$2.json" ;;
  *) echo "usage: prometheus.sh install | up [DIR] | down [DIR] | target DIR NAME ADDR [L=V...] | untarget DIR NAME" >&2; exit 2 ;;
esac
