#!/usr/bin/env bash
# ON THE ACCELERATOR MACHINE (the `device` tool's `run`): train the fp stage on CUDA from the
# training images carried in .dev/data, then send back the checkpoint (split into 15 MiB parts:
# the tool returns files of at most 16 MiB) and the log. Prepare and collect here with
# runs/device_prep.sh and runs/device_collect.sh.
#   runs/device_fp.sh RUN SCALE STEPS MINUTES [BATCH]     e.g. runs/device_fp.sh edsr_x4_fp_gpu 4 300000 8
# env DEVICE=cpu BF16=off OUT=/tmp/x: a dry run here. The machine has torch, typer, rich, opencv, safetensors, pillow and numpy: no install needed.
set -uo pipefail
RUN=$1; S=$2; STEPS=$3; MIN=$4; BATCH=${5:-16}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=.dev/data
mkdir -p .dev/runs
if [ ! -f .dev/runs/$RUN/last.pt ] && [ -f .dev/$RUN.part-aa ]; then  # resume what device_prep.sh carried
    mkdir -p .dev/runs/$RUN && cat .dev/$RUN.part-* > .dev/runs/$RUN/last.pt && cp .dev/$RUN.log.jsonl .dev/runs/$RUN/log.jsonl
fi
# timeout sends SIGTERM, which cadyq train turns into a clean stop and save, so the checkpoint
# still comes back when MINUTES (plus loading and the final validation) runs long: keep LIMIT
# (seconds, default 540) under the run call's timeout_s.
timeout -k 30 ${LIMIT:-540} python3 -m cadyq_cli train fp --data $D/T91 --data $D/BSD200 --data $D/BSDS500test --run .dev/runs/$RUN \
    --scale $S --steps $STEPS --batch $BATCH --minutes $MIN --val-every 1000 --device ${DEVICE:-cuda} --bf16 ${BF16:-on} 2>&1 | tee $OUT/train.log
rc=${PIPESTATUS[0]}
split -b 15M .dev/runs/$RUN/last.pt $OUT/$RUN.part- && cp .dev/runs/$RUN/log.jsonl $OUT/$RUN.log.jsonl || rc=1
exit $rc
