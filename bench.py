"""Throughput on this machine. --aug-only times two-view augmentation, the data side of a pretraining step: images
per second, each image giving two random views, for both backends at each --img-size:
- torchvision: per-image transforms on PIL images in --workers DataLoader workers;
- batched: BatchedAugment on whole uint8 batches on --device (default: CUDA when there is one).
The images are synthetic and held in memory, so no file decoding is timed.

    python3 bench.py --aug-only --img-size 32 224 --batch-size 256
"""
import argparse
import os
import time

import torch

import data


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--aug-only", action="store_true", help="time two-view augmentation alone")
    a("--img-size", type=int, nargs="+", default=[32, 224], help="view sizes; images are generated at each size")
    a("--batch-size", type=int, default=256)
    a("--batches", type=int, default=5, help="timed batches per measurement, after one untimed warm-up batch")
    a("--aug", default="mocov2", choices=data.AUGS)
    a("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the torchvision backend")
    a("--device", default="auto", help="the batched backend's device: auto, cpu, cuda, cuda:1, ...")
    return parser.parse_args(argv)


def timed(batches, step, device):
    """Seconds per call of step(), after one warm-up call."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / batches


def torchvision_rate(images, args, img_size):
    """Images per second through TwoViewDataset + view_transform in a DataLoader, as pretraining reads them."""
    train = data.ImageData("synthetic", images, None, torch.zeros(len(images), dtype=torch.long), 10,
                           *data.STATS["synthetic"])
    dataset = data.TwoViewDataset(train, data.view_transform(args.aug, img_size, train.mean, train.std))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=(args.batches + 1) * args.batch_size)
    batches = iter(torch.utils.data.DataLoader(dataset, args.batch_size, sampler=sampler,
                                               num_workers=args.workers))
    return args.batch_size / timed(args.batches, lambda: next(batches), torch.device("cpu"))


def batched_rate(images, args, img_size, device):
    """Images per second through BatchedAugment, two calls per batch, images already on the device."""
    augment = data.BatchedAugment(args.aug, img_size, *data.STATS["synthetic"])
    images = images.to(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        batch = images[torch.randint(len(images), (args.batch_size,), device=device, generator=generator)]
        return augment(batch, generator), augment(batch, generator)

    return args.batch_size / timed(args.batches, step, device)


def bench_aug(args, device):
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"two-view augmentation ({args.aug}), batch {args.batch_size}, {args.batches} timed batches; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}")
    print(f"{'px':>5}  {'backend':<12} {'device':<8} {'images/s':>9}  {'views/s':>9}")
    for size in args.img_size:
        images = data.synthetic_data("train", args.batch_size, size=size)[0]
        for backend, where, rate in (
                ("torchvision", f"{args.workers} wkr", lambda: torchvision_rate(images, args, size)),
                ("batched", device.type, lambda: batched_rate(images, args, size, device))):
            rate = rate()
            print(f"{size:>5}  {backend:<12} {where:<8} {rate:>9.0f}  {2 * rate:>9.0f}", flush=True)


def main(argv=None):
    args = get_args(argv)
    if not args.aug_only:
        raise SystemExit("bench.py times two-view augmentation only so far: pass --aug-only.")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    bench_aug(args, device)


if __name__ == "__main__":
    main()
