#!/usr/bin/env bash
# A real Kafka-protocol broker for tests and local runs without Docker: nisshi, pinned.
#
#   scripts/kafka-broker.sh install                  # once per machine, cached; prints the binary's path
#   scripts/kafka-broker.sh start [memory|postgres]  # prints BROKER_PID=… KAFKA_BROKERS=127.0.0.1:PORT BROKER_LOG=…
#   scripts/kafka-broker.sh stop PID
#
# install: uses $NISSHI_BIN when it is a nisshi of the pinned version (a prebuilt copy), else the cached build in
# $NISSHI_ROOT (default ~/.cache/nisshi-VERSION), else builds it with `cargo install` (about 12 minutes on
# 2 cores; nisshi declares a newer rust-version than it needs, hence --ignore-rust-version).
# start: memory storage is fastest; postgres storage survives a broker restart (it needs ?sslmode=disable).
# The broker reads ./.env from its working directory, so it is started from an empty directory.
set -euo pipefail

NISSHI_VERSION=${NISSHI_VERSION:-0.8.1}
NISSHI_ROOT=${NISSHI_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/nisshi-$NISSHI_VERSION}
cached="$NISSHI_ROOT/bin/nisshi"

is_pinned() { [ -x "$1" ] && "$1" --version 2>/dev/null | grep -q " $NISSHI_VERSION\$"; }

install() {
  if [ -n "${NISSHI_BIN:-}" ] && is_pinned "$NISSHI_BIN"; then
    # Copy only when the cache lacks it; copy then rename, so a running cached broker is never overwritten.
    if [ "$NISSHI_BIN" != "$cached" ] && ! is_pinned "$cached"; then
      mkdir -p "$NISSHI_ROOT/bin"; cp "$NISSHI_BIN" "$cached.tmp.$$"; mv -f "$cached.tmp.$$" "$cached"
    fi
    echo "$cached"; return
  fi
  if is_pinned "$cached"; then echo "$cached"; return; fi
  echo "kafka-broker: building nisshi $NISSHI_VERSION (once per machine)…" >&2
  local target=${NISSHI_TARGET:-$NISSHI_ROOT/target}
  CARGO_TARGET_DIR=$target cargo install nisshi --version "=$NISSHI_VERSION" --locked --ignore-rust-version \
    --no-default-features --features dynostore,postgres --root "$NISSHI_ROOT" >&2
  rm -rf "$target"
  echo "$cached"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
  local storage=${1:-memory} port=${2:-$(free_port)} engine workdir pid
  local bin=${NISSHI_BIN:-$cached}
  is_pinned "$bin" || bin=$(install)
  case $storage in
    memory) engine="memory://nisshi/" ;;
    postgres)
      local admin=${LEDGER_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
      local database="nisshi_$port"
      psql "$admin" -qc "drop database if exists $database with (force)" -qc "create database $database" >&2
      engine="${admin%/*}/$database?sslmode=disable" ;;
    *) echo "kafka-broker: unknown storage '$storage' (memory or postgres)" >&2; return 2 ;;
  esac
  workdir=$(mktemp -d -t nisshi.XXXXXX)
  (cd "$workdir" && exec "$bin" broker --listener-url "tcp://127.0.0.1:$port" \
     --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "$engine" \
     --group-initial-rebalance-delay 0s) >"$workdir/broker.log" 2>&1 &
  pid=$!
  for _ in $(seq 150); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "BROKER_PID=$pid KAFKA_BROKERS=127.0.0.1:$port BROKER_LOG=$workdir/broker.log"; return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$workdir/broker.log" >&2; return 1; fi
    sleep 0.1
  done
  echo "kafka-broker: nisshi did not open port $port within 15 s" >&2; kill "$pid"; return 1
}

stop() { kill "$1" 2>/dev/null && wait "$1" 2>/dev/null || true; }

command=${1:-}; shift || true
case $command in
  install) install ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  *) echo "usage: $0 install | start [memory|postgres] [port] | stop PID" >&2; exit 2 ;;
esac
