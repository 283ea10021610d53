#!/usr/bin/env bash
# Probe: does precise BN (knn_eval.py --precise-bn: the BN running statistics re-estimated on the training images
# under the evaluation transform) change what the demo's evaluations measure? For each network, the demo's
# pretraining command (from run_all.sh's DRY_RUN, seed 0, kNN monitor off) is stopped after epoch 3 (468 steps, where
# the kNN monitor looks mid-run) and run on to epoch 6 (936, the end); at both, the demo's kNN evaluation (10k bank,
# 10k test, k 200) runs with the checkpoint's own statistics and with precise BN. Then the run that showed the
# problem: a 15-step mobilenetv3_small run (BN momentum 0.01), evaluated both ways as its report did. Prints a
# markdown table; results/probes/precise_bn.md holds its output. Needs the project's .venv.
#
#   bash tools/probe_precise_bn.sh                # four networks, both recipes of mobilenetv3_small (~40 min, 2 cores)
#   NETS="mobilenetv3_small:baseline" bash tools/probe_precise_bn.sh
#   NETS= bash tools/probe_precise_bn.sh          # the 15-step run alone (about 3 min)
set -euo pipefail
cd "$(dirname "$0")/.."
NETS=(${NETS-mobilenetv3_small:baseline mobilenetv3_small:small efficientnet_b0:baseline resnet18:baseline})
PY=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the demo's pretraining command for ARCH and RECIPE, without its --seed, --out and --resume
command_for() {
  local all; all=$(DRY_RUN=1 ARCHS=$1 JOBS=1 CUDA_VISIBLE_DEVICES= bash run_all.sh demo)
  grep ' pretrain.py ' <<< "$all" | grep -m1 "_$2_s0 " | sed 's/ --seed .*//'
}
failed() { echo "probe_precise_bn.sh: a stage failed; the end of its output:" >&2; tail -n 15 "$1" >&2; exit 1; }
knn() {  # CKPT NAME EXTRA...: the kNN evaluation's top-1 at k 200 into $tmp/NAME.json
  local ckpt=$1 name=$2; shift 2
  OMP_NUM_THREADS=1 "$PY" knn_eval.py --ckpt "$ckpt" --channels-last --k 200 "$@" --json "$tmp/$name.json" \
    > "$tmp/$name.log" 2>&1 || failed "$tmp/$name.log"
}
probe() {  # ARCH:RECIPE: pretrain to epoch 3, evaluate, on to epoch 6, evaluate
  local arch=${1%:*} recipe=${1#*:} cmd run
  cmd=$(command_for "$arch" "$recipe"); run=$tmp/${arch}_$recipe
  for steps in 468 936; do
    OMP_NUM_THREADS=1 eval "$cmd --seed 0 --knn-every 0 --max-steps $steps --out $run --resume" \
      > "$run.$steps.log" 2>&1 || failed "$run.$steps.log"
    knn "$run/checkpoint.pt" "${arch}_${recipe}_${steps}_own" --subset 10000
    knn "$run/checkpoint.pt" "${arch}_${recipe}_${steps}_precise" --subset 10000 --precise-bn
  done
}
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(date -u '+%Y-%m-%d %H:%M UTC'), commit" \
     "$(git rev-parse --short HEAD)"
# two networks at a time, one thread each, as the study runs them
for ((i = 0; i < ${#NETS[@]}; i += 2)); do
  probe "${NETS[i]}" & first=$!
  if (( i + 1 < ${#NETS[@]} )); then probe "${NETS[i + 1]}" & second=$!; wait "$second"; fi
  wait "$first"
done
# the run that evaluated near chance: 15 steps, the default (MoCo-v2) recipe otherwise; evaluated as reported
OMP_NUM_THREADS=2 "$PY" pretrain.py --arch mobilenetv3_small --data fashionmnist --subset 20000 --epochs 1 \
  --max-steps 15 --batch-size 128 --moco-k 1024 --bn-splits 2 --head-bn --out "$tmp/short" > "$tmp/short.log" 2>&1 \
  || failed "$tmp/short.log"
knn "$tmp/short/checkpoint.pt" short_own --subset 2000 --test-subset 1000
knn "$tmp/short/checkpoint.pt" short_precise --subset 2000 --test-subset 1000 --precise-bn
"$PY" - "$tmp" "${NETS[@]}" <<'PYTHON'
import json, sys
tmp, nets = sys.argv[1], sys.argv[2:]
def top1(name):
    r = json.load(open(f"{tmp}/{name}.json"))
    return r["knn"][0]["top1"], r["bn_initial_fraction"]
print("\n| run | step | kNN k 200, own BN statistics | kNN, precise BN | precise - own | initial values left in the "
      "statistics |\n|---|---|---|---|---|---|")
for net in nets:
    arch, recipe = net.split(":")
    for steps in (468, 936):
        (own, left), (precise, _) = top1(f"{arch}_{recipe}_{steps}_own"), top1(f"{arch}_{recipe}_{steps}_precise")
        print(f"| {arch} {recipe} (demo) | {steps} | {own:.2f} | {precise:.2f} | {precise - own:+.2f} | {left:.1e} |")
(own, left), (precise, _) = top1("short_own"), top1("short_precise")
print(f"| mobilenetv3_small, 15 steps (2k bank, 1k test) | 15 | {own:.2f} | {precise:.2f} | {precise - own:+.2f} | "
      f"{left:.2f} |")
PYTHON
