#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs and starts what is missing
# (nats-server, PostgreSQL, Chromium and the browser client's npm packages), then checks formatting, lints
# and runs every test, the chaos suite (tests/chaos) with one round of faults included.
# Usage: scripts/test.sh [--chaos-rounds N] [extra args for cargo nextest / cargo test]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--chaos-rounds" ]; then
  export QUICKIM_CHAOS_ROUNDS="${2:?--chaos-rounds needs a number}"
  shift 2
fi

log() { printf '\n== %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- curl (deploy/local-cluster.sh waits on /readyz with it)
if ! command -v curl >/dev/null 2>&1; then
  apt_install curl
fi

# --- openssl (the https hook test makes its own CA and certificate with it)
if ! command -v openssl >/dev/null 2>&1; then
  apt_install openssl
fi

# --- nats-server (tests start their own on free ports; only the binary is needed)
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  apt_install nats-server
fi

# --- PostgreSQL (tests create and drop their own databases)
PG_BASE="${QUICKIM_TEST_PG:-postgres://postgres@127.0.0.1:5432}"
pg_ok() { psql "$1/postgres" -Atqc 'select 1' >/dev/null 2>&1; }
if ! command -v psql >/dev/null 2>&1; then
  apt_install postgresql postgresql-client
fi
if ! pg_ok "$PG_BASE"; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    ver=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting PostgreSQL $ver"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
fi
if ! pg_ok "$PG_BASE"; then
  # A fresh Debian cluster wants a password over TCP: give the postgres role one.
  log "setting a password for the postgres role (test clusters only)"
  as_root runuser -u postgres -- psql -qc "ALTER ROLE postgres PASSWORD 'postgres'" >/dev/null
  PG_BASE="postgres://postgres:postgres@127.0.0.1:5432"
fi
pg_ok "$PG_BASE" || { echo "PostgreSQL is not reachable at $PG_BASE" >&2; exit 1; }
export QUICKIM_TEST_PG="$PG_BASE"
# Databases left behind by interrupted runs.
for db in $(psql "$PG_BASE/postgres" -Atqc "select datname from pg_database where datname like 'quickim_t_%'"); do
  psql "$PG_BASE/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
done

# --- Chromium, for the browser test of /notify
if ! command -v chromium >/dev/null 2>&1; then
  apt_install chromium || echo "chromium could not be installed; the browser test will fail" >&2
fi

# --- schemathesis (tests/api/schema.rs runs it against the served OpenAPI document)
SCHEMATHESIS_VERSION=4.32.5
if ! target/venv/bin/st --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  log "installing schemathesis $SCHEMATHESIS_VERSION into target/venv"
  if ! python3 -m venv target/venv >/dev/null 2>&1; then
    apt_install python3-venv
    python3 -m venv target/venv
  fi
  target/venv/bin/pip install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# The browser client (clients/js): its packages from the npm registry (versions pinned in
# package-lock.json), its build (dist/, which the gateway serves at /demo) and its tests —
# unit tests, then headless Chromium against the quickim binary.
if ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
log "cargo build (the binary the browser client's tests run)"
cargo build -p quickim
log "clients/js: npm ci, build, tests"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm run typecheck && npm test)
# Doc tests first: the whole suite's summary is the last line of the run.
log "doc tests"
cargo test --workspace --doc
log "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
