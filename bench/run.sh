#!/usr/bin/env bash
# The benchmark suite: nchan, Pushpin, quickim standalone and quickim distributed (NATS +
# PostgreSQL) side by side on this machine, every scenario against each of them in turn, one result line
# per run in RESULTS (JSON lines), then the chart and tables for docs/benchmarks.md.
#
#   bench/run.sh [--quick] [--only LIST] [--dir DIR] [--results FILE]
#
#   --quick      small counts (a smoke run of every scenario, about 5 minutes)
#   --only LIST  comma-separated scenario groups: idle, idle50k, idle100k, fanout, many, poll,
#                resume, send, churn (default: all)
#   --dir DIR    working directory for the servers (default: ./data/bench)
#   --results F  results file (default: DIR/results.jsonl; appended to)
#
# Needs: nginx + libnginx-mod-nchan (bench/nchan/start.sh installs them), pushpin + python3
# (bench/pushpin/start.sh installs pushpin), nats-server and
# PostgreSQL at $PG_URL (see deploy/local-cluster.sh). Everything listens on 127.0.0.1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

quick=no
only=idle,idle50k,idle100k,fanout,many,poll,resume,send,churn
dir=./data/bench
results=
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=yes; shift ;;
    --only) only=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
  esac
done
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
results=${results:-$dir/results.jsonl}
wants() { [[ ",$only," == *",$1,"* ]]; }
log() { printf '\n== %s\n' "$*" >&2; }

ulimit -n "$(ulimit -Hn)"
cargo build --release -p quickim -p quickim-bench
bin=$root/target/release/quickim
bench=$root/target/release/quickim-bench

# --- the servers -------------------------------------------------------------------------
nchan_port=18090
pushpin_port=18095 pushpin_origin=18096 pushpin_pub=18097
q_public=127.0.0.1:18080 q_inner=127.0.0.1:18081
cluster_base=17500
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
key=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')

stop_all() {
  for n in nchan nchan4; do
    [ -f "$dir/$n/nginx.pid" ] && kill "$(cat "$dir/$n/nginx.pid")" 2>/dev/null || true
  done
  for f in pushpin.pid zurl.pid origin.pid; do
    [ -f "$dir/pushpin/$f" ] && kill "$(cat "$dir/pushpin/$f")" 2>/dev/null || true
  done
  [ -f "$dir/standalone.pid" ] && kill "$(cat "$dir/standalone.pid")" 2>/dev/null || true
  deploy/local-cluster.sh stop --dir "$dir/cluster" --drop-database >/dev/null 2>&1 || true
}
trap stop_all EXIT
stop_all

# nginx's usual setting: one worker per core (quickim runs one runtime thread per core).
start_nchan() {
  [ -f "$dir/nchan/nginx.pid" ] && kill "$(cat "$dir/nchan/nginx.pid")" 2>/dev/null && sleep 1
  rm -rf "$dir/nchan"
  bench/nchan/start.sh "$dir/nchan" "$nchan_port" 2 >/dev/null
}

# Pushpin's runner starts condure (client connections), pushpin-proxy and pushpin-handler;
# bench/pushpin/start.sh starts zurl (requests to the origin) and the origin
# (bench/pushpin/origin.py), which only answers GRIP instructions and holds nothing per
# connection.
stop_pushpin() { # waits until its processes are gone (condure keeps the port while it closes)
  local f pid
  for f in pushpin.pid zurl.pid origin.pid; do
    [ -f "$dir/pushpin/$f" ] || continue
    pid=$(cat "$dir/pushpin/$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  rm -f "$dir/pushpin/"*.pid
}
start_pushpin() {
  stop_pushpin
  while (exec 3<>"/dev/tcp/127.0.0.1/$pushpin_port") 2>/dev/null; do sleep 0.2; done
  rm -rf "$dir/pushpin"
  bench/pushpin/start.sh "$dir/pushpin" "$pushpin_port" "$pushpin_origin" "$pushpin_pub" >/dev/null
}

# Rate limits protect a public deployment: per user (the load generator publishes as few
# users at thousands per second) and per IP address (every client of the benchmark is
# 127.0.0.1), so they are off here. Logs at warn keep the servers' stderr quiet (at the
# default, info, a node logs its start and nothing per request).
export QUICKIM_RATE_LIMIT_PER_S=0 QUICKIM_CONN_RATE_PER_IP=0 QUICKIM_HANDSHAKE_RATE_PER_IP=0 QUICKIM_LOG=warn
start_standalone() { # keeps its data directory across restarts
  if [ -f "$dir/standalone.pid" ]; then
    kill "$(cat "$dir/standalone.pid")" 2>/dev/null || true
    while kill -0 "$(cat "$dir/standalone.pid")" 2>/dev/null; do sleep 0.1; done
  fi
  QUICKIM_DATA_DIR=$dir/standalone QUICKIM_PUBLIC_ADDR=$q_public QUICKIM_INNER_ADDR=$q_inner \
    QUICKIM_JWT_SECRET=$secret QUICKIM_INNER_KEY=$key "$bin" standalone >>"$dir/standalone.log" 2>&1 &
  echo $! >"$dir/standalone.pid"
  for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://$q_public/readyz" 2>/dev/null && break; sleep 0.1; done
}

start_cluster() { # gateways; keeps its database across restarts
  deploy/local-cluster.sh stop --dir "$dir/cluster" >/dev/null 2>&1 || true
  deploy/local-cluster.sh start --dir "$dir/cluster" --base-port "$cluster_base" --gateways "$1" \
    --database quickim_bench --binary "$bin" >/dev/null
  local i gateways=()
  for i in $(seq 1 "$1"); do gateways+=("$(cenv "GATEWAY_${i}_PUBLIC")"); done
  cluster=(--target quickim --name quickim-distributed --inner "http://$(cenv GATEWAY_1_INNER)"
    --inner-key "$(cenv INNER_KEY)" --jwt-secret "$(cenv JWT_SECRET)" --pid-match "$bin gateway")
  cluster2=("${cluster[@]}" --hosts "$(IFS=,; echo "${gateways[*]:0:2}")")
  cluster6=("${cluster[@]}" --hosts "$(IFS=,; echo "${gateways[*]}")")
}
cenv() { sed -n "s/^$1=//p" "$dir/cluster/cluster.env"; }

# Memory per idle connection is measured on freshly started servers: memory freed by an
# earlier scenario stays in a process and would be reused, hiding the cost.
fresh() {
  start_nchan
  start_standalone
  start_cluster 2
}

log "starting nchan (127.0.0.1:$nchan_port), Pushpin (127.0.0.1:$pushpin_port), quickim standalone ($q_public) and quickim distributed"
rm -rf "$dir/standalone" "$dir/nchan4"
psql "${PG_URL:-postgres://postgres@127.0.0.1:5432}/postgres" -qc "DROP DATABASE IF EXISTS quickim_bench WITH (FORCE)" >/dev/null
fresh

# --- the targets ---------------------------------------------------------------------------
# (The trailing space keeps "nchan" from matching the "nchan4" instance.)
nchan=(--target nchan --name nchan --hosts "127.0.0.1:$nchan_port" --pid-match "nginx -p $dir/nchan ")
# Pushpin's proxy queues at most 100 requests for zurl (a compiled-in ZeroMQ high-water mark,
# OUT_HWM in its src/core/zhttpmanager.cpp) and answers the overflow 502: of 10,000
# subscribers connecting 256 at a time, 2,600–3,100 got a 502. Its subscribers connect 32 at
# a time (connection time is not what any scenario compares).
pushpin=(--target pushpin --name pushpin --hosts "127.0.0.1:$pushpin_port" --publish "127.0.0.1:$pushpin_pub"
  --pid-match "$dir/pushpin/" --connecting 32)
standalone=(--target quickim --name quickim --hosts "$q_public" --inner "http://$q_inner"
  --inner-key "$key" --jwt-secret "$secret" --pid-match "$bin standalone")

run() { # scenario args... (target args come first)
  "$bench" run --out "$results" "$@" || log "FAILED: $*"
  sleep 2
}
each() { # scenario-args... : runs them against nchan, standalone and distributed in turn
  run "${nchan[@]}" "$@"
  run "${standalone[@]}" "$@"
  run "${cluster2[@]}" "$@"
}
each4() { # the same, with Pushpin too (scenarios that need no message history)
  run "${nchan[@]}" "$@"
  run "${standalone[@]}" "$@"
  run "${cluster2[@]}" "$@"
  # Pushpin runs alone, freshly started: after a run its proxy and handler kept working
  # for a while (10–20 % of a core after 10,000 long-polls), which slowed the next server.
  start_pushpin
  run "${pushpin[@]}" "$@"
  stop_pushpin
}

# Sizes (the issue's; --quick divides them).
if [ "$quick" = yes ]; then
  n10k=500 n50k=1000 n100k=2000 fan=100 fan_msgs=200 many=200 many_msgs=1000 many_rate=1000 pollers=100 poll_msgs=500
  resume_subs=100 sends=5000 send_rate_sa=2000 send_rate_dist=1000
  churn_subs=100 churn_msgs=1000 churn_rate=20
else
  n10k=10000 n50k=50000 n100k=100000 fan=1000 fan_msgs=1000 many=5000 many_msgs=20000 many_rate=2000 pollers=1000
  poll_msgs=5000
  resume_subs=1000 sends=100000 send_rate_sa=10000 send_rate_dist=5000
  churn_subs=1000 churn_msgs=10000 churn_rate=100
fi

# (a) idle connections: memory per connection.
if wants idle; then
  for p in ws sse poll; do
    fresh
    each4 --scenario "a idle $p ${n10k}" --mode idle --protocol "$p" --subscribers "$n10k" --channels 100
  done
fi
if wants idle50k; then
  # One process may open 20,000 files here: 50,000 connections need several processes on
  # either side (nchan: a second instance with 4 workers; quickim: the distributed gateways).
  bench/nchan/start.sh "$dir/nchan4" $((nchan_port + 1)) 4 >/dev/null
  nchan4=(--target nchan --name nchan --hosts "127.0.0.1:$((nchan_port + 1))" --pid-match "nginx -p $dir/nchan4 ")
  for p in ws sse poll; do
    start_cluster 6
    run "${nchan4[@]}" --scenario "a idle $p ${n50k}" --mode idle --protocol "$p" --subscribers "$n50k" --channels 100
    run "${cluster6[@]}" --scenario "a idle $p ${n50k}" --mode idle --protocol "$p" --subscribers "$n50k" --channels 100
  done
fi
if wants idle100k; then
  start_cluster 6
  run "${cluster6[@]}" --scenario "a idle ws ${n100k}" --mode idle --protocol ws --subscribers "$n100k" \
    --channels 1000 --timeout 120
fi

# Every gateway receives every log entry: the delivery scenarios run on the compose
# topology's two gateways.
if wants idle50k || wants idle100k; then
  start_cluster 2
fi

# (b) fan-out: one conversation, many WebSocket subscribers.
if wants fanout; then
  each4 --scenario "b fan-out ${fan} ws, ${fan_msgs} msgs at 200/s" --mode deliver --protocol ws \
    --subscribers "$fan" --channels 1 --messages "$fan_msgs" --rate 200 --concurrency 16
  each4 --scenario "b fan-out ${fan} ws, ${fan_msgs} msgs full speed" --mode deliver --protocol ws \
    --subscribers "$fan" --channels 1 --messages "$fan_msgs" --concurrency 16
fi

# (c) many small conversations: 2 members each.
if wants many; then
  each4 --scenario "c ${many} conversations x 2, ${many_msgs} msgs" --mode deliver --protocol ws \
    --subscribers $((many * 2)) --channels "$many" --messages "$many_msgs" --concurrency 64
  # At full speed each server runs at its own rate; latencies compare at one rate all three sustain.
  each4 --scenario "c ${many} conversations x 2, ${many_msgs} msgs at ${many_rate}/s" --mode deliver \
    --protocol ws --subscribers $((many * 2)) --channels "$many" --messages "$many_msgs" --rate "$many_rate" \
    --concurrency 64
fi

# (d) long-poll.
if wants poll; then
  each --scenario "d ${pollers} pollers on 100 conversations, ${poll_msgs} msgs" --mode deliver --protocol poll \
    --subscribers "$pollers" --channels 100 --messages "$poll_msgs" --rate 500 --concurrency 16
fi

# (e) resume: drop every connection, publish 100 per conversation, reconnect with cursors.
if wants resume; then
  # nchan resumes from its buffer: EventSource with Last-Event-ID, WebSocket with the
  # `ws+meta.nchan` subprotocol and `last_event_id`. Pushpin keeps no message history (its
  # docs leave missed messages to the origin), so it has no resume to measure.
  each --scenario "e resume ${resume_subs} sse, 100 missed each" --mode resume --protocol sse \
    --subscribers "$resume_subs" --channels 100 --messages 10000 --concurrency 64
  each --scenario "e resume ${resume_subs} ws, 100 missed each" --mode resume --protocol ws \
    --subscribers "$resume_subs" --channels 100 --messages 10000 --concurrency 64
  # The same with quickim's replay window off: every resume reads the store, as one whose
  # missed entries have left the window (hub_replay_window_bytes), of more than a replay page,
  # or on a gateway that restarted since, does.
  export QUICKIM_HUB_REPLAY_WINDOW_BYTES=0
  start_standalone
  start_cluster 2
  for p in sse ws; do
    each --scenario "e resume ${resume_subs} ${p} from the store (window off), 100 missed each" --mode resume \
      --protocol "$p" --subscribers "$resume_subs" --channels 100 --messages 10000 --concurrency 64
  done
  unset QUICKIM_HUB_REPLAY_WINDOW_BYTES
  start_standalone
  start_cluster 2
fi

# (f) persisted sends (nchan's publish, kept in memory only, is shown for reference).
if wants send; then
  each --scenario "f sends full speed" --mode send --channels 1000 --messages "$sends" --concurrency 128
  run "${standalone[@]}" --scenario "f sends at ${send_rate_sa}/s" --mode send --channels 1000 \
    --messages $((send_rate_sa * 5)) --rate "$send_rate_sa" --concurrency 128
  run "${cluster2[@]}" --scenario "f sends at ${send_rate_dist}/s" --mode send --channels 1000 \
    --messages $((send_rate_dist * 5)) --rate "$send_rate_dist" --concurrency 128
  # A chat client's path: as a member through /send_msg (token, membership), each send with its
  # idempotency key. nchan has neither, so quickim only.
  run "${standalone[@]}" --scenario "f member sends with keys, full speed" --mode send --channels 1000 \
    --messages "$sends" --concurrency 128 --pub-mode client --keys
  run "${cluster2[@]}" --scenario "f member sends with keys, full speed" --mode send --channels 1000 \
    --messages "$sends" --concurrency 128 --pub-mode client --keys
fi

# (g) connection churn: while messages flow at a fixed rate, subscribers' connections are
# closed, in turn, and reopened at once from where each was (quickim: its cursor, on every
# transport; nchan: Last-Event-ID over EventSource, `last_event_id` with the `ws+meta.nchan`
# WebSocket subprotocol, the long-poll's Last-Modified / ETag; Pushpin: no history, so a
# reopened connection gets what is published from then on, and the gap is lost).
# Last, so that (f) runs on the same database as before this scenario existed.
if wants churn; then
  for p in ws sse poll; do
    # Pushpin's long-poll delivers only what is published while a poll is held (no history:
    # its docs leave recovery to the origin), so a poller loses whatever comes between two
    # polls with or without churn; Pushpin takes part over WebSocket and EventSource.
    servers=each4
    [ "$p" = poll ] && servers=each
    "$servers" --scenario "g churn ${p}: ${churn_subs} subscribers, ${churn_rate} reconnects/s" --mode deliver \
      --protocol "$p" --subscribers "$churn_subs" --channels 100 --messages "$churn_msgs" --rate 1000 \
      --churn "$churn_rate" --concurrency 16
  done
fi

log "results in $results"
"$bench" chart "$results" --svg "$dir/results.svg" --table "$dir/results.md"
log "chart: $dir/results.svg, tables: $dir/results.md"
