#!/usr/bin/env bash
# The team services on one machine, each started the standard way: PostgreSQL (Debian's cluster tools) holding the
# stores, an MLflow tracking server on it that serves the artifacts itself, and a Prefect server on it.
#
#   services/services.sh start    # idempotent: starts what is not running (make services)
#   services/services.sh start postgres mlflow   # some of them (postgres is started for either server)
#   services/services.sh stop     # stops all three; data stays (make services-stop); or some: stop mlflow
#   services/services.sh status
#   eval "$(services/services.sh env)"   # point the pipeline at them (MLFLOW_TRACKING_URI, PREFECT_API_URL)
#
# Settings (ports, folders, login): services/config.env.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=config.env
source "$here/config.env"
BIN=${VQPRIOR_BIN:-$here/../.venv/bin}
RUN_DIR=$VQPRIOR_SERVICES_DIR/run
LOG_DIR=$VQPRIOR_SERVICES_DIR/logs
HOST=$VQPRIOR_SERVICES_HOST
MLFLOW_URL=http://$HOST:$MLFLOW_PORT
PREFECT_URL=http://$HOST:$PREFECT_PORT/api
DB_URL=$PG_USER:$PG_PASSWORD@$HOST:$PG_PORT

if [ "$(id -u)" = 0 ]; then
    as_root() { "$@"; }
    as_postgres() { runuser -u postgres -- "$@"; }
else
    as_root() { sudo "$@"; }
    as_postgres() { sudo -u postgres "$@"; }
fi

say() { echo "services: $*"; }
die() { echo "services: error: $*" >&2; exit 1; }

# --- PostgreSQL ------------------------------------------------------------------------------------------------------

pg_state() {  # online, down, or nothing when the cluster does not exist
    pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c {print $4}'
}

psql_admin() { as_postgres psql -X -q -t -A -p "$PG_PORT" -v ON_ERROR_STOP=1 "$@"; }

pg_start() {
    command -v pg_createcluster >/dev/null || die "PostgreSQL is not installed: apt-get install postgresql"
    if [ -z "$(pg_state)" ]; then
        say "creating PostgreSQL cluster $PG_VERSION/$PG_CLUSTER in $PG_DATA (port $PG_PORT)"
        as_root pg_createcluster "$PG_VERSION" "$PG_CLUSTER" --datadir "$PG_DATA" --port "$PG_PORT" \
            --start-conf manual -- --auth-local=peer --auth-host=scram-sha-256 >/dev/null
        # (pg_conftool leaves a dotted address unquoted, which PostgreSQL cannot parse: a conf.d file instead)
        echo "listen_addresses = '$HOST'" | as_root tee "/etc/postgresql/$PG_VERSION/$PG_CLUSTER/conf.d/vqprior.conf" >/dev/null
    fi
    if [ "$(pg_state)" != online ]; then
        as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start || die "PostgreSQL did not start (see pg_lsclusters)"
    fi
    # the login and the two databases, created once
    if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != 1 ]; then
        psql_admin -c "CREATE ROLE \"$PG_USER\" LOGIN PASSWORD '$PG_PASSWORD'"
    fi
    for db in "$MLFLOW_DB" "$PREFECT_DB" "$MLFLOW_AUTH_DB"; do
        if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
            as_postgres createdb -p "$PG_PORT" -O "$PG_USER" "$db"
        fi
    done
    say "PostgreSQL $PG_VERSION/$PG_CLUSTER on $HOST:$PG_PORT (databases $MLFLOW_DB, $PREFECT_DB; data in $PG_DATA)"
}

pg_stop() {
    if [ "$(pg_state)" = online ]; then
        as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop
    fi
}

# --- the two servers: each in its own process group, its pid in RUN_DIR ----------------------------------------------

running() {  # running NAME: the server's process is alive
    local pidfile=$RUN_DIR/$1.pid
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

wait_for() {  # wait_for NAME URL SECONDS: until URL answers, or fail with the log's end
    local deadline=$((SECONDS + $3))
    until curl -fsS -o /dev/null "$2" 2>/dev/null; do
        running "$1" || { tail -n 20 "$LOG_DIR/$1.log" >&2; die "$1 exited at start-up (log: $LOG_DIR/$1.log)"; }
        [ $SECONDS -lt "$deadline" ] || die "$1 did not answer at $2 within $3 s (log: $LOG_DIR/$1.log)"
        sleep 1
    done
}

launch() {  # launch NAME COMMAND...: in the background, in a new session (stop kills its whole group)
    local name=$1; shift
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    setsid "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$name.pid"
}

halt() {  # halt NAME: SIGTERM to the group, SIGKILL after 20 s
    local pidfile=$RUN_DIR/$1.pid
    running "$1" || { rm -f "$pidfile"; return 0; }
    local pid; pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
    say "$1 stopped"
}

mlflow_start() {
    if ! running mlflow; then
        [ -x "$BIN/mlflow" ] || die "$BIN/mlflow not found: run make install first"
        "$BIN/python" -c "import psycopg2" 2>/dev/null || die "psycopg2 is missing: run make install (pip install -e '.[team]')"
        mkdir -p "$MLFLOW_ARTIFACTS_DIR"
        # artifacts go through the server (--artifacts-destination): a client on another machine never writes to
        # its own disk; runs, params and metrics go to PostgreSQL
        local login=()
        if [ "$MLFLOW_AUTH" = true ]; then
            login=(--app-name basic-auth)
            "$BIN/python" -c "import flask_wtf" 2>/dev/null || die "MLflow's login needs Flask-WTF: run make install (pip install -e '.[team]')"
            mlflow_auth_config
        fi
        MLFLOW_DISABLE_TELEMETRY=true launch mlflow "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" \
            --backend-store-uri "postgresql+psycopg2://$DB_URL/$MLFLOW_DB" \
            --artifacts-destination "$MLFLOW_ARTIFACTS_DIR" --workers 2 "${login[@]}"
    fi
    wait_for mlflow "$MLFLOW_URL/health" 120
    say "MLflow server at $MLFLOW_URL (store: PostgreSQL $MLFLOW_DB; artifacts: $MLFLOW_ARTIFACTS_DIR$( \
        [ "$MLFLOW_AUTH" = true ] && echo "; login required, accounts in PostgreSQL $MLFLOW_AUTH_DB"))"
}

mlflow_auth_config() {  # the basic-auth app's settings (they hold the admin password: readable by this user only)
    local secret=$VQPRIOR_SERVICES_DIR/mlflow-secret-key config=$VQPRIOR_SERVICES_DIR/mlflow-auth.ini
    mkdir -p "$VQPRIOR_SERVICES_DIR"
    (umask 077
     # the key that signs the login forms' CSRF tokens: made once, kept across restarts
     [ -s "$secret" ] || "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$secret"
     printf '%s\n' "[mlflow]" "default_permission = $MLFLOW_DEFAULT_PERMISSION" \
         "database_uri = postgresql+psycopg2://$DB_URL/$MLFLOW_AUTH_DB" \
         "admin_username = $MLFLOW_ADMIN_USER" "admin_password = $MLFLOW_ADMIN_PASSWORD" \
         "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" >"$config")
    export MLFLOW_AUTH_CONFIG_PATH=$config
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$secret")
    export MLFLOW_FLASK_SERVER_SECRET_KEY
}

prefect_start() {
    if ! running prefect; then
        [ -x "$BIN/prefect" ] || die "$BIN/prefect not found: run make install first"
        PREFECT_HOME=$VQPRIOR_SERVICES_DIR/prefect-home \
        PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$DB_URL/$PREFECT_DB" \
        PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
            launch prefect "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT"
    fi
    wait_for prefect "$PREFECT_URL/health" 180
    say "Prefect server at $PREFECT_URL (UI: http://$HOST:$PREFECT_PORT; store: PostgreSQL $PREFECT_DB)"
}

status() {
    echo "PostgreSQL $PG_VERSION/$PG_CLUSTER: $(pg_state || true) (port $PG_PORT)"
    for name in mlflow prefect; do
        if running "$name"; then echo "$name: running (pid $(cat "$RUN_DIR/$name.pid"))"; else echo "$name: stopped"; fi
    done
}

case "${1:-}" in
    start) shift; wanted=" ${*:-postgres mlflow prefect} "
           pg_start
           [[ $wanted == *" mlflow "* ]] && mlflow_start
           [[ $wanted == *" prefect "* ]] && prefect_start
           say "use them: eval \"\$($0 env)\"" ;;
    stop) shift; wanted=" ${*:-postgres mlflow prefect} "
          [[ $wanted == *" prefect "* ]] && halt prefect
          [[ $wanted == *" mlflow "* ]] && halt mlflow
          [[ $wanted == *" postgres "* ]] && pg_stop
          say "stopped (data kept in $PG_DATA and $VQPRIOR_SERVICES_DIR)" ;;
    status) status ;;
    env) echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"; echo "export PREFECT_API_URL=$PREFECT_URL" ;;
    *) echo "usage: $0 start|stop [postgres|mlflow|prefect ...] | status | env" >&2; exit 2 ;;
esac
