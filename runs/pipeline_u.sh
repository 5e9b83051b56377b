#!/usr/bin/env bash
# The sixth-session recipe: pams and cadyq on the relu-unsigned activation grid (ReLU inputs on the
# unsigned grid), with the two-phase bit-weight schedule that made the third-generation x4:
#   runs/pipeline_u.sh SCALE FP_RUN BW1 STOP1 BW2 STOP2 [THREADS]
# pams: 100 steps of a 300-step schedule from FP_RUN/last.pt -> runs/edsr_xS_pams_u;
# cadyq: bit weight BW1 on a 400-step schedule to STOP1 (a checkpoint every 40) -> runs/edsr_xS_cadyq_u;
# then BW2 on a 600-step schedule from STOP1 to STOP2 (a checkpoint every 20) -> runs/edsr_xS_cadyq_u_v2.
# Pick on validation with the rule in runs/PICK_RULES.md (python -m cadyq_cli.train.select runs/edsr_xS_cadyq_u
# runs/edsr_xS_cadyq_u_v2 --max-gap G [--max-fab F] --into runs/edsr_xS_cadyq_u_sN), then
# runs/eval_export.sh. Resumable: rerun to continue a stage (a finished pams stage is not rerun).
# env: SKIP=fp trains the cadyq runs with EDSR's fp block skip (--skip fp), CADYQ=RUN names them
# (default runs/edsr_xS_cadyq_u; the continuation is RUN_v2).
set -euo pipefail
S=$1; FP=$2; BW1=$3; STOP1=$4; BW2=$5; STOP2=$6; T=${7:-0}
D=${DATA_ROOT:-../shared/data/train}
DATA="--data $D/T91 --data $D/BSD200 --data $D/BSDS500test"
R=runs/edsr_x${S}
# a stage that ran out of --minutes exits 0: go on only when it reached its step target
at() { [ -f "$1/log.jsonl" ] && python -c "import sys; from cadyq_cli.train.select import read_log
r=[x for x in read_log('$1') if x.get('final')]; sys.exit(0 if r and r[-1]['step'] >= $2 else 1)"; }
reached() { at "$1" "$2" || { echo "$1: stopped before step $2; rerun to continue" >&2; exit 1; }; }
C=${CADYQ:-${R}_cadyq_u}
at ${R}_pams_u 100 || cadyq train pams $DATA --run ${R}_pams_u --scale $S --init $FP/last.pt --steps 300 --lr 1e-4 --stop-at 100 --minutes 15 \
    --val-every 100 --threads $T --act-grid relu-unsigned
reached ${R}_pams_u 100
cadyq train cadyq $DATA --run $C --scale $S --init ${R}_pams_u/last.pt --batch 8 --steps 400 --lr 5e-5 \
    --bit-weight $BW1 --bit-ramp 30 --selector-lr 5e-3 --minutes 60 --val-every 40 --keep-val --stop-at $STOP1 --threads $T \
    ${SKIP:+--skip $SKIP}
reached $C $STOP1
STEPS=600 BIT_WEIGHT=$BW2 VAL_EVERY=20 KEEP_VAL=1 STOP_AT=$STOP2 runs/continue_cadyq.sh $S $C ${C}_v2 60 $T
reached ${C}_v2 $STOP2
