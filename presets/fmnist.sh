# fmnist: all 60k Fashion-MNIST images at 28 px with the small stem, in MoCo's small-data setting (its CIFAR-10 demo:
# batch 512, K 4096, m 0.99, split BN, 200 epochs; where this departs from it: docs/fidelity.md). Sized for a GPU.
# Sourced by run_all.sh, which adds the recipe, --arch, --seed, --out and --bn-splits; docs/presets.md resolves it.
DATA=(--data fashionmnist)
NET=(--small-stem)
PRETRAIN=(--epochs 200 --moco-k 4096 --moco-m 0.99 --wd 5e-4 --aug small --aug-backend batched --channels-last
          --knn-every 10)
BATCH_BASELINE=512; BATCH_SMALL=512
BN_GROUP=64
BASELINE=()
SMALL=(--warmup-epochs 5 --symmetric)
EVAL=(--channels-last)                    # the full training set as the bank, all test images
LINEAR=()                                 # MoCo's linear protocol: 100 epochs, crops and flips
