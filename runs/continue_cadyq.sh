#!/usr/bin/env bash
# Continue a finished cadyq run in a new folder with a stronger bit loss (the change is logged in
# the new run's log.jsonl as "config_change" and lands in the manifest's stage record).
#   runs/continue_cadyq.sh SCALE FROM_RUN NEW_RUN MINUTES [THREADS]
# env: BIT_WEIGHT (default 0.5), STEPS (schedule length, default 400; longer re-warms the cosine), VAL_EVERY (default 60), KEEP_VAL=1 to keep step<N>.pt at every
# validation (pick one with python -m cadyq_cli.train.select), STOP_AT (a step), EVAL=1 to
# evaluate (paper tiling) and export afterwards.
set -euo pipefail
S=$1; FROM=$2; NEW=$3; MIN=$4; T=${5:-0}
D=${DATA_ROOT:-../shared/data/train}
[ -e "$NEW/last.pt" ] || { mkdir -p "$NEW"; cp "$FROM/last.pt" "$FROM/log.jsonl" "$NEW/"; }
cadyq train cadyq --data $D/T91 --data $D/BSD200 --data $D/BSDS500test --run $NEW --scale $S --batch 8 --steps ${STEPS:-400} \
    --lr 5e-5 --bit-weight ${BIT_WEIGHT:-0.5} --bit-ramp 30 --selector-lr 5e-3 --minutes $MIN --val-every ${VAL_EVERY:-60} --threads $T \
    $([ "${KEEP_VAL:-0}" = 1 ] && echo --keep-val) ${STOP_AT:+--stop-at $STOP_AT}
if [ "${EVAL:-0}" = 1 ]; then runs/eval_export.sh $S $NEW $T; fi
