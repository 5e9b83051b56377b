#!/usr/bin/env bash
# HERE, after a `device` run: put the run folders and weights/ back, and turn the returned parts into
# runs/RUN/last.pt (+ log.jsonl). FILES_AT: the folder the tool's reply names.
#   runs/device_collect.sh RUN FILES_AT       (env: ASIDE=/work/aside)
set -euo pipefail
shopt -s nullglob
RUN=$1; F=$2; A=${ASIDE:-/work/aside}
for r in "$A"/runs/*/; do [ -e "runs/$(basename "$r")" ] || mv "$r" runs/; done
[ -e weights ] || mv "$A/weights" weights
mkdir -p "runs/$RUN"
parts=("$F/$RUN.part-"*)
[ ${#parts[@]} -gt 0 ] || { echo "no $RUN.part-* under $F" >&2; exit 1; }
cat "${parts[@]}" > "runs/$RUN/last.pt.tmp"
mv "runs/$RUN/last.pt.tmp" "runs/$RUN/last.pt"
cp "$F/$RUN.log.jsonl" "runs/$RUN/log.jsonl"
${PYTHON:-.venv/bin/python} -c "import sys, torch; s = torch.load(sys.argv[1], map_location='cpu', weights_only=True); print('step', s['step'])" "runs/$RUN/last.pt"
