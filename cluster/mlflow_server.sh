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
# s3://bucket/distnet), MLFLOW (the mlflow command: the one on PATH), MLFLOW_ALLOWED_HOSTS (the Host
# headers it answers: by default this host's names and addresses, see below), MLFLOW_AUTH (basic;
# `none` serves without a login, for measuring what the login costs: docs/benchmarks.md), MLFLOW_SGI
# (gunicorn; `uvicorn` serves as MLflow does by default, for measuring one against the other).
#
# Only those with the login reach the runs: MLflow's basic-auth app. At the first start an admin
# password is generated and kept in STATE_DIR/credentials (mode 0600, readable by this user only),
# as the environment variables MLflow's clients take:
#   set -a; . STATE_DIR/credentials; set +a     # MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
# distnet's driver reads them from its environment and hands them to its trainings through Ray. The
# users are kept in PostgreSQL beside the runs (database mlflow_auth); more are added with MLflow's
# user API or its UI, as the admin.
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
# Creates database $1 unless it is there; says whether it did (status 0).
create_db() {
  as_pg "$pgbin/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$1'" | grep -q 1 && return 1
  as_pg "$pgbin/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow "$1" || { echo "mlflow_server.sh: createdb $1 failed" >&2; exit 1; }
}
create_db mlflow || true

auth=${MLFLOW_AUTH:-basic}
if [ "$auth" = basic ]; then
  if create_db mlflow_auth; then fresh_users=1; else fresh_users=; fi
  if [ ! -f "$state/credentials" ]; then
    # MLflow makes the admin from this password once, while its user store is empty: with the file
    # lost and the user store kept, a new password would not be taken. Say so instead.
    if [ -z "$fresh_users" ]; then
      echo "mlflow_server.sh: $state/credentials is gone but the user store (database mlflow_auth) is not:" \
           "restore the file, or drop that database to make a new admin" >&2
      exit 1
    fi
    (umask 077; printf 'MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=%s\n' \
      "$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')" >"$state/credentials")
  fi
  chmod 600 "$state/credentials"
  # The key that signs the UI's CSRF tokens (the auth app's forms): one per server, kept, so that a
  # restart and every worker take the same.
  [ -f "$state/flask_secret" ] || (umask 077; head -c 32 /dev/urandom | base64 >"$state/flask_secret")
  MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$state/flask_secret")
  export MLFLOW_FLASK_SERVER_SECRET_KEY
  # auth_cache_ttl_seconds: a login's password hash (PBKDF2) is checked once a minute per server
  # worker, not at every request (docs/benchmarks.md has what each costs). A password changed
  # through the API is taken at once by the worker that changed it, by the others within the TTL.
  (umask 077; cat >"$state/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = postgresql://mlflow@127.0.0.1:$pg_port/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL:-60}
EOF
  )
  # MLflow's basic-auth app, with a full artifact store answered as such (distnet/server_app.py)
  app=(--app-name distnet-basic-auth)
  export MLFLOW_AUTH_CONFIG_PATH="$state/basic_auth.ini"
  MLFLOW_AUTH_ADMIN_PASSWORD=$(sed -n 's/^MLFLOW_TRACKING_PASSWORD=//p' "$state/credentials")
  export MLFLOW_AUTH_ADMIN_PASSWORD
elif [ "$auth" = none ]; then
  app=()
else
  echo "mlflow_server.sh: MLFLOW_AUTH is basic or none, not $auth" >&2
  exit 2
fi

# The Host headers it answers (a request naming any other host is refused: DNS rebinding): this
# host's names and addresses, with and without the port. A head reached by another DNS name needs
# MLFLOW_ALLOWED_HOSTS=name,name:port,...
port=${MLFLOW_PORT:-5000}
if [ -z "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  names="localhost 127.0.0.1 $(hostname) $(hostname -I 2>/dev/null || true)"
  [ "${MLFLOW_HOST:-0.0.0.0}" != 0.0.0.0 ] && names="$names $MLFLOW_HOST"
  MLFLOW_ALLOWED_HOSTS=$(for n in $names; do
    case $n in *:*) n="[$n]";; esac  # an IPv6 address, as a Host header writes it
    printf '%s,%s:%s,' "$n" "$n" "$port"
  done)
  MLFLOW_ALLOWED_HOSTS=${MLFLOW_ALLOWED_HOSTS%,}
fi

if [ -f "$state/mlflow.pid" ] && kill -0 "$(cat "$state/mlflow.pid")" 2>/dev/null; then
  exit 0
fi
# A session of its own (setsid), so `stop` ends the server and its workers together. Without MLflow's
# job runner (the GenAI judges' queue and its worker processes, which poll all the time): a training
# cluster's tracking server needs none of it, and with it every request took ~40 ms instead of ~7
# here (docs/benchmarks.md). MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in the environment keeps it.
# Served by gunicorn's sync workers (MLflow's --gunicorn-opts), not by MLflow's default uvicorn: the
# same Flask app without the ASGI layers in front of it, which cost the server ~30 % more CPU a
# request here (docs/benchmarks.md). A sync worker answers one request at a time and closes the
# connection after it; `--timeout` lets a long read (a report's listing of 10,000 runs) finish.
# Host checks: the Flask app reads the list from MLFLOW_SERVER_ALLOWED_HOSTS (MLflow accepts
# --allowed-hosts only with uvicorn). MLFLOW_SGI=uvicorn serves as MLflow does by default, for
# measuring one against the other; with it keep one worker (uvicorn issue 3149: with more, every
# request on a kept-alive connection waits ~43 ms for a delayed ACK).
# MLFLOW_WORKERS: server processes, one by default, which leaves the head's other cores to training;
# a head with many cores and many concurrent writers gains from more (docs/benchmarks.md).
case ${MLFLOW_SGI:-gunicorn} in
  gunicorn) sgi=(--gunicorn-opts "--access-logfile - --timeout 300") ;;
  uvicorn) sgi=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS") ;;
  *) echo "mlflow_server.sh: MLFLOW_SGI is gunicorn or uvicorn, not $MLFLOW_SGI" >&2; exit 2 ;;
esac
DISTNET_ARTIFACTS=${ARTIFACTS:-$state/artifacts} \
MLFLOW_SERVER_ALLOWED_HOSTS=$MLFLOW_ALLOWED_HOSTS \
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
setsid "${MLFLOW:-mlflow}" server "${app[@]}" "${sgi[@]}" \
  --backend-store-uri "postgresql://mlflow@127.0.0.1:$pg_port/mlflow" \
  --artifacts-destination "${ARTIFACTS:-$state/artifacts}" \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "$port" --workers "$workers" \
  >"$state/mlflow.log" 2>&1 < /dev/null &
echo $! >"$state/mlflow.pid"
