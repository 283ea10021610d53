#!/usr/bin/env bash
# bash run_all.sh gpucheck: everything a first GPU session should measure, in one unattended command. run_all.sh
# sets up the project and calls this with PY (the interpreter) and STUDY_ARCHS (models.STUDY).
# Every step is bounded by its timeout (their sum: 9.3 min) and goes on after a failure; all output lands in
# GPUCHECK_OUT (logs and JSON, no checkpoints), small enough to copy back. Sized, by estimate from CPU timings and
# FLOP counts (not yet measured on a GPU), to take 6-8 minutes on one H100 / H200.
set -euo pipefail
cd "$(dirname "$0")/.."
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
for arch in $STUDY_ARCHS; do  # the fmnist preset's small-recipe command, on 2000 synthetic images (a queue of 1024)
  check "pretrain_$arch" 30 "$PY" pretrain.py @presets/fmnist/pretrain.args @recipes/small.args \
    @presets/fmnist/small.args --arch "$arch" --data synthetic --img-size 28 --moco-k 1024 --knn-every 0 \
    --max-steps 12 --log-every 3 --out "$G/pretrain_$arch"
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
