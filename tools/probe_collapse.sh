#!/usr/bin/env bash
# Probe: where pretrain.py's collapse warning draws its lines (pretrain.COLLAPSED_SPREAD, LOSS_AT_UNIFORM). Three runs:
# - the demo's mobilenetv3_small baseline (run_all.sh's command, seed 0) for its first epoch (156 steps), logged every
#   13 steps: a healthy run through its early dip, which must not warn;
# - the run a user reported as finishing "done" at chance: 45 steps, the MoCo-v2 defaults otherwise (key momentum
#   0.999), logged at the end only;
# - a learning rate 400 times too high on 64 synthetic images (tests/test_pretrain.py's collapse test).
# For each: every logged interval's loss below ln(K+1) and spread (emb_std x sqrt(128): about 1 when 128-d queries
# spread evenly, 0 collapsed), and the warning if one came. results/probes/probe_collapse.md holds its output.
#
#   bash tools/probe_collapse.sh            # about 5 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed() { echo "probe_collapse.sh: a run failed; the end of its output:" >&2; tail -n 15 "$1" >&2; exit 1; }
all=$(DRY_RUN=1 ARCHS=mobilenetv3_small JOBS=1 CUDA_VISIBLE_DEVICES= bash run_all.sh demo)
demo=$(grep ' pretrain.py ' <<< "$all" | grep -m1 "_baseline_s0 " | sed 's/ --seed .*//')
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(date -u '+%Y-%m-%d %H:%M UTC'), commit" \
     "$(git rev-parse --short HEAD)"
eval "$demo --seed 0 --knn-every 0 --log-every 13 --max-steps 156 --out $tmp/demo" > "$tmp/demo.log" 2>&1 \
  || failed "$tmp/demo.log"
"$PY" pretrain.py --arch mobilenetv3_small --data fashionmnist --subset 20000 --epochs 1 --max-steps 45 \
  --batch-size 128 --moco-k 1024 --bn-splits 2 --head-bn --out "$tmp/short" > "$tmp/short.log" 2>&1 \
  || failed "$tmp/short.log"
"$PY" pretrain.py --arch mobilenetv3_small --data synthetic --subset 64 --img-size 32 --batch-size 16 --moco-k 32 \
  --moco-m 0.9 --moco-t 0.1 --lr 20 --wd 0 --epochs 5 --max-steps 12 --workers 0 --channels-last --log-every 2 \
  --out "$tmp/lr20" > "$tmp/lr20.log" 2>&1 || failed "$tmp/lr20.log"
"$PY" - "$tmp" <<'PYTHON'
import json, math, sys
tmp = sys.argv[1]
runs = {"demo": "the demo's mobilenetv3_small baseline, epoch 1", "short": "45 steps, key momentum 0.999",
        "lr20": "lr 20 on 64 synthetic images"}
print("\n| run | K | steps logged: ln(K+1) - loss / spread (emb_std x sqrt(128)) | warning |\n|---|---|---|---|")
for name, title in runs.items():
    log = [json.loads(line) for line in open(f"{tmp}/{name}/log.jsonl")]
    k = json.load(open(f"{tmp}/{name}/summary.json"))["args"]["moco_k"]
    cells = ", ".join(f"{r['step']}: {math.log(k + 1) - r['loss']:.2f} / {r['emb_std'] * math.sqrt(128):.2f}"
                      for r in log if "loss" in r)
    warning = next((line.strip() for line in open(f"{tmp}/{name}.log") if line.startswith("warning: the run")), "none")
    print(f"| {title} | {k} | {cells} | {warning.split('. Its features')[0]} |")
PYTHON
