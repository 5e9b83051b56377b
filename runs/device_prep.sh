#!/usr/bin/env bash
# HERE, before a `device` run: the device copies the whole working tree, at most 64 MiB, and
# runs/ + weights/ alone are ~290 MB. This copies the training images (~39 MB) and, to resume,
# a run's checkpoint (split) into .dev/ (ignored by git, carried with `carry: [".dev"]`), and
# moves the run folders (runs/*/, not the scripts) and weights/ out of the tree to $ASIDE until
# runs/device_collect.sh puts them back.
#   runs/device_prep.sh [RUN_TO_RESUME]       (env: DATA_ROOT, ASIDE=/work/aside)
set -euo pipefail
shopt -s nullglob
if pgrep -f "cadyq train" >/dev/null; then echo "a cadyq train job is running: its run folder cannot move; stop it first" >&2; exit 1; fi
D=${DATA_ROOT:-../shared/data/train}; A=${ASIDE:-/work/aside}
grep -qx '/.dev/' .git/info/exclude || echo '/.dev/' >> .git/info/exclude
mkdir -p .dev/data "$A"
for s in T91 BSD200 BSDS500test; do [ -d .dev/data/$s ] || cp -r "$D/$s" .dev/data/; done
if [ -n "${1:-}" ]; then rm -f ".dev/$1.part-"*; split -b 15M "runs/$1/last.pt" ".dev/$1.part-"; cp "runs/$1/log.jsonl" ".dev/$1.log.jsonl"; fi
mkdir -p "$A/runs"
for r in runs/*/; do mv "$r" "$A/runs/"; done
[ -e "$A/weights" ] || mv weights "$A/weights"
du -sh .dev; echo "carry .dev; afterwards: runs/device_collect.sh RUN FILES_AT" >&2
