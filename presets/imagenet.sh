# imagenet: the papers' settings on ImageNet, or any images in class folders (DATA_DIR holds train/ and val/): 224 px,
# K 65536, m 0.999, blur, 200 epochs; the two recipes differ in batch and augmentation too. Sized for 8 GPUs.
# Sourced by run_all.sh, which adds the recipe, --arch, --seed, --out and --bn-splits; docs/presets.md resolves it.
DATA=(--data imagefolder)
NET=()
PRETRAIN=(--epochs 200 --moco-k 65536 --moco-m 0.999 --wd 1e-4 --aug-backend torchvision --workers 10
          --channels-last --knn-every 0)
BATCH_BASELINE=256; BATCH_SMALL=512
BN_GROUP=64
BASELINE=(--aug mocov2)
SMALL=(--aug strong --warmup-epochs 5 --symmetric)
EVAL=(--workers 10 --channels-last)
LINEAR=()
