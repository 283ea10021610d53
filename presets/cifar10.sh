# cifar10: the fmnist preset (MoCo's small-data setting: small stem, batch 512, K 4096, m 0.99, split BN, 200 epochs)
# on CIFAR-10 at its 32 px; DATA_DIR holds cifar-10-batches-py/ (the python version). Sized for a GPU.
source presets/fmnist.sh
DATA=(--data cifar10)
