#!/usr/bin/env bash
# Installs and starts the real services the tests need (none yet; the KV store adds Redis).
set -euo pipefail
case "${1:-start}" in
  start) ;;
  stop) ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
