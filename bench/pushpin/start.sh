#!/usr/bin/env bash
# Starts Pushpin (Debian's `pushpin` package) with bench/pushpin/pushpin.conf.template, and the
# GRIP origin behind it (bench/pushpin/origin.py).
#   bench/pushpin/start.sh DIR PORT ORIGIN_PORT PUB_PORT   (prints pushpin's pid)
# Stop with: kill $(cat DIR/pushpin.pid) $(cat DIR/zurl.pid) $(cat DIR/origin.pid)
# Routes: every path goes to the origin; the WebSocket route speaks WebSocket-over-HTTP
# (`over_http`), so the origin answers each WebSocket as plain HTTP requests.
set -euo pipefail
dir=$1 port=$2 origin_port=$3 pub_port=$4
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v pushpin >/dev/null 2>&1; then
  echo "installing pushpin" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pushpin >/dev/null
  service pushpin stop >/dev/null 2>&1 || true
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/run" "$dir/log"
sed -e "s|@@DIR@@|$dir|g" -e "s|@@PORT@@|$port|g" -e "s|@@PUB_PORT@@|$pub_port|g" \
  -e "s|@@ZMQ_PUSH@@|$((pub_port + 10))|g" -e "s|@@ZMQ_SUB@@|$((pub_port + 11))|g" \
  -e "s|@@ZMQ_CMD@@|$((pub_port + 12))|g" "$here/pushpin.conf.template" >"$dir/pushpin.conf"
echo "* 127.0.0.1:$origin_port,over_http" >"$dir/routes"
sed -e "s|@@DIR@@|$dir|g" -e "s|@@PORT@@|$port|g" "$here/zurl.conf.template" >"$dir/zurl.conf"
zurl --config="$dir/zurl.conf" --logfile="$dir/log/zurl.log" --loglevel=2 >/dev/null 2>&1 &
echo $! >"$dir/zurl.pid"
python3 "$here/origin.py" "$origin_port" >"$dir/origin.log" 2>&1 &
echo $! >"$dir/origin.pid"
pushpin --config="$dir/pushpin.conf" >"$dir/stdout.log" 2>&1 &
echo $! >"$dir/pushpin.pid"
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$pub_port") 2>/dev/null \
    && (exec 3<>"/dev/tcp/127.0.0.1/$origin_port") 2>/dev/null && break
  sleep 0.1
done
cat "$dir/pushpin.pid"
