# cifar10: CIFAR-10 (DATA_DIR holds cifar-10-batches-py/, the python version) at 32 px with the small stem, in MoCo's
# small-data setting (its CIFAR-10 demo: batch 512, K 4096, m 0.99, split BN, 200 epochs; docs/fidelity.md). Sized
# for a GPU. Sourced by run_all.sh, which adds the recipe, --arch, --seed, --out and --bn-splits; docs/presets.md.
DATA=(--data cifar10)
NET=(--small-stem)
PRETRAIN=(--epochs 200 --moco-k 4096 --moco-m 0.99 --wd 5e-4 --aug small --aug-backend batched --channels-last
          --knn-every 10)
BATCH_BASELINE=512; BATCH_SMALL=512
BN_GROUP=64
BASELINE=()
SMALL=(--warmup-epochs 5 --symmetric)
EVAL=(--channels-last)
LINEAR=()
