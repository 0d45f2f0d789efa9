#!/usr/bin/env bash
# The Docker engine that `make images` builds with. Debian's docker.io is
# installed when dockerd is missing (apt; the only registry it needs is Debian's).
#
#   docker.sh up     start dockerd if no daemon answers (idempotent)
#   docker.sh down   stop the dockerd that `up` started (never one it found running)
#   docker.sh status exit 0 if a daemon answers
#
# The daemon is started with its networking off (--bridge=none --iptables=false):
# image builds use `--network host`, and nothing here runs containers through
# Docker, so it never rewrites the iptables FORWARD policy under the node's pods.
# Images stay in /var/lib/docker between runs (warm builds are cached layers).
set -euo pipefail
CACHE="${PADDLER_CACHE:-$HOME/.cache/paddler}"
RUN="$CACHE/run"
PIDFILE="$RUN/dockerd.pid"   # written by dockerd itself (--pidfile), removed on its exit
LOG="$RUN/dockerd.log"
TIMEOUT="${DOCKER_UP_TIMEOUT:-60}"
mkdir -p "$RUN"
log() { printf '[docker %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
sudo_() { if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi; }
answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
ours() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid; pid="$(cat "$PIDFILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
    && [[ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)")" == dockerd ]]
}

exec 6>"$RUN/docker.lock"
flock 6

case "${1:-up}" in
  status) answers ;;
  up)
    if answers; then log "a Docker daemon already answers"; exit 0; fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
      log "installing Debian's docker.io"
      sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
      sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >&2
    fi
    log "starting dockerd (log: $LOG)"
    rm -f "$PIDFILE"
    S=(); [[ "$(id -u)" == 0 ]] || S=(sudo)
    "${S[@]}" setsid dockerd --bridge=none --iptables=false --ip-masq=false --pidfile "$PIDFILE" \
      </dev/null >"$LOG" 2>&1 6>&- 7>&- 8>&- 9>&- &
    starter=$!
    deadline=$((SECONDS + TIMEOUT))
    until answers; do
      kill -0 "$starter" 2>/dev/null || { tail -20 "$LOG" >&2; log "dockerd exited"; exit 1; }
      (( SECONDS < deadline )) || { tail -20 "$LOG" >&2; log "dockerd not answering after ${TIMEOUT}s"; exit 1; }
      sleep 0.5
    done
    log "dockerd up ($(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}'))"
    ;;
  down)
    if ! ours; then rm -f "$PIDFILE"; log "no dockerd of ours running"; exit 0; fi
    pid="$(cat "$PIDFILE")"
    sudo_ kill -TERM "$pid"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "dockerd ignored SIGTERM; SIGKILL"; sudo_ kill -KILL "$pid" || true; fi
    rm -f "$PIDFILE"
    log "stopped dockerd (pid $pid)"
    ;;
  *) echo "usage: docker.sh up|down|status" >&2; exit 2 ;;
esac
