#!/usr/bin/env bash
# Run one `sors nightly` on a single machine, for cron (see infra/cron/crontab).
#
#   infra/cron/sors-nightly.sh                       # the default nightly (infra/nightly/fashion-mnist.yaml)
#   infra/cron/sors-nightly.sh --config infra/nightly/smoke.yaml --set eval.n_examples=256
#
# Arguments, when given, replace the default `--config ...` and go to `sors nightly` as they are.
# What this wrapper adds around it:
#   - a lock (flock on $SORS_NIGHTLY_LOCK): a second nightly started while one runs refuses to start
#     and exits 2 ("could not run"), so two nightlies never share the GPU or the results folder;
#   - one log file per run under $SORS_NIGHTLY_LOG_DIR, older logs gzipped, only the newest
#     $SORS_NIGHTLY_KEEP_LOGS kept, `latest.log` pointing at the newest;
#   - the exit code of `sors nightly` (0 no regression, 1 regression, 2 could not run) is this
#     script's exit code, also written to $SORS_NIGHTLY_STATE/last-exit-code; on a non-zero code
#     one line goes to stderr, which cron mails to MAILTO;
#   - a wall-clock limit ($SORS_NIGHTLY_TIMEOUT, default 20h); running past it counts as exit 2.
#
# Environment (all optional):
#   SORS_HOME               repository checkout (default: two folders above this script)
#   SORS_BIN                the `sors` command (default: $SORS_HOME/.venv/bin/sors, else `sors` on PATH)
#   SORS_RESULTS_DIR        results folder passed as --results-dir (default: $SORS_HOME/results)
#   SORS_NIGHTLY_STATE      lock, logs and last exit code (default: $SORS_RESULTS_DIR/nightly)
#   SORS_NIGHTLY_LOCK       lock file (default: $SORS_NIGHTLY_STATE/nightly.lock)
#   SORS_NIGHTLY_LOG_DIR    log folder (default: $SORS_NIGHTLY_STATE/logs)
#   SORS_NIGHTLY_KEEP_LOGS  how many logs to keep (default 30)
#   SORS_NIGHTLY_TIMEOUT    limit for one run, as for timeout(1) (default 20h)
#   MLFLOW_TRACKING_URI     an MLflow server (infra/mlflow/serve.sh); default: SQLite in the results folder
set -uo pipefail  # no -e: the exit code of the nightly is captured, not fatal

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SORS_HOME=${SORS_HOME:-$(cd "$here/../.." && pwd)}
if [ -z "${SORS_BIN:-}" ]; then
    if [ -x "$SORS_HOME/.venv/bin/sors" ]; then SORS_BIN="$SORS_HOME/.venv/bin/sors"; else SORS_BIN=sors; fi
fi
RESULTS=${SORS_RESULTS_DIR:-$SORS_HOME/results}
STATE=${SORS_NIGHTLY_STATE:-$RESULTS/nightly}
LOCK=${SORS_NIGHTLY_LOCK:-$STATE/nightly.lock}
LOG_DIR=${SORS_NIGHTLY_LOG_DIR:-$STATE/logs}
KEEP=${SORS_NIGHTLY_KEEP_LOGS:-30}
LIMIT=${SORS_NIGHTLY_TIMEOUT:-20h}

die() { echo "sors-nightly: $*" >&2; exit 2; }
command -v flock >/dev/null || die "flock(1) not found (package util-linux)"
[[ $KEEP =~ ^[1-9][0-9]*$ ]] || die "SORS_NIGHTLY_KEEP_LOGS=$KEEP is not a positive integer"
mkdir -p "$STATE" "$LOG_DIR" "$(dirname "$LOCK")" || die "cannot create $STATE or $LOG_DIR"

# Open without truncating (>>): a refused second start must not wipe the holder's pid.
exec 9>>"$LOCK" || die "cannot open lock file $LOCK"
if ! flock -n 9; then
    die "another nightly holds $LOCK (pid $(head -c 32 "$LOCK" 2>/dev/null | tr -dc 0-9)); not starting"
fi
echo "$$" > "$LOCK"

stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="$LOG_DIR/nightly-$stamp-$$.log"  # names sort by start time
if [ "$#" -eq 0 ]; then
    set -- --config "$SORS_HOME/infra/nightly/fashion-mnist.yaml"
fi

{
    echo "# sors nightly started $(date -u +%FT%TZ) on $(hostname) pid $$"
    echo "# $SORS_BIN nightly --results-dir $RESULTS $*"
} >>"$log"
cd "$SORS_HOME" || die "cannot cd to $SORS_HOME"
# 9>&- : the nightly (and the Ray daemons it may leave behind) must not inherit the lock descriptor,
# or the lock would outlive this script.
timeout --kill-after=5m "$LIMIT" "$SORS_BIN" nightly --results-dir "$RESULTS" "$@" >>"$log" 2>&1 9>&-
rc=$?
case $rc in
    0|1|2) ;;
    124|137) echo "# ran past the limit of $LIMIT" >>"$log"; rc=2 ;;
    *) echo "# unexpected exit code $rc (counted as 2: could not run)" >>"$log"; rc=2 ;;
esac
echo "# sors nightly finished $(date -u +%FT%TZ) with exit code $rc" >>"$log"
echo "$rc" > "$STATE/last-exit-code"
ln -sfn "$(basename "$log")" "$LOG_DIR/latest.log"

# Rotation: gzip every finished log but the newest, then keep only the newest $KEEP.
find "$LOG_DIR" -maxdepth 1 -name 'nightly-*.log' ! -name "$(basename "$log")" -exec gzip -qf {} \;
find "$LOG_DIR" -maxdepth 1 \( -name 'nightly-*.log' -o -name 'nightly-*.log.gz' \) -printf '%f\n' | sort -r \
    | tail -n +"$((KEEP + 1))" | while read -r old; do rm -f -- "$LOG_DIR/$old"; done

if [ "$rc" -ne 0 ]; then
    verdict=$([ "$rc" -eq 1 ] && echo "robustness regression" || echo "could not run")
    echo "sors-nightly: exit $rc ($verdict); log $log" >&2
fi
exit "$rc"
