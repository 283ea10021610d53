#!/usr/bin/env bash
# The whole study: for each of the five networks, MoCo-v2 pretraining with the baseline recipe and with the
# small-model recipe (softened InfoNCE), then weighted kNN (with the random-init reference and the diagnostics) and
# linear evaluation; a results table at the end. It sets up what it needs first (see "set-up" below).
#
#   bash run_all.sh                           the demo on a CPU, the fmnist study where there is a GPU
#   bash run_all.sh [PRESET] [DATA_DIR]       PRESET: demo, fmnist, cifar10, imagenet, smoke
#   bash run_all.sh tests [PYTEST ARGS]       the test suite (after the same set-up); e.g. `tests -m slow`
#   PRESET=cifar10 DATA_DIR=~/data bash run_all.sh
#   ARCHS="resnet18 mobilenetv3_small" bash run_all.sh       a subset of the networks
#   STUDY_DIR=/scratch bash run_all.sh                        runs/ and results/ go there (default: here)
#   PYTHON=/path/to/python bash run_all.sh                    that interpreter and its packages (no .venv)
#
#   preset    data                             pretraining                         expected cost
#   demo      embedded Fashion-MNIST, 20k      28 px, ImageNet stem, 6 epochs      about 55 min on a 2-core CPU
#   fmnist    Fashion-MNIST, 60k               28 px, small stem, 200 epochs       hours on one GPU
#   cifar10   CIFAR-10 (DATA_DIR)              32 px, small stem, 200 epochs       hours on one GPU
#   imagenet  ImageFolder train/ val/ (DATA_DIR) 224 px, 200 epochs, 8 GPUs        days on 8 GPUs
#   smoke     synthetic images, 64             a few steps; checks the pipeline    about 1 min
#
# Every GPU present is used through torchrun; with none, one CPU process. Finished runs are skipped, interrupted
# ones resumed (pretrain.py --resume), so rerunning the command continues a killed study. Any failing stage stops
# the study (set -e). Results: results/<preset>/RESULTS.md and results.csv; runs (checkpoints, logs): runs/<preset>/.
set -euo pipefail
shopt -s extglob
cd "$(dirname "$0")"
DEMO_COST="about 55 min on a 2-core CPU"  # measured: see README, "The demo study"

# --- set-up: a python with the locked packages, and the embedded data set ------------------------------------
# A project-local .venv with requirements.lock (every package pinned exactly, the torch/torchvision pair included),
# rebuilt whenever the lock changes; PYTHON=/path/to/python uses that interpreter and its own packages instead.
works() { "$1" -c "import numpy, pytest, torch, torchvision" >/dev/null 2>&1; }
sha256() { python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }
if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
  works "$PY" || { echo "set-up: PYTHON=$PY cannot import numpy, pytest, torch and torchvision." >&2; exit 1; }
else
  LOCK_SHA=$(sha256 requirements.lock)
  if [[ $(cat .venv/lock.sha256 2>/dev/null) != "$LOCK_SHA" ]]; then
    if [[ -e .venv && ! -e .venv/made-by-run_all.sh ]]; then
      echo "set-up: ./.venv exists but run_all.sh did not make it: move it away, or use it as it is with" \
           "PYTHON=.venv/bin/python bash run_all.sh ..." >&2
      exit 1
    fi
    echo "set-up: installing requirements.lock into ./.venv$([[ -e .venv ]] && echo ', rebuilt: the lock changed' \
         'or the last build did not finish') (about 5.5 GB, a few minutes)"
    rm -rf .venv
    python3 -m venv .venv
    touch .venv/made-by-run_all.sh
    # --isolated: a local pip configuration (an index or wheel folder with another torch build) takes no part;
    # torchvision only loads against the torch build it was made for
    .venv/bin/python -m pip install --isolated --disable-pip-version-check -q -r requirements.lock
    if ! diff <(grep -v '^#' requirements.lock) <(.venv/bin/python -m pip freeze --isolated --all --exclude pip) \
         >/dev/null; then
      echo "set-up failed: .venv holds other packages than requirements.lock (pip freeze differs); see" \
           "README, Install." >&2
      exit 1
    fi
    works .venv/bin/python || { echo "set-up failed: .venv/bin/python cannot import torch and torchvision." >&2; exit 1; }
    echo "$LOCK_SHA" > .venv/lock.sha256
  fi
  PY=.venv/bin/python
fi
# Fashion-MNIST, the embedded data set: Debian's package where apt-get and root are there; otherwise the scripts
# try torchvision's download into ./data and, failing that, say in one sentence how to get the files.
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [[ ! -f $FMNIST && ! -d data/FashionMNIST/raw && -z ${DATA_DIR:-} && ${1:-} != @(cifar10|imagenet) ]] \
   && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "set-up: installing Debian's dataset-fashion-mnist (the embedded data set)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
    || echo "set-up: apt-get could not install dataset-fashion-mnist; the scripts will try torchvision's download"
fi
if [[ ${1:-} == tests ]]; then
  shift
  exec "$PY" -m pytest tests "$@"
fi

# --- the preset: given, or chosen by the hardware ------------------------------------------------------------
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
PRESET=${1:-${PRESET:-}}
if [[ -z $PRESET ]]; then
  if (( GPUS )); then
    PRESET=fmnist
    echo "run_all.sh: no preset given and $GPUS GPU(s) found, so the fmnist study: 5 networks x 2 recipes on the" \
         "60k Fashion-MNIST images, small stem, 200 epochs each, then kNN and linear evaluation. This project has" \
         "not measured it on a GPU yet: each run prints its ETA. Another preset: bash run_all.sh demo|cifar10|imagenet|smoke."
  else
    PRESET=demo
    echo "run_all.sh: no preset given and no GPU found, so the CPU demo: 5 networks x 2 recipes on 20k" \
         "Fashion-MNIST images at 28 px, then kNN and linear evaluation; $DEMO_COST (measured). Another preset:" \
         "bash run_all.sh fmnist|cifar10|imagenet|smoke (the first three are sized for GPUs)."
  fi
fi
DATA_DIR=${2:-${DATA_DIR:-}}
ARCHS=(${ARCHS:-resnet18 resnet34 mobilenetv3_large mobilenetv3_small efficientnet_b0})  # ARCHS="a b": a subset
STUDY_DIR=${STUDY_DIR:-.}  # where runs/ and results/ go
RUNS=$STUDY_DIR/runs/$PRESET
OUT=$STUDY_DIR/results/$PRESET

# --- presets: data, schedule, and the evaluation budget --------------------------------------------------------
case $PRESET in
  demo)  # CPU-sized: 28 px, ImageNet stem and channels_last (the small stem costs 8-20x on a CPU), a 20k subset.
    # At this budget (936 steps) a projection head without BN collapses (every query drifts to one direction and
    # kNN ends below random init), so both recipes get --head-bn here; see README, "Troubleshooting".
    DATA=(--data fashionmnist --subset 20000 ${DATA_DIR:+--data-dir "$DATA_DIR"})
    # BN groups of 64 images, as in MoCo's CIFAR demo: groups of 16 at 1x1 feature maps make a key depend so much
    # on its group that the positive loses even for identical views (README, "Training health").
    COMMON=(--epochs 6 --moco-k 1024 --moco-m 0.99 --head-bn --aug-backend batched --channels-last --knn-every 3
            --knn-subset 5000 --log-every 52)
    BATCH_BASE=128; BATCH_SMALL=128; BN_GROUP=64; WD=5e-4; WARMUP=1; AUG_BASE=small; AUG_SMALL=small
    EVAL=(--subset 10000 --channels-last)
    LINEAR=(--cached --epochs 30 --schedule 18 24) ;;
  fmnist|cifar10)  # the well-known MoCo setting on small data sets (MoCo's CIFAR-10 demo; README, Presets)
    [[ $PRESET == fmnist ]] && SET=fashionmnist || SET=cifar10
    DATA=(--data $SET --small-stem ${DATA_DIR:+--data-dir "$DATA_DIR"})
    COMMON=(--epochs 200 --moco-k 4096 --moco-m 0.99 --aug-backend batched --channels-last --knn-every 10)
    BATCH_BASE=512; BATCH_SMALL=512; BN_GROUP=64; WD=5e-4; WARMUP=5; AUG_BASE=small; AUG_SMALL=small
    EVAL=(--channels-last)
    LINEAR=() ;;
  imagenet)  # the papers' settings: 224 px, K 65536, m 0.999, blur; DATA_DIR holds train/ and val/
    [[ -n $DATA_DIR ]] || { echo "run_all.sh imagenet needs DATA_DIR (a folder with train/ and val/)." >&2; exit 2; }
    DATA=(--data imagefolder --data-dir "$DATA_DIR")
    COMMON=(--epochs 200 --moco-k 65536 --moco-m 0.999 --aug-backend torchvision --workers 10 --channels-last
            --knn-every 0)
    BATCH_BASE=256; BATCH_SMALL=512; BN_GROUP=64; WD=1e-4; WARMUP=5; AUG_BASE=mocov2; AUG_SMALL=strong
    EVAL=(--workers 10 --channels-last)
    LINEAR=(--workers 10) ;;
  smoke)  # the test suite's check of this script: synthetic images, a few steps, no claim about accuracy
    DATA=(--data synthetic --subset 64)
    COMMON=(--epochs 1 --moco-k 32 --moco-m 0.99 --aug-backend batched --knn-every 1)
    BATCH_BASE=16; BATCH_SMALL=16; BN_GROUP=8; WD=5e-4; WARMUP=0; AUG_BASE=small; AUG_SMALL=small
    EVAL=(--subset 64 --test-subset 32)
    LINEAR=(--cached --epochs 2 --schedule 1) ;;
  *) echo "unknown preset '$PRESET': choose demo, fmnist, cifar10, imagenet or smoke (or tests)." >&2; exit 2 ;;
esac

# --- the two recipes (README, "The two recipes"); every flag that differs is spelled out here -------------------
# --lr is per 256 images (pretrain.py scales it by the batch): MoCo-v2's 0.03 at 256 is the small recipe's 0.06 at 512.
# Split BN (shuffle BN on one process): BN_GROUP images per group on every process, whatever the number of
# processes; a process holding BN_GROUP images or fewer is one group, and its keys are shuffled across processes.
bn_splits() { local per=$(( $1 / (GPUS > 1 ? GPUS : 1) )); echo $(( per > BN_GROUP ? per / BN_GROUP : 1 )); }
BASELINE=(--batch-size $BATCH_BASE --bn-splits $(bn_splits $BATCH_BASE) --lr 0.03 --wd $WD --moco-t 0.2
          --mlp-hidden 0 --aug $AUG_BASE)                                                   # InfoNCE, asymmetric
SMALL=(--batch-size $BATCH_SMALL --bn-splits $(bn_splits $BATCH_SMALL) --lr 0.03 --wd $WD --warmup-epochs $WARMUP
       --moco-t 0.1 --mlp-hidden 2048 --aug $AUG_SMALL --smooth 0.1 --smooth-k 10 --smooth-mode topk
       --smooth-schedule warmup)                                                            # softened InfoNCE
# The small-model recipe's loss is symmetric (as in light-moco's runs), except in the CPU demo: there it would halve
# the recipe's speed (mobilenetv3_large: 263 instead of 513 img/s), more than the demo's budget can carry.
[[ $PRESET != demo ]] && SMALL+=(--symmetric)

# --- launcher: every GPU through torchrun, else one CPU process ---------------------------------------------------
if (( GPUS > 1 )); then
  LAUNCH=($PY -m torch.distributed.run --standalone --nproc_per_node="$GPUS")
else
  LAUNCH=($PY)
fi
echo "run_all.sh $PRESET: ${#ARCHS[@]} networks x 2 recipes on $( ((GPUS)) && echo "$GPUS GPU(s)" || echo CPU)"
mkdir -p "$RUNS" "$OUT"
rm -f "$OUT/RESULTS.md" "$OUT/results.csv" "$OUT/results.png"  # written again only if every stage succeeds
START=$SECONDS

for arch in "${ARCHS[@]}"; do
  # the random-init references, once per network (seed 0, the same evaluation): as initialised, and with the BN
  # running statistics set to those of the training images (the normalisation a trained network has, no learning)
  ref=$OUT/${arch}_random_knn.json
  [[ -f $ref ]] || $PY knn_eval.py --arch "$arch" --random-init "${DATA[@]}" "${EVAL[@]}" --k 20 200 --json "$ref"
  ref_bn=$OUT/${arch}_random_bn_knn.json
  [[ -f $ref_bn ]] || $PY knn_eval.py --arch "$arch" --random-init --reestimate-bn "${DATA[@]}" "${EVAL[@]}" \
    --k 20 200 --json "$ref_bn"
  for recipe in baseline small; do
    run=$RUNS/${arch}_$recipe
    if [[ $recipe == baseline ]]; then flags=("${BASELINE[@]}"); else flags=("${SMALL[@]}"); fi
    echo "== $arch, $recipe recipe -> $run"
    if ! grep -qs '"complete": true' "$run/summary.json"; then  # a --max-steps run is not finished
      "${LAUNCH[@]}" pretrain.py --arch "$arch" "${DATA[@]}" "${COMMON[@]}" "${flags[@]}" --out "$run" --resume
    fi
    [[ -f $run/knn.json ]] || $PY knn_eval.py --ckpt "$run/checkpoint.pt" "${EVAL[@]}" --k 20 200 --sweep \
      --diagnostics --json "$run/knn.json"
    [[ -f $run/linear.json ]] || $PY linear_eval.py --ckpt "$run/checkpoint.pt" "${EVAL[@]}" "${LINEAR[@]}" \
      --json "$run/linear.json"
  done
done

# --- the table: one row per network and recipe, from the JSON files the stages wrote ----------------------------
$PY report.py "$PRESET" "$RUNS" "$OUT" "$((SECONDS - START))" "${ARCHS[@]}"
