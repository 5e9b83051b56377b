#!/usr/bin/env bash
# Evaluate a cadyq run on the benchmarks (paper tiling) and export it to weights/ with a manifest entry.
#   runs/eval_export.sh SCALE CADYQ_RUN [THREADS]      (env: BENCH_ROOT, NOTES (default: CADYQ_RUN/notes.txt), FP_RUNS, PAMS_RUN)
# FP_RUNS (space-separated, in order) / PAMS_RUN: the run folders of the earlier stages, for the
# manifest (default runs/edsr_xS_fp, runs/edsr_xS_pams).
set -euo pipefail
S=$1; C=$2; T=${3:-0}
B=${BENCH_ROOT:-../shared/data/benchmark}
R=runs/edsr_x${S}
cadyq eval $B/Set5 $B/Set14 $B/B100 --scale $S --weights $C/last.pt --modes fp32,w8a8,w8a4,dynamic \
    --bicubic --json eval_x${S}_main.json --threads $T -q
cadyq eval $B/Urban100 --limit 20 --scale $S --weights $C/last.pt --modes fp32,w8a8,w8a4,dynamic \
    --bicubic --json eval_x${S}_urban20.json --threads $T -q
python -m cadyq_cli.train.export $C/last.pt --name edsr-baseline-x${S} $(for r in ${FP_RUNS:-${R}_fp}; do echo --run $r; done) --run ${PAMS_RUN:-${R}_pams} \
    --run $C --eval eval_x${S}_main.json --eval eval_x${S}_urban20.json --notes "${NOTES:-$(cat $C/notes.txt 2>/dev/null || true)}"
