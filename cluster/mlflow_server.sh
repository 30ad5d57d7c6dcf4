#!/usr/bin/env bash
# The tracking server of a distnet cluster's head: PostgreSQL (the run store, on loopback only) and
# an MLflow server over it that also serves the artifacts, so workers on any node reach everything
# through one HTTP address.
#
#   cluster/mlflow_server.sh start [STATE_DIR]   # default ~/mlflow; idempotent
#   cluster/mlflow_server.sh stop  [STATE_DIR]
#
# Environment: MLFLOW_PORT (5000), MLFLOW_HOST (0.0.0.0), MLFLOW_WORKERS (1, see below), PG_PORT (5432),
# ARTIFACTS (where the server keeps artifacts: STATE_DIR/artifacts, or an object store such as
# s3://bucket/distnet), MLFLOW (the mlflow command: the one on PATH).
# PostgreSQL's tools refuse to run as root: as root they run as the `postgres` user of Debian's
# postgresql package (STATE_DIR/pg is then owned by it). The database listens on 127.0.0.1 only and
# trusts local connections: only the MLflow server on this host talks to it.
set -euo pipefail
action=${1:?usage: mlflow_server.sh start|stop [STATE_DIR]}
state=$(realpath -m "${2:-$HOME/mlflow}")
pg_port=${PG_PORT:-5432}
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$pgbin" ] || { echo "mlflow_server.sh: PostgreSQL not found: apt-get install postgresql" >&2; exit 1; }

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ "$action" = stop ]; then
  if [ -f "$state/mlflow.pid" ]; then
    pid=$(cat "$state/mlflow.pid")
    kill -- "-$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 -- "-$pid" 2>/dev/null || true
    rm -f "$state/mlflow.pid"
  fi
  [ -f "$state/pg/postmaster.pid" ] && as_pg "$pgbin/pg_ctl" -D "$state/pg" -m fast -w stop || true
  exit 0
fi
[ "$action" = start ] || { echo "mlflow_server.sh: unknown action $action" >&2; exit 2; }

mkdir -p "$state/pg"
[ "$(id -u)" = 0 ] && chown postgres "$state/pg"
if [ ! -f "$state/pg/PG_VERSION" ]; then
  as_pg "$pgbin/initdb" -D "$state/pg" -U mlflow --auth=trust -E UTF8 >"$state/initdb.log"
fi
# Each server worker keeps up to 40 database connections (MLflow's default pool, 5 + 10, ran out
# under a 10,000-cell sweep's concurrent writers: requests waited 30 s and failed); PostgreSQL
# admits them all, and a few more for psql.
workers=${MLFLOW_WORKERS:-1}
export MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=${MLFLOW_SQLALCHEMYSTORE_POOL_SIZE:-20}
export MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=${MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW:-20}
max_connections=$(( workers * (MLFLOW_SQLALCHEMYSTORE_POOL_SIZE + MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW) + 10 ))
if ! as_pg "$pgbin/pg_ctl" -D "$state/pg" status >/dev/null 2>&1; then
  as_pg "$pgbin/pg_ctl" -D "$state/pg" -l "$state/pg/server.log" -w \
    -o "-p $pg_port -k $state/pg -c listen_addresses=127.0.0.1 -c max_connections=$max_connections" start >/dev/null
fi
as_pg "$pgbin/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d postgres -tAc \
  "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 ||
  as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow

if [ -f "$state/mlflow.pid" ] && kill -0 "$(cat "$state/mlflow.pid")" 2>/dev/null; then
  exit 0
fi
# A session of its own (setsid), so `stop` ends the server and its workers together. Without MLflow's
# job runner (the GenAI judges' queue and its worker processes, which poll all the time): a training
# cluster's tracking server needs none of it, and with it every request took ~40 ms instead of ~7
# here (docs/benchmarks.md). MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in the environment keeps it.
# One server worker by default: with more, uvicorn (0.54) hands its workers a listening socket on
# which asyncio leaves Nagle's algorithm on, and every request on a kept-alive connection waits ~43 ms
# for the client's delayed ACK (uvicorn issue 3149). One worker served a tiny-cell sweep at 61 ms a
# cell here against 80 ms with four (2 cores, docs/benchmarks.md); on a head with many cores and
# many concurrent writers, more workers may still pay: MLFLOW_WORKERS=N.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
setsid "${MLFLOW:-mlflow}" server \
  --backend-store-uri "postgresql://mlflow@127.0.0.1:$pg_port/mlflow" \
  --artifacts-destination "${ARTIFACTS:-$state/artifacts}" \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "$workers" \
  >"$state/mlflow.log" 2>&1 < /dev/null &
echo $! >"$state/mlflow.pid"
