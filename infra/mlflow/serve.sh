#!/usr/bin/env bash
# Start an MLflow tracking server for the SORS pipeline.
#
#   infra/mlflow/serve.sh                                   # SQLite + local artifacts, 127.0.0.1:5000
#   infra/mlflow/serve.sh --port 5050 --home /srv/mlflow    # another port / folder
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.internal:5432/mlflow \
#       infra/mlflow/serve.sh --backend postgres --artifacts s3://my-bucket/mlflow --host 0.0.0.0
#   infra/mlflow/serve.sh --print                           # show the mlflow command, start nothing
#
# Backend store
#   sqlite   (default) sqlite:///<home>/mlflow.db -- one machine, one server process writing.
#   postgres the URI comes from $MLFLOW_BACKEND_STORE_URI (or --backend-store-uri), never from a file
#            in this repository. Keep the password out of the URI: libpq reads $PGPASSWORD or
#            ~/.pgpass (PGPASSFILE). Needs the driver: pip install psycopg2-binary.
# Artifacts
#   The server proxies artifacts (--serve-artifacts) to --artifacts (default <home>/artifacts; may be
#   s3://, gs://, a shared mount...), so clients on cluster nodes need only HTTP access to the server,
#   not the artifact store's credentials.
# Network
#   Binds 127.0.0.1 unless --host says otherwise. Nothing here adds authentication: before binding a
#   routable address, put the server behind a network you trust (or a proxy with auth), and list the
#   names clients use in --allowed-hosts (MLflow rejects other Host headers).
#
# Options (environment variable in brackets):
#   --backend sqlite|postgres     [SORS_MLFLOW_BACKEND, default sqlite]
#   --backend-store-uri URI       [MLFLOW_BACKEND_STORE_URI] overrides the backend's default URI
#   --home DIR                    [SORS_MLFLOW_HOME, default ./results/mlflow-server] SQLite file and artifacts
#   --artifacts URI               [SORS_MLFLOW_ARTIFACTS, default <home>/artifacts]
#   --host ADDR                   [SORS_MLFLOW_HOST, default 127.0.0.1]
#   --port N                      [SORS_MLFLOW_PORT, default 5000]
#   --workers N                   [SORS_MLFLOW_WORKERS, default 2]
#   --allowed-hosts LIST          [SORS_MLFLOW_ALLOWED_HOSTS] comma list passed to mlflow (see above)
#   --print                       print the command and exit
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
BACKEND=${SORS_MLFLOW_BACKEND:-sqlite}
STORE_URI=${MLFLOW_BACKEND_STORE_URI:-}
HOME_DIR=${SORS_MLFLOW_HOME:-$repo/results/mlflow-server}
ARTIFACTS=${SORS_MLFLOW_ARTIFACTS:-}
HOST=${SORS_MLFLOW_HOST:-127.0.0.1}
PORT=${SORS_MLFLOW_PORT:-5000}
WORKERS=${SORS_MLFLOW_WORKERS:-2}
ALLOWED=${SORS_MLFLOW_ALLOWED_HOSTS:-}
PRINT=0

die() { echo "mlflow-serve: $*" >&2; exit 2; }
need() { [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
while [ "$#" -gt 0 ]; do
    case $1 in
        --backend) need "$@"; BACKEND=$2; shift 2 ;;
        --backend-store-uri) need "$@"; STORE_URI=$2; shift 2 ;;
        --home) need "$@"; HOME_DIR=$2; shift 2 ;;
        --artifacts) need "$@"; ARTIFACTS=$2; shift 2 ;;
        --host) need "$@"; HOST=$2; shift 2 ;;
        --port) need "$@"; PORT=$2; shift 2 ;;
        --workers) need "$@"; WORKERS=$2; shift 2 ;;
        --allowed-hosts) need "$@"; ALLOWED=$2; shift 2 ;;
        --print) PRINT=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ $PORT =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "--port $PORT is not a port number"
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers $WORKERS is not a positive integer"
HOME_DIR=$(realpath -m -- "$HOME_DIR")
ARTIFACTS=${ARTIFACTS:-$HOME_DIR/artifacts}

case $BACKEND in
    sqlite)
        STORE_URI=${STORE_URI:-sqlite:///$HOME_DIR/mlflow.db} ;;
    postgres|postgresql)
        [ -n "$STORE_URI" ] || die "--backend postgres needs MLFLOW_BACKEND_STORE_URI (postgresql://user@host:5432/db; password via PGPASSWORD or ~/.pgpass)"
        [[ $STORE_URI == postgresql* ]] || die "MLFLOW_BACKEND_STORE_URI must start with postgresql:// for --backend postgres"
        [[ $STORE_URI != *@* || ${STORE_URI%%@*} != *://*:* ]] || echo "mlflow-serve: warning: the store URI carries a password; prefer PGPASSWORD or ~/.pgpass" >&2 ;;
    *) die "--backend $BACKEND: expected sqlite or postgres" ;;
esac

if [ -x "$repo/.venv/bin/mlflow" ]; then MLFLOW="$repo/.venv/bin/mlflow"; else MLFLOW=${MLFLOW:-mlflow}; fi
cmd=("$MLFLOW" server
     --backend-store-uri "$STORE_URI"
     --serve-artifacts --artifacts-destination "$ARTIFACTS"
     --host "$HOST" --port "$PORT" --workers "$WORKERS")
[ -z "$ALLOWED" ] || cmd+=(--allowed-hosts "$ALLOWED")

if [ "$PRINT" -eq 1 ]; then
    # The store URI is printed without any password it may hold.
    printf '%q ' "${cmd[@]}" | sed -E 's#(postgresql[^:]*://[^:/@]+):[^@]*@#\1:***@#'; echo
    exit 0
fi
if [ "$BACKEND" != sqlite ]; then
    py=$(dirname "$(command -v "$MLFLOW")")/python
    [ -x "$py" ] || py=python3
    "$py" -c 'import psycopg2' 2>/dev/null || die "the PostgreSQL driver is missing: pip install psycopg2-binary"
fi
mkdir -p "$HOME_DIR" || die "cannot create $HOME_DIR"
[[ $ARTIFACTS == *://* ]] || mkdir -p "$ARTIFACTS" || die "cannot create $ARTIFACTS"
[ "$HOST" = 127.0.0.1 ] || [ "$HOST" = localhost ] || [ "$HOST" = ::1 ] \
    || echo "mlflow-serve: warning: binding $HOST; the server has no authentication" >&2
echo "mlflow-serve: tracking URI http://$HOST:$PORT (store $BACKEND, artifacts $ARTIFACTS)" >&2
exec "${cmd[@]}"
