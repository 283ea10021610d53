# demo: the CPU demo, the default without a GPU. 20k Fashion-MNIST images at 28 px with the ImageNet stem (the small
# stem costs 8-20x on a CPU), 6 epochs of batch 128 (936 steps). Sourced by run_all.sh, which adds the recipe
# (recipes/*.args), --arch, --seed, --out and --bn-splits; docs/presets.md shows every command, resolved.
DATA=(--data fashionmnist)
NET=()                                    # the network's stem: also given to the random-init references
# --head-bn: at this budget a head without BN collapses (docs/training-health.md)
PRETRAIN=(--subset 20000 --epochs 6 --moco-k 1024 --moco-m 0.99 --wd 5e-4 --aug small --head-bn
          --aug-backend batched --channels-last --knn-every 3 --knn-subset 5000 --log-every 52)
BATCH_BASELINE=128; BATCH_SMALL=128       # the global batch of each recipe
BN_GROUP=64                               # split BN: groups of 64 images (groups of 16 break the positive)
BASELINE=()                               # the recipe's own flags beyond recipes/baseline.args
SMALL=(--warmup-epochs 1)                 # asymmetric here: the symmetric loss would halve a CPU step's speed
EVAL=(--subset 10000 --channels-last)     # kNN and linear evaluation: a 10k bank / training set, the 10k test images
LINEAR=(--cached --epochs 30 --schedule 18 24)   # linear evaluation: cached features, 30 epochs
