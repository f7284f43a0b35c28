#!/usr/bin/env bash
# Starts nginx + nchan (Debian's nginx and libnginx-mod-nchan) with bench/nchan/nginx.conf.template.
#   bench/nchan/start.sh DIR PORT [WORKERS]    (prints the master's pid; stop with: kill $(cat DIR/nginx.pid))
set -euo pipefail
dir=$1 port=$2 workers=${3:-2}
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v nginx >/dev/null 2>&1 || [ ! -f /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
  echo "installing nginx and libnginx-mod-nchan" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx libnginx-mod-nchan >/dev/null
  # The package starts a system nginx on port 80; the benchmark runs its own.
  service nginx stop >/dev/null 2>&1 || true
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
sed -e "s|@@DIR@@|$dir|g" -e "s|@@PORT@@|$port|g" -e "s|@@WORKERS@@|$workers|g" "$here/nginx.conf.template" >"$dir/nginx.conf"
nginx -p "$dir" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
for _ in $(seq 1 50); do
  [ -s "$dir/nginx.pid" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
cat "$dir/nginx.pid"
