# Shared by the scripts in scripts/k8s/ (source it; it defines functions only).
#
#   go_env CACHE         find the Go toolchain (GO, else `go` on PATH, else
#                        /usr/local/go/bin/go) into $GO and export the module and build
#                        caches under CACHE/go that every Go build here shares.
#   pid_is NAME PID      true while PID is alive, not a zombie, and runs a binary NAME
#                        (a pid file never kills a recycled pid).
#   pidfile_alive DIR NAME
#                        pid_is for the pid in DIR/NAME.pid; false when there is none.
#   stop_pidfiles DIR TIMEOUT NAME...
#                        SIGTERM each NAME whose DIR/NAME.pid is ours, wait up to TIMEOUT
#                        seconds for all of them, SIGKILL what is left, remove the pid
#                        files; prints "stopped NAME (pid PID)" per process (through
#                        `log` when the caller defines it).

go_env() {
  local cache="$1"
  GO="${GO:-}"
  if [[ -z "$GO" ]]; then
    if command -v go >/dev/null 2>&1; then GO="$(command -v go)";
    elif [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go;
    else echo "$(basename "$0"): no Go toolchain found (set GO=/path/to/go)" >&2; return 1; fi
  fi
  export GOPATH="$cache/go/path"
  export GOMODCACHE="$GOPATH/pkg/mod"
  export GOCACHE="$cache/go/build-cache"
  export GOFLAGS="-trimpath -mod=mod"
  export GOTOOLCHAIN=local
  export CGO_ENABLED=0
  export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
  mkdir -p "$GOPATH" "$GOCACHE"
}

# pidfile_alive DIR NAME: pid_is for the pid in DIR/NAME.pid (false when there is none).
pidfile_alive() {
  [[ -f "$1/$2.pid" ]] || return 1
  pid_is "$2" "$(cat "$1/$2.pid")"
}

pid_is() {
  local name="$1" pid="$2" exe
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  # A zombie (exited, not yet reaped by its new parent) counts as stopped.
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ -z "$exe" || "$(basename "${exe% (deleted)}")" == "$name" ]]
}

stop_pidfiles() {
  local dir="$1" timeout="$2" name pid f entry deadline
  shift 2
  local stopped=()
  for name in "$@"; do
    f="$dir/$name.pid"
    [[ -f "$f" ]] || continue
    pid="$(cat "$f")"
    if pid_is "$name" "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      stopped+=("$name:$pid")
    fi
  done
  deadline=$((SECONDS + timeout))
  for entry in "${stopped[@]+"${stopped[@]}"}"; do
    name="${entry%%:*}"; pid="${entry##*:}"
    while pid_is "$name" "$pid"; do
      if (( SECONDS >= deadline )); then
        _lib_log "$name (pid $pid) ignored SIGTERM, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 100); do pid_is "$name" "$pid" || break; sleep 0.05; done
        break
      fi
      sleep 0.05
    done
    _lib_log "stopped $name (pid $pid)"
  done
  for name in "$@"; do rm -f "$dir/$name.pid"; done
  [[ ${#stopped[@]} -gt 0 ]] || _lib_log "nothing was running"
}

_lib_log() {
  if declare -F log >/dev/null; then log "$@"; else echo "$*"; fi
}
