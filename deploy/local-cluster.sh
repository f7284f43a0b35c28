#!/usr/bin/env bash
# The topology of deploy/compose.yaml on this machine, from the built binary, all on loopback:
# a nats-server (JetStream on), a PostgreSQL database, 2 conversation services, 2 message
# services, 2 gateways (or as many as --services / --gateways say). For machines without a
# container engine.
#
#   deploy/local-cluster.sh start [--dir DIR] [--base-port PORT] [--binary PATH] [--database NAME]
#                                 [--gateways N] [--services N]
#   deploy/local-cluster.sh status [--dir DIR]
#   deploy/local-cluster.sh stop [--dir DIR] [--drop-database]
#
# Needs nats-server and a PostgreSQL server at $PG_URL (default postgres://postgres@127.0.0.1:5432).
# Traces go wherever QUICKIM_OTLP_ENDPOINT (and QUICKIM_OTLP_PROTOCOL) point, if set.
# `start` writes DIR/cluster.env with every address and the inner key; logs are DIR/*.log.
# Ports from PORT (default 17000): NATS PORT; gateway i public/inner PORT+10i / PORT+10i+1 for
# i ≤ 2, PORT+100+2i / PORT+101+2i beyond; ops listeners of services PORT+30+i (conversation) and
# PORT+40+i (message) for i ≤ 2, PORT+200+i / PORT+300+i beyond.
set -euo pipefail

cmd=${1:-}
shift || true
dir=./data/local-cluster
base=17000
binary=
database=quickim_cluster
drop=no
gateways=2
services=2
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --base-port) base=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --database) database=$2; shift 2 ;;
    --drop-database) drop=yes; shift ;;
    --gateways) gateways=$2; shift 2 ;;
    --services) services=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432}
root=$(cd "$(dirname "$0")/.." && pwd)

gateway_public() { if [ "$1" -le 2 ]; then echo $((base + 10 * $1)); else echo $((base + 100 + 2 * $1)); fi; }
conversation_ops() { if [ "$1" -le 2 ]; then echo $((base + 30 + $1)); else echo $((base + 200 + $1)); fi; }
message_ops() { if [ "$1" -le 2 ]; then echo $((base + 40 + $1)); else echo $((base + 300 + $1)); fi; }

nats_bin() {
  for b in nats-server /usr/sbin/nats-server /usr/bin/nats-server; do
    if command -v "$b" >/dev/null 2>&1; then echo "$b"; return; fi
  done
  echo "nats-server not found (apt-get install nats-server)" >&2; exit 1
}

wait_http() { # url seconds
  for _ in $(seq 1 $(( $2 * 10 ))); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2; return 1
}

start() {
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -z "$binary" ]; then
    if [ -x "$root/target/release/quickim" ]; then binary=$root/target/release/quickim
    elif [ -x "$root/target/debug/quickim" ]; then binary=$root/target/debug/quickim
    else echo "build quickim first (cargo build --release) or pass --binary" >&2; exit 1; fi
  fi
  local nats_port=$base
  # Every port must be free: a node of another cluster on one of them would answer the
  # readiness checks below in place of the node that could not listen.
  local port ports=("$nats_port") i
  for i in $(seq 1 "$services"); do ports+=("$(conversation_ops "$i")" "$(message_ops "$i")"); done
  for i in $(seq 1 "$gateways"); do ports+=("$(gateway_public "$i")" $(($(gateway_public "$i") + 1))); done
  for port in "${ports[@]}"; do
    for _ in $(seq 1 20); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || continue 2; sleep 0.1; done
    echo "port $port is in use (another cluster? deploy/local-cluster.sh stop --dir ...; or --base-port)" >&2
    exit 1
  done
  "$(nats_bin)" -a 127.0.0.1 -p "$nats_port" -js -sd "$dir/jetstream" >"$dir/nats.log" 2>&1 &
  echo $! >"$dir/nats.pid"
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break; sleep 0.1; done

  if [ -z "$(psql "$pg_url/postgres" -Atqc "select 1 from pg_database where datname = '$database'")" ]; then
    psql "$pg_url/postgres" -qc "CREATE DATABASE $database" >/dev/null
  fi

  local jwt inner
  jwt=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  inner=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  export QUICKIM_NATS_URL="nats://127.0.0.1:$nats_port"
  export QUICKIM_DATABASE_URL="$pg_url/$database"
  export QUICKIM_JWT_SECRET=$jwt QUICKIM_INNER_KEY=$inner
  export QUICKIM_DB_MAX_CONNECTIONS=${QUICKIM_DB_MAX_CONNECTIONS:-8}

  {
    echo "NATS_URL=$QUICKIM_NATS_URL"
    echo "DATABASE_URL=$QUICKIM_DATABASE_URL"
    echo "DATABASE_NAME=$database"
    echo "INNER_KEY=$inner"
    echo "JWT_SECRET=$jwt"
  } >"$dir/cluster.env"

  # Each gateway may hold as many connections as the process may open files.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  local i
  for i in $(seq 1 "$services"); do
    QUICKIM_NODE_ID=conversation-$i QUICKIM_OPS_ADDR=127.0.0.1:$(conversation_ops "$i") \
      "$binary" conversation >"$dir/conversation-$i.log" 2>&1 &
    echo $! >"$dir/conversation-$i.pid"
    echo "CONVERSATION_${i}_OPS=127.0.0.1:$(conversation_ops "$i")" >>"$dir/cluster.env"
    QUICKIM_NODE_ID=message-$i QUICKIM_OPS_ADDR=127.0.0.1:$(message_ops "$i") \
      "$binary" message >"$dir/message-$i.log" 2>&1 &
    echo $! >"$dir/message-$i.pid"
    echo "MESSAGE_${i}_OPS=127.0.0.1:$(message_ops "$i")" >>"$dir/cluster.env"
  done
  for i in $(seq 1 "$gateways"); do
    local public=127.0.0.1:$(gateway_public "$i") inner=127.0.0.1:$(($(gateway_public "$i") + 1))
    QUICKIM_NODE_ID=gateway-$i QUICKIM_PUBLIC_ADDR=$public QUICKIM_INNER_ADDR=$inner \
      "$binary" gateway >"$dir/gateway-$i.log" 2>&1 &
    echo $! >"$dir/gateway-$i.pid"
    echo "GATEWAY_${i}_PUBLIC=$public" >>"$dir/cluster.env"
    echo "GATEWAY_${i}_INNER=$inner" >>"$dir/cluster.env"
  done
  for i in $(seq 1 "$gateways"); do
    wait_http "http://127.0.0.1:$(gateway_public "$i")/readyz" 60
  done
  for i in $(seq 1 "$services"); do
    wait_http "http://127.0.0.1:$(conversation_ops "$i")/readyz" 30
    wait_http "http://127.0.0.1:$(message_ops "$i")/readyz" 30
  done
  local pidfile
  for pidfile in "$dir"/*.pid; do
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "$(basename "$pidfile" .pid) exited; its log: $dir/$(basename "$pidfile" .pid).log" >&2
      exit 1
    fi
  done
  echo "quickim cluster up (state and logs in $dir):"
  sed 's/^/  /' "$dir/cluster.env" | grep -v 'INNER_KEY\|JWT_SECRET'
  echo "  inner key and token secret: see $dir/cluster.env"
}

stop() {
  [ -d "$dir" ] || { echo "no cluster in $dir"; return 0; }
  local f pid
  for f in "$dir"/gateway-*.pid "$dir"/conversation-*.pid "$dir"/message-*.pid "$dir"/nats.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
  done
  for f in "$dir"/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  if [ "$drop" = yes ]; then
    if [ -f "$dir/cluster.env" ]; then
      database=$(sed -n 's/^DATABASE_NAME=//p' "$dir/cluster.env")
    fi
    psql "$pg_url/postgres" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null
  fi
  echo "quickim cluster in $dir stopped"
}

status() {
  local f
  for f in "$dir"/*.pid; do
    [ -f "$f" ] || continue
    if kill -0 "$(cat "$f")" 2>/dev/null; then echo "$(basename "$f" .pid): running"; else echo "$(basename "$f" .pid): stopped"; fi
  done
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
