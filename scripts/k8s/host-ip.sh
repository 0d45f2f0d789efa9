#!/usr/bin/env bash
# The host's own IPv4 address (the source address of its default route, else its
# first global address): where pods of the local node reach the API server.
set -euo pipefail
ip="$(ip -4 route get 192.0.2.123 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -1)"
[[ -n "$ip" ]] || ip="$(ip -4 -o addr show scope global | awk '{split($4, a, "/"); print a[1]; exit}')"
[[ -n "$ip" ]] || { echo "host-ip.sh: no global IPv4 address on this host" >&2; exit 1; }
echo "$ip"
