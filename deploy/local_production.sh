#!/usr/bin/env bash
# The production profile on one machine: PostgreSQL (Dagster run/event-log/schedule storage and
# the MLflow backend store) and an `mlflow server` with its own artifact store, both on
# 127.0.0.1, the lineage materialized against them. The README's "Production profile" section
# runs exactly these subcommands, and so does tests/test_production.py.
#
#   deploy/local_production.sh up              start PostgreSQL + mlflow server, write dagster.yaml
#   deploy/local_production.sh env             the variables that point Dagster/MLflow clients at them
#   deploy/local_production.sh run [CONFIG]    `rlhf run --config CONFIG` (lineage + promotion)
#   deploy/local_production.sh champion        load models:/rlhf-policy@champion from the server, generate
#   deploy/local_production.sh down            stop both (the data stays in RLHF_PROD_DIR)
#
# Settings (environment): RLHF_PROD_DIR (default ./.rlhf-prod), RLHF_PG_PORT (5433),
# RLHF_MLFLOW_PORT (5001), DAGSTER_PG_PASSWORD (rlhf-local: a loopback-only demo password),
# RLHF_BIN (the venv's bin/, default .venv/bin of the checkout), PG_BIN (/usr/lib/postgresql/*/bin).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROD_DIR=$(mkdir -p "${RLHF_PROD_DIR:-$PWD/.rlhf-prod}" && cd "${RLHF_PROD_DIR:-$PWD/.rlhf-prod}" && pwd)
PG_PORT=${RLHF_PG_PORT:-5433}
MLFLOW_PORT=${RLHF_MLFLOW_PORT:-5001}
PG_USER=rlhf
export DAGSTER_PG_PASSWORD=${DAGSTER_PG_PASSWORD:-rlhf-local}
BIN=${RLHF_BIN:-$ROOT/.venv/bin}
[ -x "$BIN/rlhf" ] || BIN=$(dirname "$(command -v rlhf)")
PG_DATA=$PROD_DIR/postgres
MLFLOW_URI=http://127.0.0.1:$MLFLOW_PORT

pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  # shellcheck disable=SC2012  # version-sorted folder names, no odd characters
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
  local bin; bin=$(pg_bin)
  [ -x "$bin/initdb" ] || { echo "no PostgreSQL binaries (apt-get install -y postgresql)" >&2; exit 1; }
  mkdir -p "$PG_DATA"
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$PG_DATA" && chmod 700 "$PG_DATA"
    as_pg test -w "$PG_DATA" || { echo "user postgres cannot reach $PG_DATA: use an RLHF_PROD_DIR whose parents are world-searchable" >&2; exit 1; }
  fi
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    local pwfile="$PG_DATA.pwfile"
    (umask 077; echo "$DAGSTER_PG_PASSWORD" >"$pwfile")
    [ "$(id -u)" = 0 ] && chown postgres "$pwfile"
    as_pg "$bin/initdb" -D "$PG_DATA" -U "$PG_USER" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 >/dev/null
    rm -f "$pwfile"
  fi
  # TCP on loopback only; the socket lives in the data folder, not in /var/run/postgresql.
  as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$PG_DATA" start >/dev/null
  local db
  for db in dagster mlflow; do
    if ! PGPASSWORD=$DAGSTER_PG_PASSWORD "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      PGPASSWORD=$DAGSTER_PG_PASSWORD "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$db"
    fi
  done
}

write_dagster_yaml() {
  mkdir -p "$PROD_DIR/dagster_home"
  # run_monitoring as in the embedded default (pipelines/cli.py DEFAULT_DAGSTER_YAML): the
  # daemon frees the pool slot of a run worker killed by OOM.
  cat >"$PROD_DIR/dagster_home/dagster.yaml" <<YAML
# Production profile written by deploy/local_production.sh: PostgreSQL run, event-log and
# schedule storage. The password is read from the environment when the instance loads.
telemetry:
  enabled: false
storage:
  postgres:
    postgres_db:
      hostname: 127.0.0.1
      port: $PG_PORT
      username: $PG_USER
      password:
        env: DAGSTER_PG_PASSWORD
      db_name: dagster
      # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project ships psycopg2
      scheme: postgresql+psycopg2
concurrency:
  pools:
    default_limit: 1
  runs:
    max_concurrent_runs: 1
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  poll_interval_seconds: 30
  free_slots_after_run_end_seconds: 60
YAML
}

start_mlflow() {
  if [ -f "$PROD_DIR/mlflow.pid" ] && kill -0 "$(cat "$PROD_DIR/mlflow.pid")" 2>/dev/null; then return; fi
  mkdir -p "$PROD_DIR/mlflow-artifacts"
  # Its own session, so `down` stops the server and its workers by the one process-group id.
  setsid "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "postgresql+psycopg2://$PG_USER:$DAGSTER_PG_PASSWORD@127.0.0.1:$PG_PORT/mlflow" \
    --serve-artifacts --artifacts-destination "$PROD_DIR/mlflow-artifacts" \
    --default-artifact-root mlflow-artifacts:/ \
    >"$PROD_DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$PROD_DIR/mlflow.pid"
  local i
  for i in $(seq 1 180); do
    if "$BIN/python" -c "import urllib.request; urllib.request.urlopen('$MLFLOW_URI/health', timeout=2)" 2>/dev/null; then
      return
    fi
    kill -0 "$(cat "$PROD_DIR/mlflow.pid")" 2>/dev/null || { tail -n 30 "$PROD_DIR/mlflow.log" >&2; exit 1; }
    sleep 1
  done
  echo "mlflow server did not answer on $MLFLOW_URI within 180 s; see $PROD_DIR/mlflow.log" >&2
  exit 1
}

print_env() {
  cat <<ENV
export DAGSTER_HOME=$PROD_DIR/dagster_home
export RLHF_HOME=$PROD_DIR/rlhf
export MLFLOW_TRACKING_URI=$MLFLOW_URI
export DAGSTER_PG_PASSWORD=$DAGSTER_PG_PASSWORD
ENV
}

stop_mlflow() {
  local pid
  [ -f "$PROD_DIR/mlflow.pid" ] || return 0
  pid=$(cat "$PROD_DIR/mlflow.pid")
  if kill -TERM -- "-$pid" 2>/dev/null; then
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$PROD_DIR/mlflow.pid"
}

stop_postgres() {
  local bin; bin=$(pg_bin)
  if [ -f "$PG_DATA/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
  fi
}

case "${1:-}" in
  up)
    start_postgres
    write_dagster_yaml
    start_mlflow
    echo "PostgreSQL on 127.0.0.1:$PG_PORT, MLflow on $MLFLOW_URI, DAGSTER_HOME=$PROD_DIR/dagster_home"
    ;;
  env)
    print_env
    ;;
  run)
    eval "$(print_env)"
    cd "$ROOT"
    "$BIN/rlhf" run --config "${2:-configs/tiny.yaml}"
    ;;
  champion)
    eval "$(print_env)"
    "$BIN/python" - <<'PY'
import mlflow

pipe = mlflow.transformers.load_model("models:/rlhf-policy@champion")
prompt = "describe the river please ."
print(pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"])
PY
    ;;
  down)
    stop_mlflow
    stop_postgres
    ;;
  *)
    sed -n '2,17p' "$0" >&2
    exit 2
    ;;
esac
