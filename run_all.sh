#!/usr/bin/env bash
# The whole study: for each of the five networks, MoCo-v2 pretraining with the baseline recipe and with the
# small-model recipe (softened InfoNCE), then weighted kNN (with the diagnostics) and linear evaluation, beside three
# references under the same kNN protocol (the untrained network, the same with the data's BN statistics, raw
# pixels); a results table at the end. It sets up what it needs first (see "set-up" below), then hands the study to
# study.py, which times the study on this machine before it runs it.
#
#   bash run_all.sh                           the demo on a CPU, the fmnist study where there is a GPU
#   bash run_all.sh [PRESET] [DATA_DIR]       PRESET: demo, fmnist, cifar10, imagenet, smoke
#   bash run_all.sh tests [PYTEST ARGS]       the test suite (after the same set-up); e.g. `tests -m slow`
#   bash run_all.sh gpucheck                  on a GPU machine: the CUDA tests, short runs, throughput tables
#   JOBS=2 bash run_all.sh                    jobs at once (default: 2 on a CPU of 2+ cores, 1 with GPUs)
#   SEEDS=3 bash run_all.sh                   every run and reference over seeds 0, 1, 2 (default: 1 seed)
#   SEEDS=3 SEEDS_ARCHS="resnet18" bash run_all.sh     seeds 1, 2 for these networks alone, seed 0 for all
#   HOURS=2.5 bash run_all.sh                 a time-boxed slice: starts no job that cannot finish inside it, stops
#                                             at its end (exit 3); the same command again continues the study
#   DRY_RUN=1 bash run_all.sh demo            print every command the study would run and what it would cost here
#                                             (COST=0: the commands alone), run nothing
#   PLAN=1 bash run_all.sh demo               one self-contained line per job, for xargs -P or a Slurm array
#   PRESET=cifar10 DATA_DIR=~/data bash run_all.sh
#   ARCHS="resnet18 mobilenetv3_small" bash run_all.sh       a subset of the networks
#   STUDY_DIR=/scratch bash run_all.sh                        runs/ and results/ go there (default: here)
#   PYTHON=/path/to/python bash run_all.sh                    that interpreter and its packages (no .venv)
#   bash run_all.sh --help                                    this text (also -h, help)
#
# The presets are folders presets/<name>/ of flag files (demo, fmnist, cifar10, imagenet, smoke: data, schedule,
# batch, evaluation budget), the two recipes recipes/baseline.args and recipes/small.args; docs/presets.md lists
# every command, resolved. fmnist and cifar10 are sized for one GPU, imagenet for 8.
#
# A study grows: a job whose results are there and whose recorded commands mean what the study would run now is
# done (with or without its checkpoint), an interrupted pretraining resumes, a run whose command differs is rerun and
# replaces its old results only when it has finished. Exit status: 0 complete, 1 a job failed, 2 a mistake of the
# command, 3 the time box ended with jobs left, 130 interrupted. runs/<preset>/<run>/: checkpoints;
# results/<preset>/: RESULTS.md, results.csv, results.svg, study.json and for every run and reference its JSON, logs
# and the exact commands (command.txt): everything but the checkpoints.
set -euo pipefail
shopt -s extglob
if [[ ${1:-} == @(--help|-h|help) ]]; then  # the usage: the comments above, without their "# "
  awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"
  exit 0
fi
cd "$(dirname "$0")"
# what the user gave, checked before the (slow) set-up
SEEDS=${SEEDS:-1}
[[ $SEEDS =~ ^[1-9][0-9]*$ ]] || { echo "SEEDS=$SEEDS is not a number of seeds (1, 2, ...)." >&2; exit 2; }
[[ ${JOBS:-1} =~ ^[1-9][0-9]*$ ]] || { echo "JOBS=$JOBS is not a number of jobs (1, 2, ...)." >&2; exit 2; }
[[ -z ${HOURS:-} || $HOURS =~ ^[0-9]*\.?[0-9]+$ && ! $HOURS =~ ^0*\.?0*$ ]] ||
  { echo "HOURS=$HOURS is not a number of hours (2, 0.5, ...)." >&2; exit 2; }
if [[ ${1:-} != @(tests|gpucheck) ]]; then  # STUDY_DIR: its nearest existing folder on the path must be a folder
  above=${STUDY_DIR:-.}
  while [[ ! -e $above ]]; do above=$(dirname "$above"); done
  [[ -d $above ]] || { echo "STUDY_DIR=$STUDY_DIR cannot hold the study's runs/ and results/, as $above is not a" \
                         "folder: choose another STUDY_DIR." >&2; exit 2; }
fi
if [[ -n ${1:-${PRESET:-}} && ${1:-${PRESET:-}} != @(tests|gpucheck) ]]; then  # before the set-up; no torch needed
  checker=python3; [[ -n ${PYTHON:-} && -x $PYTHON ]] && checker=$PYTHON  # any Python: engine/presets.py needs no torch
  "$checker" -m engine.presets "${1:-$PRESET}" || exit 2
fi

# --- set-up: a python with the locked packages, and the embedded data set ------------------------------------
# A project-local .venv with requirements.lock (every package pinned exactly, the torch/torchvision pair included),
# rebuilt whenever the lock changes; PYTHON=/path/to/python uses that interpreter and its own packages instead.
works() { "$1" -c "import numpy, pytest, torch, torchvision" >/dev/null 2>&1; }
sha256() { python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }
if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON  # taken as it is; the first python command below says so if it lacks a package
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
           "docs/install.md, Install." >&2
      exit 1
    fi
    works .venv/bin/python || { echo "set-up failed: .venv/bin/python cannot import torch and torchvision." >&2
                                exit 1; }
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

# the GPUs torch can use; where nvidia-smi sees GPUs that torch cannot use, one sentence and an exit (evaluation.py)
# and the study's networks (models.STUDY: the list lives there)
read -r GPUS STUDY_ARCHS < <("$PY" -c "import numpy, torch, torchvision, evaluation, models
evaluation.pick_device('auto')
print(torch.cuda.device_count(), *models.STUDY)") || true
[[ -n ${GPUS:-} ]] || { echo "set-up: $PY cannot import numpy, torch and torchvision (or the line above says why" \
  "it cannot go on)." >&2; exit 1; }

if [[ ${1:-} == gpucheck ]]; then  # everything a first GPU session should measure, in one unattended command
  if (( GPUS == 0 )); then
    echo "run_all.sh gpucheck checks the CUDA paths and torch sees no GPU here: run it on a machine with one." >&2
    exit 1
  fi
  PY=$PY STUDY_ARCHS=$STUDY_ARCHS exec bash tools/gpucheck.sh
fi
PRESET=${1:-${PRESET:-}}
if [[ -z $PRESET ]]; then
  if (( GPUS )); then
    PRESET=fmnist
    echo "run_all.sh: no preset given and $GPUS GPU(s) found, so the fmnist study: 5 networks x 2 recipes on the" \
         "60k Fashion-MNIST images, small stem, 200 epochs each, then kNN and linear evaluation. Another preset:" \
         "bash run_all.sh demo|cifar10|imagenet|smoke."
  else
    PRESET=demo
    echo "run_all.sh: no preset given and no GPU found, so the CPU demo: 5 networks x 2 recipes on 20k" \
         "Fashion-MNIST images at 28 px, then kNN and linear evaluation; what it costs here is measured below." \
         "Another preset: bash run_all.sh fmnist|cifar10|imagenet|smoke (the first three are sized for GPUs)."
  fi
fi
DATA_DIR=${2:-${DATA_DIR:-}}

# --- the study: study.py (the jobs, their cost here, the pool, the time box, the plan, the table) ----------------
# the command that reruns this study, for study.json and RESULTS.md
INVOCATION=""
[[ -z ${JOBS:-} ]] || INVOCATION+="JOBS=$JOBS "
INVOCATION+="SEEDS=$SEEDS"
[[ -z ${ARCHS:-} ]] || INVOCATION+=" ARCHS=\"$ARCHS\""
[[ -z ${SEEDS_ARCHS:-} ]] || INVOCATION+=" SEEDS_ARCHS=\"$SEEDS_ARCHS\""
[[ -z ${HOURS:-} ]] || INVOCATION+=" HOURS=$HOURS"
INVOCATION+=" bash run_all.sh $PRESET"
FLAGS=(--seeds "$SEEDS" --study-dir "${STUDY_DIR:-.}" --python "$PY" --gpus "$GPUS" --invocation "$INVOCATION")
[[ -z ${ARCHS:-} ]] || FLAGS+=(--archs $ARCHS)
[[ -z ${SEEDS_ARCHS:-} ]] || FLAGS+=(--seeds-archs $SEEDS_ARCHS)
[[ -z ${JOBS:-} ]] || FLAGS+=(--jobs "$JOBS")
[[ -z ${HOURS:-} ]] || FLAGS+=(--hours "$HOURS")
[[ -z $DATA_DIR ]] || FLAGS+=(--data-dir "$DATA_DIR")
[[ -z ${DRY_RUN:-} ]] || FLAGS+=(--dry-run)
[[ -z ${PLAN:-} ]] || FLAGS+=(--plan)
[[ -z ${CPU_OK:-} ]] || FLAGS+=(--cpu-ok)
[[ ${COST:-1} != 0 ]] || FLAGS+=(--no-cost)
exec "$PY" study.py "$PRESET" "${FLAGS[@]}"
