#!/usr/bin/env bash
# Probe: on this CPU, does the study gain from JOBS=2 (two pretrainings at once, one thread each) over JOBS=1 (one
# pretraining with every thread)? For each network, the demo's baseline pretraining (the command run_all.sh runs,
# from DRY_RUN, without the kNN monitor) for STEPS steps: once alone with all cores, then two at once (seeds 0 and 1)
# with the cores divided. Prints a markdown table of images/s (summary.json: steady state, start-up excluded) and
# wall seconds. Needs the project's .venv (bash run_all.sh tests makes it). docs/performance.md quotes it.
#
#   bash tools/probe_jobs.sh                          # resnet18 and mobilenetv3_small, 120 steps (about 5 min)
#   ARCHS="efficientnet_b0" STEPS=60 bash tools/probe_jobs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHS=(${ARCHS:-resnet18 mobilenetv3_small})
STEPS=${STEPS:-120}
NPROC=$(nproc)
HALF=$((NPROC / 2 > 1 ? NPROC / 2 : 1))  # each of two jobs' threads, as study.py divides them
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rate() { python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["images_per_s"]))' "$1/summary.json"; }
# the demo's pretraining command for ARCH, as run_all.sh would run it, with its --seed, --out and --resume taken off
command_for() {
  local all; all=$(DRY_RUN=1 ARCHS=$1 JOBS=1 bash run_all.sh demo)  # whole, then one line: no early-closed pipe
  grep -m1 ' pretrain.py ' <<< "$all" | sed 's/ --seed .*//'
}
# failed LOG...: a pretraining failed; its output is about to go with $tmp, so show its end, and stop
failed() { echo "probe_jobs.sh: a pretraining failed; the end of its output:" >&2; tail -n 15 "$@" >&2; exit 1; }
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $NPROC cores; $STEPS steps of the demo's baseline pretraining"
echo
echo "| network | JOBS=1: img/s ($NPROC threads) | wall s | JOBS=2: img/s, sum of two ($HALF thread(s) each) |" \
     "wall s | JOBS=2 / JOBS=1 |"
echo "|---|---|---|---|---|---|"
for arch in "${ARCHS[@]}"; do
  cmd=$(command_for "$arch")
  start=$SECONDS
  OMP_NUM_THREADS=$NPROC eval "$cmd --seed 0 --knn-every 0 --max-steps $STEPS --out $tmp/one_$arch" \
    > "$tmp/one.log" 2>&1 || failed "$tmp/one.log"
  one_wall=$((SECONDS - start)); one=$(rate "$tmp/one_$arch")
  start=$SECONDS
  pids=()
  for seed in 0 1; do
    OMP_NUM_THREADS=$HALF eval "$cmd --seed $seed --knn-every 0 --max-steps $STEPS --out $tmp/two_${arch}_$seed" \
      > "$tmp/two_$seed.log" 2>&1 &
    pids+=($!)
  done
  for seed in 0 1; do wait "${pids[seed]}" || failed "$tmp/two_$seed.log"; done
  two_wall=$((SECONDS - start)); a=$(rate "$tmp/two_${arch}_0"); b=$(rate "$tmp/two_${arch}_1")
  python3 -c "import sys; arch, one, ow, a, b, tw = sys.argv[1:]; one, a, b = int(one), int(a), int(b)
print(f'| {arch} | {one} | {ow} | {a + b} ({a} + {b}) | {tw} |',
      f'{(a + b) / one:.2f}x, wall {2 * int(ow) / int(tw):.2f}x |')" \
    "$arch" "$one" "$one_wall" "$a" "$b" "$two_wall"
done
