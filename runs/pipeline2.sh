#!/usr/bin/env bash
# The second-generation recipe (fourth session, AVX-512 BF16 CPU): every scale starts from the longer
# x4 fp run (runs/edsr_x4_fp2), then pams and cadyq keeping a checkpoint per validation; the step to
# ship is picked on validation by the rule in runs/PICK_RULES.md, then evaluated and exported:
#   runs/pipeline2.sh SCALE FP_STEPS FP_MIN BIT_WEIGHT [THREADS]
#   python -m cadyq_cli.train.select runs/edsr_xS_cadyq2 --max-gap G --into runs/edsr_xS_cadyq2_sN
#   FP_RUNS="runs/edsr_x4_fp runs/edsr_x4_fp2 runs/edsr_xS_fp2" PAMS_RUN=runs/edsr_xS_pams2 \
#       runs/eval_export.sh S runs/edsr_xS_cadyq2_sN
# (x4 itself: FP_STEPS 0, its fp2 being cadyq train fp --run runs/edsr_x4_fp2 --init runs/edsr_x4_fp/last.pt
# --steps 1500.) Resumable: rerun to continue a stage.
set -euo pipefail
S=$1; FP_STEPS=$2; FP_MIN=$3; BW=$4; T=${5:-0}
D=${DATA_ROOT:-../shared/data/train}
DATA="--data $D/T91 --data $D/BSD200 --data $D/BSDS500test"
R=runs/edsr_x${S}
FP=${R}_fp2
# a stage that ran out of --minutes exits 0: go on only when it reached its step target
reached() { python -c "import sys; from cadyq_cli.train.select import read_log
r=[x for x in read_log('$1') if x.get('final')]; sys.exit(0 if r and r[-1]['step'] >= $2 else 1)" \
  || { echo "$1: stopped before step $2; rerun to continue" >&2; exit 1; }; }
if [ "$FP_STEPS" != 0 ]; then
  cadyq train fp $DATA --run $FP --scale $S --init runs/edsr_x4_fp2/last.pt --steps $FP_STEPS \
    --batch 16 --minutes $FP_MIN --threads $T
  reached $FP $FP_STEPS
fi
cadyq train pams $DATA --run ${R}_pams2 --scale $S --init $FP/last.pt --steps 300 --lr 1e-4 --stop-at 100 --minutes 15 \
    --val-every 100 --threads $T
reached ${R}_pams2 100
cadyq train cadyq $DATA --run ${R}_cadyq2 --scale $S --init ${R}_pams2/last.pt --batch 8 --steps 400 --lr 5e-5 \
    --bit-weight $BW --bit-ramp 30 --selector-lr 5e-3 --minutes 60 --val-every 40 --keep-val --threads $T
reached ${R}_cadyq2 400
