#!/usr/bin/env bash
# Upscale every image of a folder and summarize the JSON lines cadyq writes.
#
#   examples/batch.sh IN_DIR OUT_DIR [extra cadyq upscale options...]
#
# Re-running resumes (--skip-existing). Exit status is cadyq's: 0 all good, 1 some inputs
# failed (listed on stderr), 2 usage error, 130 interrupted.
set -uo pipefail
in_dir=${1:?usage: batch.sh IN_DIR OUT_DIR [options]}
out_dir=${2:?usage: batch.sh IN_DIR OUT_DIR [options]}
shift 2
mkdir -p "$out_dir"
log="$out_dir/cadyq.jsonl"
cadyq upscale "$in_dir" "$out_dir" --recursive --skip-existing --json "$log" "$@"
status=$?
python3 - "$log" <<'PY'
import json, sys
from pathlib import Path
p = Path(sys.argv[1])
rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
if not rows:
    print("no images upscaled"); sys.exit(0)
hist = {"4": 0, "6": 0, "8": 0}
for r in rows:
    for k in hist:
        hist[k] += r["bits_histogram"][k]
n = sum(hist.values()) or 1
ops, fp = sum(r["bitops_g"] for r in rows), sum(r["bitops_fp32_g"] for r in rows)
print(f"{len(rows)} images, mean FAB {sum(r['fab'] for r in rows) / len(rows):.2f}, "
      f"bits 4/6/8: {100*hist['4']/n:.0f}% / {100*hist['6']/n:.0f}% / {100*hist['8']/n:.0f}%, "
      f"BitOPs {ops:.0f} G = {100*ops/max(fp,1e-9):.1f}% of FP32, {sum(r['seconds'] for r in rows):.1f} s")
PY
exit $status
