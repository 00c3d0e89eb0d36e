#!/usr/bin/env bash
# Run Airflow 3 locally for tldr-vlp: api-server (UI + REST), scheduler, dag-processor, triggerer,
# LocalExecutor + SQLite, DAGs from ./dags; the one listening socket is the api-server's, on 127.0.0.1.
# Ctrl-C or SIGTERM stops all of them.
#
#   scripts/airflow-local.sh                   # UI on http://127.0.0.1:8080
#   AIRFLOW_PORT=8793 scripts/airflow-local.sh
#
# Environment (all optional):
#   AIRFLOW_HOME      default ./airflow_home (config, SQLite DB, logs, the login password)
#   AIRFLOW_PORT      default 8080
#   TLDR_DATA_ROOT    default $AIRFLOW_HOME/data (landing folder, DVC data repo, compressed runs)
#   MLFLOW_TRACKING_URI  default sqlite:///$AIRFLOW_HOME/mlflow.db (every task logs there)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_BIN="${VENV_BIN:-$ROOT/.venv/bin}"
if [ ! -x "$VENV_BIN/airflow" ]; then
    echo "airflow-local.sh: $VENV_BIN/airflow not found; install the project with its airflow extra" \
         "(.venv/bin/pip install -e '.[airflow]')" >&2
    exit 1
fi
mkdir -p "${AIRFLOW_HOME:-$ROOT/airflow_home}"
export AIRFLOW_HOME="$(cd "${AIRFLOW_HOME:-$ROOT/airflow_home}" && pwd)"
PORT="${AIRFLOW_PORT:-8080}"
# Tasks (the local runner's `tldr-vlp`, dvc) must come from the project's venv, not from PATH.
export PATH="$VENV_BIN:$PATH"

export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
export AIRFLOW__API__HOST=127.0.0.1  # it listens on every address otherwise
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$PORT"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$PORT/execution/"
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}"
export AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK=False
# Every process must sign and check task tokens with the same secret: keep one per AIRFLOW_HOME.
SECRET_FILE="$AIRFLOW_HOME/.local-secret"
[ -s "$SECRET_FILE" ] || (umask 077; "$VENV_BIN/python" -c 'import secrets; print(secrets.token_hex(32))' > "$SECRET_FILE")
export AIRFLOW__API_AUTH__JWT_SECRET="$(cat "$SECRET_FILE")"
export AIRFLOW__API__SECRET_KEY="$AIRFLOW__API_AUTH__JWT_SECRET"

export TLDR_DATA_ROOT="${TLDR_DATA_ROOT:-$AIRFLOW_HOME/data}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$AIRFLOW_HOME/mlflow.db}"
mkdir -p "$TLDR_DATA_ROOT/landing" "$AIRFLOW_HOME/logs"

echo "AIRFLOW_HOME=$AIRFLOW_HOME  dags=$AIRFLOW__CORE__DAGS_FOLDER  data=$TLDR_DATA_ROOT"
airflow db migrate > "$AIRFLOW_HOME/logs/db-migrate.log" 2>&1 \
    || { echo "airflow db migrate failed; see $AIRFLOW_HOME/logs/db-migrate.log" >&2; exit 1; }

PIDS=()
stop() {
    trap - INT TERM EXIT
    echo "stopping Airflow..."
    # Each service leads its own process group: signal the groups, so workers and task processes go too.
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 1 30); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 1
    done
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    echo "stopped."
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap 'stop' EXIT

# The scheduler's and the triggerer's log servers would listen on every address (ports 8793 and 8794;
# Airflow 3.3 has no host setting for them): off. Tasks run on this machine and the api-server reads
# their log files from $AIRFLOW_HOME/logs itself. The api-server is then the only listening service.
for service in api-server "scheduler --skip-serve-logs" dag-processor "triggerer --skip-serve-logs"; do
    # shellcheck disable=SC2086 # the service name and its flags are separate words
    setsid airflow $service > "$AIRFLOW_HOME/logs/${service%% *}.log" 2>&1 &
    PIDS+=("$!")
done

URL="http://127.0.0.1:$PORT"
for i in $(seq 1 180); do
    if "$VENV_BIN/python" - "$URL/api/v2/monitor/health" <<'EOF' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()
EOF
    for pid in "${PIDS[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "an Airflow service exited while starting; logs in $AIRFLOW_HOME/logs/:" >&2
            tail -n 20 "$AIRFLOW_HOME"/logs/*.log >&2
            exit 1
        fi
    done
    [ "$i" = 180 ] && { echo "Airflow did not answer on $URL after 180 s; logs in $AIRFLOW_HOME/logs/" >&2; exit 1; }
    sleep 1
done

USER_NAME="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS%%:*}"
echo
echo "Airflow is up: $URL"
echo "  login: $USER_NAME; password in $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
echo "  logs:  $AIRFLOW_HOME/logs/{api-server,scheduler,dag-processor,triggerer}.log"
echo "  MLflow: $VENV_BIN/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI  (http://127.0.0.1:5000," \
     "runs table: #/experiments/<id>/runs?workflowType=machine_learning)"
echo "Ctrl-C stops everything."

# Wait until a service dies (then stop the rest) or a signal arrives.
while true; do
    for pid in "${PIDS[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "an Airflow service (pid $pid) exited; stopping the others. Logs in $AIRFLOW_HOME/logs/" >&2
            exit 1
        fi
    done
    sleep 2 & wait $! || true
done
