#!/usr/bin/env bash
# Installs and starts the real services the tests need: a loopback-only redis-server for the Redis KV store.
# Idempotent: `start` twice leaves one server running; `stop` stops it. Tests find it through
# RAGZIP_TEST_REDIS_URL (default redis://127.0.0.1:${RAGZIP_REDIS_PORT:-6390}/0).
set -euo pipefail
PORT="${RAGZIP_REDIS_PORT:-6390}"
DIR="${RAGZIP_SERVICES_DIR:-${TMPDIR:-/tmp}/ragzip-services}"
PIDFILE="$DIR/redis-$PORT.pid"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

install_redis() {
  command -v redis-server >/dev/null && return 0
  echo "services: installing redis-server" >&2
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
  mkdir -p "$DIR"
  if running; then echo "services: redis already running on 127.0.0.1:$PORT"; return 0; fi
  if ! install_redis; then echo "services: could not install redis-server (Redis tests will skip)" >&2; return 1; fi
  redis-server --bind 127.0.0.1 --port "$PORT" --protected-mode yes --daemonize yes --pidfile "$PIDFILE" \
    --dir "$DIR" --save "" --appendonly no --maxmemory 256mb --maxmemory-policy allkeys-lru \
    --logfile "$DIR/redis-$PORT.log"
  for _ in $(seq 50); do
    if redis-cli -p "$PORT" ping >/dev/null 2>&1; then echo "services: redis on 127.0.0.1:$PORT"; return 0; fi
    sleep 0.1
  done
  echo "services: redis did not answer on port $PORT (see $DIR/redis-$PORT.log)" >&2; return 1
}

stop() {
  if running; then kill "$(cat "$PIDFILE")"; rm -f "$PIDFILE"; echo "services: redis stopped"; fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
