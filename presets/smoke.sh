# smoke: the test suite's check that the stages chain, on 64 synthetic images (4 steps per run); it claims nothing.
# Sourced by run_all.sh, which adds the recipe, --arch, --seed, --out and --bn-splits; docs/presets.md resolves it.
DATA=(--data synthetic)
NET=()
PRETRAIN=(--subset 64 --epochs 1 --moco-k 32 --moco-m 0.99 --wd 5e-4 --aug small --aug-backend batched --knn-every 1)
BATCH_BASELINE=16; BATCH_SMALL=16
BN_GROUP=8
BASELINE=()
SMALL=(--symmetric)
EVAL=(--subset 64 --test-subset 32)
LINEAR=(--cached --epochs 2 --schedule 1)
