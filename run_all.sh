#!/usr/bin/env bash
# The whole study: for each of the five networks, MoCo-v2 pretraining with the baseline recipe and with the
# small-model recipe (softened InfoNCE), then weighted kNN (with the diagnostics) and linear evaluation, beside three
# references under the same kNN protocol (the untrained network, the same with the data's BN statistics, raw
# pixels); a results table at the end. It sets up what it needs first (see "set-up" below).
#
#   bash run_all.sh                           the demo on a CPU, the fmnist study where there is a GPU
#   bash run_all.sh [PRESET] [DATA_DIR]       PRESET: demo, fmnist, cifar10, imagenet, smoke
#   bash run_all.sh tests [PYTEST ARGS]       the test suite (after the same set-up); e.g. `tests -m slow`
#   bash run_all.sh gpucheck                  on a GPU machine: the CUDA tests, short runs, throughput tables
#   JOBS=2 bash run_all.sh                    pretrainings (each with its evaluations) at once; see "jobs" below
#   SEEDS=3 bash run_all.sh                   every run and reference over seeds 0, 1, 2 (default: 1 seed)
#   SEEDS=3 SEEDS_ARCHS="resnet18" bash run_all.sh     seeds 1, 2 for these networks alone, seed 0 for all
#   DRY_RUN=1 bash run_all.sh demo            print every command the study would run, run nothing
#   PRESET=cifar10 DATA_DIR=~/data bash run_all.sh
#   ARCHS="resnet18 mobilenetv3_small" bash run_all.sh       a subset of the networks
#   STUDY_DIR=/scratch bash run_all.sh                        runs/ and results/ go there (default: here)
#   PYTHON=/path/to/python bash run_all.sh                    that interpreter and its packages (no .venv)
#   bash run_all.sh --help                                    this text (also -h, help)
#
# The presets are presets/<name>.sh (demo, fmnist, cifar10, imagenet, smoke: data, schedule, batch, evaluation budget),
# the two recipes recipes/baseline.args and recipes/small.args; docs/presets.md lists every command, resolved. The
# demo takes DEMO_COST (below) on a 2-core CPU; fmnist and cifar10 are sized for one GPU, imagenet for 8.
#
# Finished stages are skipped (an evaluation only while its JSON names the checkpoint as it is now), interrupted
# pretrainings resumed (pretrain.py --resume), so rerunning the command continues a killed study. Any failing job
# stops the study. runs/<preset>/<run>/: checkpoints; results/<preset>/: RESULTS.md, results.csv, results.svg and
# for every run and reference its JSON, logs and the exact commands (command.txt): everything but the checkpoints.
set -euo pipefail
shopt -s extglob
if [[ ${1:-} == @(--help|-h|help) ]]; then  # the usage: the comments above, without their "# "
  awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"
  exit 0
fi
cd "$(dirname "$0")"
DEMO_COST="about 45 min on a 2-core CPU at one seed"  # from the measured stages of results/demo: docs/performance.md
# the fmnist study's ten pretrainings at bench.py's small-stem speed on a 2-core CPU: docs/performance.md
CPU_COST="about 100 days for fmnist's alone"
# what the user gave, checked before the (slow) set-up
SEEDS=${SEEDS:-1}
[[ $SEEDS =~ ^[1-9][0-9]*$ ]] || { echo "SEEDS=$SEEDS is not a number of seeds (1, 2, ...)." >&2; exit 2; }
[[ ${JOBS:-1} =~ ^[1-9][0-9]*$ ]] || { echo "JOBS=$JOBS is not a number of jobs (1, 2, ...)." >&2; exit 2; }
if [[ ${1:-} != @(tests|gpucheck) ]]; then  # STUDY_DIR: its nearest existing folder on the path must be a folder
  above=${STUDY_DIR:-.}
  while [[ ! -e $above ]]; do above=$(dirname "$above"); done
  [[ -d $above ]] || { echo "STUDY_DIR=$STUDY_DIR cannot hold the study's runs/ and results/, as $above is not a" \
                         "folder: choose another STUDY_DIR." >&2; exit 2; }
fi
if [[ -n ${1:-${PRESET:-}} && ${1:-${PRESET:-}} != @(tests|gpucheck) && ! -f presets/${1:-$PRESET}.sh ]]; then
  echo "unknown preset '${1:-$PRESET}': choose one of presets/ ($(cd presets && ls *.sh | sed 's/\.sh$//' |
        tr '\n' ' ')), or tests, gpucheck." >&2
  exit 2
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
           "README, Install." >&2
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

# --- the preset: given, or chosen by the hardware ------------------------------------------------------------
# the GPUs torch can use; where nvidia-smi sees GPUs that torch cannot use, one sentence and an exit (evaluation.py)
# and the study's networks (models.STUDY: the list lives there)
read -r GPUS STUDY_ARCHS < <("$PY" -c "import numpy, torch, torchvision, evaluation, models
evaluation.pick_device('auto')
print(torch.cuda.device_count(), *models.STUDY)") || true
[[ -n ${GPUS:-} ]] || { echo "set-up: $PY cannot import numpy, torch and torchvision (or the line above says why" \
  "it cannot go on)." >&2; exit 1; }
# recipes/NAME.args as an array (comments dropped): the flags pretrain.py would read from @recipes/NAME.args
read -ra RECIPE_BASELINE <<< "$(sed 's/#.*//' recipes/baseline.args | xargs)"
read -ra RECIPE_SMALL <<< "$(sed 's/#.*//' recipes/small.args | xargs)"
NPROC=$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)

# --- gpucheck: everything a first GPU session should measure, in one unattended command -------------------------
# Every step is bounded by its timeout (their sum: 9.3 min) and goes on after a failure; all output lands in
# GPUCHECK_OUT (logs and JSON, no checkpoints), small enough to copy back. Sized, by estimate from CPU timings and
# FLOP counts (not yet measured on a GPU), to take 6-8 minutes on one H100 / H200.
if [[ ${1:-} == gpucheck ]]; then
  if (( GPUS == 0 )); then
    echo "run_all.sh gpucheck checks the CUDA paths and torch sees no GPU here: run it on a machine with one." >&2
    exit 1
  fi
  G=${GPUCHECK_OUT:-runs/gpucheck}
  rm -rf "$G"; mkdir -p "$G"
  export PYTHONUNBUFFERED=1
  failed=0
  check() {  # check NAME SECONDS COMMAND...: output to $G/NAME.log, one line of verdict here and in $G/steps.txt
    local name=$1 limit=$2 start=$SECONDS rc=0; shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" > "$G/$name.log" 2>&1 || rc=$?
    local verdict="ok"
    if (( rc == 124 )); then verdict="FAILED (timed out)"; elif (( rc )); then verdict="FAILED (exit $rc)"; fi
    [[ $verdict == ok ]] || failed=1
    printf '%-24s %-28s %4d s\n' "$name" "$verdict" $((SECONDS - start)) | tee -a "$G/steps.txt"
  }
  check env 15 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, \"CUDA\", torch.version.cuda,
    \"cuDNN\", torch.backends.cudnn.version(), torch.cuda.get_device_name(), torch.cuda.get_device_capability(),
    \"bf16\", torch.cuda.is_bf16_supported(), \"GPUs\", torch.cuda.device_count())'"
  check cuda_tests 150 "$PY" -m pytest tests -m cuda -q -rfEs -p no:cacheprovider
  source presets/fmnist.sh
  for arch in $STUDY_ARCHS; do  # the fmnist preset's small-recipe command, on 2000 synthetic images (a queue of 1024)
    check "pretrain_$arch" 30 "$PY" pretrain.py --arch "$arch" "${NET[@]}" "${PRETRAIN[@]}" "${RECIPE_SMALL[@]}" \
      "${SMALL[@]}" --batch-size "$BATCH_SMALL" --bn-splits $((BATCH_SMALL / BN_GROUP)) --data synthetic \
      --img-size 28 --moco-k 1024 --knn-every 0 --max-steps 12 --log-every 3 --out "$G/pretrain_$arch"
    rm -f "$G/pretrain_$arch/checkpoint.pt"
  done
  BENCH=(--img-size 28 --small-stem --batch-size 512 --moco-k 4096 --bn-splits 8 --warmup 3 --steps 10 --workers 8)
  check bench_compare 120 "$PY" bench.py --arch mobilenetv3_small resnet18 "${BENCH[@]}" --json "$G/bench_compare.json"
  check bench_eager 50 "$PY" bench.py --arch resnet34 mobilenetv3_large efficientnet_b0 "${BENCH[@]}" --no-compare \
    --json "$G/bench_eager.json"
  at_once() {  # N copies of one bench at the same time on the GPU: does the study gain from JOBS=N there?
    local n=$1 arch=$2 i
    for ((i = 0; i < n; i++)); do
      "$PY" bench.py --arch "$arch" "${BENCH[@]}" --no-compare --json "$G/at_once_${arch}_${n}_$i.json" &
    done
    wait
  }
  check at_once 50 bash -c "$(declare -f at_once); G=$G PY=$PY; BENCH=(${BENCH[*]}); at_once 1 mobilenetv3_small &&
    at_once 2 mobilenetv3_small && at_once 4 mobilenetv3_small"
  check augment 20 "$PY" bench.py --aug-only --img-size 28 32 --batch-size 512 --workers 8 --json "$G/augment.json"
  echo "gpucheck: every log and JSON in $G (steps: $G/steps.txt)"
  exit $failed
fi
PRESET=${1:-${PRESET:-}}
if [[ -z $PRESET ]]; then
  if (( GPUS )); then
    PRESET=fmnist
    echo "run_all.sh: no preset given and $GPUS GPU(s) found, so the fmnist study: 5 networks x 2 recipes on the" \
         "60k Fashion-MNIST images, small stem, 200 epochs each, then kNN and linear evaluation. This project has" \
         "not measured it on a GPU yet: each run prints its ETA. Another preset: bash run_all.sh" \
         "demo|cifar10|imagenet|smoke."
  else
    PRESET=demo
    echo "run_all.sh: no preset given and no GPU found, so the CPU demo: 5 networks x 2 recipes on 20k" \
         "Fashion-MNIST images at 28 px, then kNN and linear evaluation; $DEMO_COST (docs/performance.md)." \
         "Another preset: bash run_all.sh fmnist|cifar10|imagenet|smoke (the first three are sized for GPUs)."
  fi
fi
DATA_DIR=${2:-${DATA_DIR:-}}
ARCHS_GIVEN=${ARCHS:-}
ARCHS=(${ARCHS:-$STUDY_ARCHS})  # ARCHS="a b": a subset
# JOBS: measured on a 2-core CPU, two pretrainings of one thread each beat one of two threads (docs/performance.md)
JOBS=${JOBS:-$( ((GPUS)) && echo 1 || echo $(( NPROC >= 2 ? 2 : 1 )))}
DRY_RUN=${DRY_RUN:-}
STUDY_DIR=${STUDY_DIR:-.}  # where runs/ and results/ go
RUNS=$STUDY_DIR/runs/$PRESET
OUT=$STUDY_DIR/results/$PRESET

# --- the preset: DATA, NET, PRETRAIN, BATCH_*, BN_GROUP, BASELINE, SMALL, EVAL, LINEAR (presets/PRESET.sh) ------
source "presets/$PRESET.sh"
DATA+=(${DATA_DIR:+--data-dir "$DATA_DIR"})

# --- before anything is made: the networks and the data are there (dry runs check them too) ---------------------
"$PY" - "${DATA[1]}" "$DATA_DIR" "${SEEDS_ARCHS:-}" "${ARCHS[@]}" > /dev/null <<'PYTHON' || exit 2
import sys
import data, models
name, data_dir, seeds_archs, archs = sys.argv[1], sys.argv[2] or None, sys.argv[3].split(), sys.argv[4:]
for variable, names in (("ARCHS", archs), ("SEEDS_ARCHS", seeds_archs)):
    unknown = [a for a in names if a not in models.ARCHS]
    if unknown:
        raise SystemExit(f"{variable} names {' '.join(unknown)}, not a network of models.py: choose from "
                         f"{' '.join(models.ARCHS)}.")
outside = [a for a in seeds_archs if a not in archs]
if outside:
    raise SystemExit(f"SEEDS_ARCHS names {' '.join(outside)}, not a network of this study (ARCHS: {' '.join(archs)}): "
                     f"name networks of ARCHS, which get every seed.")
data.load_data(name, "test", data_dir)  # a missing or unreadable data set is its one sentence, before any folder
PYTHON
if [[ -z $DRY_RUN && $PRESET == @(fmnist|cifar10|imagenet) ]] && (( GPUS == 0 )) && [[ -z ${CPU_OK:-} ]]; then
  echo "run_all.sh $PRESET is sized for GPUs: ${#ARCHS[@]} network(s) x 2 recipes x 200 epochs at $([[ $PRESET == \
imagenet ]] && echo 224 || echo 28-32) px, and this machine has no GPU torch can use. On a 2-core CPU it would take" \
       "$CPU_COST (docs/performance.md). Run it on a GPU machine, or the CPU demo (bash run_all.sh demo); to run it" \
       "here anyway: CPU_OK=1 bash run_all.sh $PRESET." >&2
  exit 2
fi

# --- launcher: with JOBS=1 every GPU serves one run through torchrun; otherwise each run takes one process ------
if (( GPUS > 1 && JOBS == 1 )); then
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS"); PER_RUN=$GPUS
else
  LAUNCH=("$PY"); PER_RUN=1
fi

# --- the two recipes: recipes/NAME.args, the preset's flags for that recipe, its batch and split-BN groups ----------
# Split BN (shuffle BN on one process): BN_GROUP images per group on every process, whatever the number of
# processes; a process holding BN_GROUP images or fewer is one group, and its keys are shuffled across processes.
bn_splits() { local per=$(( $1 / PER_RUN )); echo $(( per > BN_GROUP ? per / BN_GROUP : 1 )); }
BASELINE=("${RECIPE_BASELINE[@]}" "${BASELINE[@]}" --batch-size $BATCH_BASELINE
          --bn-splits $(bn_splits $BATCH_BASELINE))
SMALL=("${RECIPE_SMALL[@]}" "${SMALL[@]}" --batch-size $BATCH_SMALL --bn-splits $(bn_splits $BATCH_SMALL))

# --- the stages of each job; every command is recorded beside its results -------------------------------------
sha256() { python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }
# done_already RESULT [CHECKPOINT]: RESULT exists (and names CHECKPOINT as it is now); never under DRY_RUN
done_already() {
  [[ -z $DRY_RUN && -f $1 ]] || return 1
  [[ $# == 1 ]] || grep -qF "\"ckpt_sha256\": \"$(sha256 "$2")\"" "$1"
}
# stage DIR COMMAND...: appends the command (with this job's environment) to DIR/command.txt and runs it
JOB_ENV=()
stage() {
  local dir=$1; shift
  local line; line=$(printf '%q ' "${JOB_ENV[@]}" "$@")
  if [[ -n $DRY_RUN ]]; then echo "${line% }"; return; fi
  echo "${line% }" >> "$dir/command.txt"
  env "${JOB_ENV[@]}" "$@"
}
job_dir() {  # where a job's results, logs and commands go
  case $1 in
    run) echo "$OUT/${2}_${3}_s$4" ;;
    refs) echo "$OUT/${2}_random_s$3" ;;
    pixels) echo "$OUT/pixels" ;;
  esac
}
job_run() {  # ARCH RECIPE SEED: the pretraining (resumed if interrupted), then kNN and linear evaluation
  local run=$RUNS/${1}_${2}_s$3 res; res=$(job_dir run "$@")
  local flags=("${BASELINE[@]}"); [[ $2 == small ]] && flags=("${SMALL[@]}")
  if [[ -n $DRY_RUN ]] || ! grep -qs '"complete": true' "$run/summary.json"; then  # a --max-steps run is not done
    stage "$res" "${LAUNCH[@]}" pretrain.py --arch "$1" "${DATA[@]}" "${NET[@]}" "${PRETRAIN[@]}" "${flags[@]}" \
      --seed "$3" --out "$run" --resume
  fi
  [[ -n $DRY_RUN ]] || cp "$run/log.jsonl" "$run/summary.json" "$res/"  # the run's logs beside its results
  done_already "$res/knn.json" "$run/checkpoint.pt" || stage "$res" "$PY" knn_eval.py --ckpt "$run/checkpoint.pt" \
    "${EVAL[@]}" --k 20 200 --sweep --diagnostics --neighbours "$res/neighbours.png" --json "$res/knn.json"
  done_already "$res/linear.json" "$run/checkpoint.pt" || stage "$res" "$PY" linear_eval.py \
    --ckpt "$run/checkpoint.pt" "${EVAL[@]}" "${LINEAR[@]}" --json "$res/linear.json"
}
job_refs() {  # ARCH SEED: the untrained network as initialised, and with the BN statistics of the training images
  local res; res=$(job_dir refs "$@")
  done_already "$res/knn.json" || stage "$res" "$PY" knn_eval.py --arch "$1" --random-init --seed "$2" "${DATA[@]}" \
    "${NET[@]}" "${EVAL[@]}" --k 20 200 --neighbours "$res/neighbours.png" --json "$res/knn.json"
  done_already "$res/knn_bn.json" || stage "$res" "$PY" knn_eval.py --arch "$1" --random-init --precise-bn \
    --seed "$2" "${DATA[@]}" "${NET[@]}" "${EVAL[@]}" --k 20 200 --neighbours "$res/neighbours_bn.png" \
    --json "$res/knn_bn.json"
}
job_done() {  # KIND ARGS...: every stage of the job finished (a rerun skips it, and says so)
  local res; res=$(job_dir "$@")
  case $1 in
    run) grep -qs '"complete": true' "$RUNS/${2}_${3}_s$4/summary.json" &&
         done_already "$res/knn.json" "$RUNS/${2}_${3}_s$4/checkpoint.pt" &&
         done_already "$res/linear.json" "$RUNS/${2}_${3}_s$4/checkpoint.pt" ;;
    refs) done_already "$res/knn.json" && done_already "$res/knn_bn.json" ;;
    pixels) done_already "$res/knn.json" ;;
  esac
}
job_pixels() {  # raw pixels under the same kNN protocol (the same for every seed: the data do not depend on it)
  local res; res=$(job_dir pixels)
  done_already "$res/knn.json" || stage "$res" "$PY" knn_eval.py --pixels "${DATA[@]}" "${EVAL[@]}" --k 20 200 \
    --diagnostics --neighbours "$res/neighbours.png" --json "$res/knn.json"
}

# --- the jobs: runs first (the longest), seed by seed; then the references -------------------------------------
# SEEDS_ARCHS: the networks that get every seed (default: all); the others get seed 0 alone
SEEDS_ARCHS_GIVEN=${SEEDS_ARCHS:-}
SEEDS_ARCHS=(${SEEDS_ARCHS:-${ARCHS[*]}})
seeded() { [[ $2 == 0 || " ${SEEDS_ARCHS[*]} " == *" $1 "* ]]; }  # seeded ARCH SEED: is this run in the study?
LIST=()
for seed in $(seq 0 $((SEEDS - 1))); do
  for arch in "${ARCHS[@]}"; do
    if seeded "$arch" "$seed"; then LIST+=("run $arch baseline $seed" "run $arch small $seed"); fi
  done
done
for seed in $(seq 0 $((SEEDS - 1))); do
  for arch in "${ARCHS[@]}"; do if seeded "$arch" "$seed"; then LIST+=("refs $arch $seed"); fi; done
done
LIST+=("pixels")

where=$( ((GPUS)) && echo "$GPUS GPU(s)" || echo "a CPU of $NPROC cores")
echo "run_all.sh $PRESET: ${#ARCHS[@]} network(s) x 2 recipes x $SEEDS seed(s)$([[ -n $SEEDS_ARCHS_GIVEN ]] &&
      echo " (seeds past 0: ${SEEDS_ARCHS[*]})") on $where, $JOBS job(s) at once" \
     "(JOBS=N to change); results in $OUT"
if [[ -n $DRY_RUN ]]; then
  for job in "${LIST[@]}"; do read -ra j <<< "$job"; echo "# $job"; "job_${j[0]}" "${j[@]:1}"; done
  exit 0
fi
# Results without their checkpoints (a fresh clone's tracked study, run elsewhere) are not this study's to resume:
# replaced when git can restore them, else left alone with one sentence, never mixed with new runs.
if [[ ! -d $RUNS && -n $(ls -A "$OUT" 2>/dev/null) ]]; then
  if [[ -n $(git -C "$OUT" ls-files . 2>/dev/null) && -z $(git -C "$OUT" status --porcelain . 2>&1) ]]; then
    echo "run_all.sh: $OUT holds the tracked $PRESET study, whose checkpoints are not in $RUNS: this study replaces" \
         "it (git diff compares the two afterwards; to go back to it, remove $RUNS and git checkout -- $OUT)."
    rm -rf "$OUT"
  else
    echo "run_all.sh: $OUT holds results whose checkpoints are not in $RUNS, so they cannot be resumed: move them" \
         "away (or set STUDY_DIR) to start a new study there." >&2
    exit 2
  fi
fi
mkdir -p "$RUNS" "$OUT"
rm -f "$OUT/RESULTS.md" "$OUT/results.csv" "$OUT/results.svg" "$OUT/study.json"  # again only if every job succeeds
START=$SECONDS

# job_env SLOT: the environment of the job in that slot. Several jobs on a CPU divide its cores; on several GPUs
# each job takes one; on one GPU they share it.
job_env() {
  JOB_ENV=()
  if (( JOBS > 1 && GPUS == 0 )); then JOB_ENV+=(OMP_NUM_THREADS=$(( NPROC / JOBS > 1 ? NPROC / JOBS : 1 ))); fi
  if (( JOBS > 1 && GPUS > 1 )); then JOB_ENV+=(CUDA_VISIBLE_DEVICES=$(( $1 % GPUS ))); fi
}
if (( JOBS == 1 )); then  # one job at a time, its output on the terminal and in its log
  for job in "${LIST[@]}"; do
    read -ra j <<< "$job"; dir=$(job_dir "${j[@]}"); mkdir -p "$dir"
    if job_done "${j[@]}"; then echo "== $job: done, skipped"; continue; fi
    echo "== $job -> $dir"
    if ! ( job_env 0; "job_${j[0]}" "${j[@]:1}" ) 2>&1 | tee -ia "$dir/output.log"; then
      echo "run_all.sh: the job '$job' failed (its error is above, and in $dir/output.log)." >&2
      exit 1
    fi
  done
else  # JOBS slots, each job in the background with its output in its own log; a progress line per job every minute
  set -m  # every job in a process group of its own, so that stopping a job stops its whole pipeline
  PIDS=(); NAMES=(); next=0; running=0; done_jobs=0; shown=$SECONDS
  # stop_all: Ctrl-C to every running job (pretrain.py stops cleanly); TERM after 30 s to any still running, e.g.
  # where SIGINT is ignored (a study started in the background by a non-interactive shell, or under nohup)
  stop_all() {
    local pid t alive
    for pid in "${PIDS[@]}"; do [[ -z $pid ]] || kill -INT -- "-$pid" 2>/dev/null || true; done  # (one may be gone)
    for ((t = 0; t < 30; t++)); do
      alive=0
      for pid in "${PIDS[@]}"; do if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then alive=1; fi; done
      (( alive )) || break
      sleep 1
    done
    for pid in "${PIDS[@]}"; do [[ -z $pid ]] || kill -TERM -- "-$pid" 2>/dev/null || true; done
    wait || true
  }
  trap 'stop_all; echo "run_all.sh: interrupted; run the same command again to continue." >&2; exit 130' INT TERM
  while (( next < ${#LIST[@]} || running )); do
    for ((slot = 0; slot < JOBS; slot++)); do
      pid=${PIDS[slot]:-}
      if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
        read -ra j <<< "${NAMES[slot]}"; dir=$(job_dir "${j[@]}")
        if ! wait "$pid"; then
          PIDS[slot]=""; stop_all
          echo "run_all.sh: the job '${NAMES[slot]}' failed; the end of $dir/output.log:" >&2
          tail -n 15 "$dir/output.log" >&2
          exit 1
        fi
        PIDS[slot]=""; running=$((running - 1)); done_jobs=$((done_jobs + 1))
      fi
      while [[ -z ${PIDS[slot]:-} ]] && (( next < ${#LIST[@]} )); do  # jobs already done take no slot
        read -ra j <<< "${LIST[next]}"
        job_done "${j[@]}" || break
        echo "== ${LIST[next]}: done, skipped"; next=$((next + 1)); done_jobs=$((done_jobs + 1))
      done
      if [[ -z ${PIDS[slot]:-} ]] && (( next < ${#LIST[@]} )); then
        NAMES[slot]=${LIST[next]}; next=$((next + 1))
        read -ra j <<< "${NAMES[slot]}"; dir=$(job_dir "${j[@]}"); mkdir -p "$dir"
        echo "== $(date +%H:%M:%S) ${NAMES[slot]} -> $dir/output.log"
        ( job_env "$slot"; "job_${j[0]}" "${j[@]:1}" ) >> "$dir/output.log" 2>&1 &
        PIDS[slot]=$!; running=$((running + 1))
      fi
    done
    if (( SECONDS - shown >= 60 )); then
      shown=$SECONDS
      echo "-- $(date +%H:%M:%S) $done_jobs of ${#LIST[@]} jobs done"
      for ((slot = 0; slot < JOBS; slot++)); do
        [[ -n ${PIDS[slot]:-} ]] || continue
        read -ra j <<< "${NAMES[slot]}"
        echo "   ${NAMES[slot]}: $(tail -c 4000 "$(job_dir "${j[@]}")/output.log" | tr '\r' '\n' | grep -v '^ *$' |
                                   tail -n 1 | cut -c 1-110)"
      done
    fi
    sleep 1
  done
  set +m
fi

# --- the table: every figure as mean +- sd over the seeds, and the paired differences --------------------------
# study.json: what this invocation ran, so that `report.py results/PRESET` rebuilds the table from the files alone
"$PY" - "$OUT/study.json" "$PRESET" "$SEEDS" "$((SECONDS - START))" "JOBS=$JOBS SEEDS=$SEEDS$(
  [[ -n $ARCHS_GIVEN ]] && echo " ARCHS=\"${ARCHS[*]}\"")$(
  [[ -n $SEEDS_ARCHS_GIVEN ]] && echo " SEEDS_ARCHS=\"${SEEDS_ARCHS[*]}\"") bash run_all.sh $PRESET" \
  "${ARCHS[*]}" "${SEEDS_ARCHS[*]}" <<'PYTHON'
import json, sys
path, preset, seeds, seconds, invocation, archs, seeds_archs = sys.argv[1:]
json.dump({"preset": preset, "archs": archs.split(), "seeds": int(seeds), "seeds_archs": seeds_archs.split(),
           "invocation": invocation, "seconds": int(seconds)}, open(path, "w"), indent=2)
PYTHON
"$PY" report.py "$OUT"
