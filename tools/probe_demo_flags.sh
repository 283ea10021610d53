#!/usr/bin/env bash
# The demo's training-health probes (docs/training-health.md): one pretraining per row, the demo's flags with the
# row's changes, each with the kNN monitor before training and after every third epoch. Logs, summaries and commands
# go to results/probes/demo_flags/<row>/, checkpoints to runs/probes/. About an hour on 2 cores; rows already done
# are skipped.
#
#   bash tools/probe_demo_flags.sh            then: python3 tools/probe_demo_flags.py (the tables)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEMO=(--data fashionmnist --subset 20000 --epochs 6 --batch-size 128 --moco-k 1024 --moco-m 0.99 --aug small
      --aug-backend batched --channels-last --wd 5e-4 --knn-every 3 --knn-subset 5000 --log-every 52)
BASE=(--moco-t 0.2 --mlp-hidden 0)                                                   # the MoCo-v2 baseline
SMALL=(--moco-t 0.1 --mlp-hidden 2048 --warmup-epochs 1 --smooth 0.1 --smooth-k 10 --smooth-schedule warmup)
row() {  # row NAME FLAGS...
  local name=$1; shift
  local res=results/probes/demo_flags/$name run=runs/probes/$name
  grep -qs '"complete": true' "$res/summary.json" && return
  mkdir -p "$res"
  echo "$PY pretrain.py ${*} --out $run --resume" > "$res/command.txt"
  "$PY" pretrain.py "$@" --out "$run" --resume | tee "$res/output.log"
  cp "$run/log.jsonl" "$run/summary.json" "$res/"
}
# mobilenetv3_small, baseline: the learning rate and the BN groups
row old_demo --arch mobilenetv3_small "${DEMO[@]}" "${BASE[@]}" --head-bn --lr 0.12 --bn-splits 8
row lr_scaled_groups_of_16 --arch mobilenetv3_small "${DEMO[@]}" "${BASE[@]}" --head-bn --lr 0.03 --bn-splits 8
row no_head_bn --arch mobilenetv3_small "${DEMO[@]}" "${BASE[@]}" --lr 0.03 --bn-splits 2
row momentum_0.9 --arch mobilenetv3_small "${DEMO[@]}" "${BASE[@]}" --head-bn --lr 0.03 --bn-splits 2 --moco-m 0.9
row momentum_0.9_small_recipe --arch mobilenetv3_small "${DEMO[@]}" "${SMALL[@]}" --head-bn --lr 0.03 --bn-splits 2 \
  --moco-m 0.9
row momentum_0.9_large --arch mobilenetv3_large "${DEMO[@]}" "${BASE[@]}" --head-bn --lr 0.03 --bn-splits 2 --moco-m 0.9
# mobilenetv3_large: what a longer budget, larger images and the symmetric loss give
row large_32px --arch mobilenetv3_large "${DEMO[@]}" "${BASE[@]}" --head-bn --lr 0.03 --bn-splits 2 --img-size 32
row large_12_epochs --arch mobilenetv3_large "${DEMO[@]}" "${BASE[@]}" --head-bn --lr 0.03 --bn-splits 2 --epochs 12
row large_12_epochs_32px --arch mobilenetv3_large "${DEMO[@]}" "${BASE[@]}" --head-bn --lr 0.03 --bn-splits 2 \
  --epochs 12 --img-size 32
row large_small_recipe_symmetric --arch mobilenetv3_large "${DEMO[@]}" "${SMALL[@]}" --head-bn --lr 0.03 \
  --bn-splits 2 --symmetric
