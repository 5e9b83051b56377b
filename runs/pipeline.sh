#!/usr/bin/env bash
# The recipe behind the shipped EDSR-baseline models, one scale at a time (resumable: rerun to continue).
#   runs/pipeline.sh SCALE FP_MIN PAMS_MIN CADYQ_MIN [THREADS]
# fp is warm-started from runs/edsr_x4_fp (head and body are scale-independent) unless SCALE is 4.
# Then: eval on the benchmarks (paper tiling) and export to weights/ with a manifest entry.
set -euo pipefail
S=$1; FP_MIN=$2; PAMS_MIN=$3; CADYQ_MIN=$4; T=${5:-0}
D=${DATA_ROOT:-../shared/data/train}
DATA="--data $D/T91 --data $D/BSD200 --data $D/BSDS500test"
R=runs/edsr_x${S}
C=${CADYQ_RUN:-${R}_cadyq}   # cadyq run folder (a new one to redo the stage)
WARM=""; [ "$S" != 4 ] && WARM="--init runs/edsr_x4_fp/last.pt"
[ "$FP_MIN" != 0 ] && cadyq train fp $DATA --run ${R}_fp --scale $S $WARM --steps 1500 --minutes $FP_MIN --threads $T
[ "$PAMS_MIN" != 0 ] && cadyq train pams $DATA --run ${R}_pams --scale $S --init ${R}_fp/last.pt --steps 300 --lr 1e-4 \
    --minutes $PAMS_MIN --val-every 100 --threads $T
[ "$CADYQ_MIN" != 0 ] && cadyq train cadyq $DATA --run $C --scale $S --init ${R}_pams/last.pt --batch 8 --steps 400 \
    --lr 5e-5 --bit-weight ${BIT_WEIGHT:-0.3} --bit-ramp 30 --selector-lr ${SEL_LR:-5e-3} --minutes $CADYQ_MIN --val-every 60 --threads $T
if [ "${EVAL:-1}" = 1 ]; then runs/eval_export.sh $S $C $T; fi
