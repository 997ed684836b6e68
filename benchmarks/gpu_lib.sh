# Shared by the GPU scripts (benchmarks/gpu_check.sh, benchmarks/gpu_owed.sh); sourced, not run.
# Before sourcing set: FINAL (where results go: the device tool's $OUT), NAME (the archive's name), SECTIONS (the
# section numbers to run), BUDGET_S (the seconds this call may take in all). Each section's log and results are
# packed into $FINAL/$NAME.tgz and $FINAL/log.txt after it ends, so that what finished comes back even when the
# call is stopped at its limit.
mkdir -p "$FINAL"
WORK=$(mktemp -d)
START=$(date +%s)
export PYTHONPATH=$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
elapsed() { echo $(( $(date +%s) - START )); }
stamp() { echo "[$NAME] $(elapsed) s: $*" | tee -a "$WORK/log.txt"; }
pack() {
    tar czf "$FINAL/$NAME.tgz.part" -C "$WORK" --exclude=./runs . && mv "$FINAL/$NAME.tgz.part" "$FINAL/$NAME.tgz"
    cp "$WORK/log.txt" "$FINAL/log.txt"
}
section() {  # section TITLE FUNCTION: run it (if its number is in SECTIONS), log its output and outcome, pack
    case " $SECTIONS " in *" ${1%%[a-z.]*} "*) ;; *) return 0 ;; esac
    stamp "$1"
    if "$2" 2>&1 | tee -a "$WORK/log.txt"; then stamp "ok: $1"; pack; else stamp "FAILED: $1"; pack; return 1; fi
}
capped() {  # capped SECONDS COMMAND…: the command, interrupted (SIGINT, then SIGKILL 20 s later) at SECONDS or when
            # BUDGET_S would be overrun (less 30 s for packing); skipped when under 30 s would be left
    local cap=$1 left=$(( BUDGET_S - $(elapsed) - 30 ))
    shift
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 30 ]; then echo "skipped: $cap s left of BUDGET_S=$BUDGET_S for: $*"; return 0; fi
    echo "(at most $cap s) $*"
    timeout -k 20 -s INT "$cap" "$@"
}
