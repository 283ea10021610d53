"""Pretrain a small CNN with MoCo-v2 (Chen et al. 2020) and the softened InfoNCE of the ICME'23 paper.

One process (CPU or one GPU):  python pretrain.py --arch mobilenetv3_small --moco-k 4096 --out runs/mnv3s
Several GPUs / nodes:          torchrun --standalone --nproc_per_node=8 pretrain.py ...

The defaults are the MoCo-v2 baseline recipe (with CIFAR's queue of 4096); run_all.sh spells out the small-model
recipe as flags (README, "The two recipes"). OUT holds checkpoint.pt (written atomically every epoch), log.jsonl,
and summary.json ("complete": false after a --max-steps stop). Ctrl-C prints the command that resumes the run.

In reading order: the flags; the method (lr schedule, model, train_step); the run (the loop, its log and
checkpoints); the set-up (processes, data, model, checking flags and resuming).
"""
import argparse
import json
import math
import os
import resource
import shlex
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import models
from evaluation import knn_monitor, pick_device, save_atomic, writable_dir, write_json
from losses import SMOOTH_MODES, SMOOTH_SCHEDULES, contrastive_accuracy, distill_loss, smooth_eps, soft_info_nce
from models import ARCHS, MoCo, load_pretrained

# 2: --lr is a rate per 256 images (version 1 stored the peak rate itself); resuming needs the same version
CHECKPOINT_VERSION = 2
# flags that may change when a run is resumed; every other flag given must equal the checkpoint's
RUN_CONTROL = {"out", "resume", "data_dir", "workers", "device", "max_steps", "knn_every", "knn_subset",
               "log_every", "compile"}


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    a = p.add_argument
    count, number, fraction = data.int_flag, data.float_flag, data.float_flag(0, 1)
    a("--arch", default="resnet18", choices=ARCHS, help="backbone")
    a("--small-stem", action="store_true", help="stem for 28-64 px inputs (total stride 8)")
    a("--mlp-hidden", type=count(0, 65536), default=0, help="hidden width of the projection head; 0 = feature size "
                                                          "(MoCo-v2)")
    a("--head-bn", action="store_true", help="BatchNorm on the head's hidden layer (SimCLR / MoCo v3 style)")
    a("--moco-dim", type=count(1, 65536), default=128, help="embedding size")
    a("--moco-k", type=count(1, 2**24), default=4096, help="queue size K, well below the number of images (MoCo "
                                                          "uses 65536 on ImageNet's 1.28M, 4096 on CIFAR's 50k)")
    a("--moco-m", type=fraction, default=0.999, help="key-encoder momentum")
    a("--moco-t", type=number(0, 100, low_open=True), default=0.2, help="temperature tau")
    a("--symmetric", action="store_true", help="loss L(q1, k2) + L(q2, k1)")
    a("--bn-splits", type=count(1, 4096), default=1, help="split BN into this many groups of the per-process batch")
    a("--smooth", type=number(0, 1, high_open=True), default=0.0, help="eps of the softened InfoNCE; 0 = plain "
                                                                        "InfoNCE")
    a("--smooth-k", type=count(1, 2**24), default=10, help="number of queue neighbours that share eps")
    a("--smooth-mode", default="topk", choices=SMOOTH_MODES, help="how eps is spread over the neighbours")
    a("--smooth-schedule", default="constant", choices=SMOOTH_SCHEDULES,
      help="constant eps, 0 during the lr warm-up, or a cosine ramp")
    a("--data", default="fashionmnist", choices=data.DATASETS, help="data set")
    a("--data-dir", default=None, help="where the data set is (or is downloaded to); default: Debian's "
                                       "Fashion-MNIST, else ./data")
    a("--subset", default=None, help="'N' (first N images) or 'N/class' (N per class, seeded)")
    a("--img-size", type=data.img_size_flag, default=0, help=f"view size, at least {data.MIN_IMG_SIZE}; 0 = the "
                                                             f"data set's native size")
    a("--aug", default="mocov2", choices=data.AUGS, help="augmentation preset (data.py)")
    a("--aug-backend", default="auto", choices=data.AUG_BACKENDS,
      help="torchvision: per-image transforms in DataLoader workers; batched: per-sample parameters on whole "
           "batches on the device; auto: batched for in-memory data sets, torchvision for image files")
    a("--workers", type=count(0, 256), default=min(4, os.cpu_count() or 1),
      help="DataLoader workers (torchvision backend); default: 4, at most this machine's cores")
    a("--epochs", type=count(1, 100_000), default=200, help="length of the lr schedule")
    a("--batch-size", type=count(1, 2**20), default=256, help="global batch over all processes")
    a("--lr", type=number(0, 1000, low_open=True), default=0.03, help="base learning rate per 256 images: the "
      "peak rate is lr x batch-size / 256 (linear scaling), so 0.03 gives MoCo-v2's 0.03 at 256 and 0.06 at 512")
    a("--wd", type=number(0, 1), default=1e-4, help="weight decay")
    a("--warmup-epochs", type=number(0, 100_000), default=0.0, help="linear lr warm-up, then cosine decay to 0")
    a("--max-steps", type=count(0, 10**12), default=0, help="stop after this many optimizer steps, keeping the "
                                                           "full schedule's lr (0 = all epochs)")
    a("--teacher", default=None, help="checkpoint.pt of a frozen teacher: adds DisCo distillation")
    a("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="auto: bf16 (or fp16) on CUDA, off on CPU")
    a("--channels-last", action="store_true", help="channels-last memory format (faster for depthwise networks)")
    a("--compile", action="store_true", help="torch.compile the encoders")
    a("--device", default="auto", help="auto, cpu, cuda")
    a("--seed", type=count(0, 2**32 - 1), default=0, help="initialisation, image order and augmentation")
    a("--knn-every", type=count(0, 100_000), default=0, help="weighted-kNN monitor on the eval split every N epochs "
                                                            "(0 = off)")
    a("--knn-subset", default=None, help="subset of the bank and of the queries for the kNN monitor")
    a("--log-every", type=count(1, 10**9), default=50, help="steps between log lines")
    a("--out", default="runs/pretrain", help="run directory: checkpoint.pt, log.jsonl, summary.json")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists; flags not given "
                                            "take the checkpoint's values")
    return p


def get_args(argv=None):
    return parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# The method: the learning-rate rule and schedule, the model, and one MoCo step
# ---------------------------------------------------------------------------------------------------------------


def peak_lr(args):
    """The linear scaling rule (Goyal et al.; MoCo v3): --lr is the rate for a global batch of 256 images."""
    return args.lr * args.batch_size / 256


def lr_at(step, total_steps, warmup_steps, base_lr):
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def build(args, device):
    """The MoCo model (on the CPU until moved), its SGD optimizer, the fp16 gradient scaler (a no-op otherwise) and
    the autocast context for --amp on this device."""
    raw = MoCo(args.arch, args.small_stem, args.moco_dim, args.mlp_hidden, args.moco_k, args.bn_splits,
               args.symmetric, args.head_bn)
    optimizer = torch.optim.SGD(raw.encoder_q.parameters(), lr=peak_lr(args), momentum=0.9, weight_decay=args.wd)
    if device.type == "cuda" and args.amp != "off":
        fp16 = args.amp == "fp16" or (args.amp == "auto" and not torch.cuda.is_bf16_supported())
        amp_dtype = torch.float16 if fp16 else torch.bfloat16
    elif args.amp in ("bf16", "fp16"):
        raise SystemExit(f"--amp {args.amp} needs a CUDA device; on {device} use --amp auto or off.")
    else:
        amp_dtype = None
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    return raw, optimizer, scaler, autocast


def train_step(model, x1, x2, optimizer, scaler, autocast, args, m, eps, teacher=None):
    """One MoCo step at momentum m and smoothing eps (the optimizer holds this step's lr): query and key embeddings
    (the keys join the queue inside the model), the (softened) InfoNCE against the queue as it was before them, SGD.
    Returns the loss and the pretext accuracy (%, how often q1's positive key beats all K queue entries), both as
    detached 0-dim tensors."""
    with autocast:
        q1, q2, k1, k2, queue = model(x1, x2, m, both_queries=teacher is not None)
        if teacher is not None:
            with torch.no_grad():
                t1, t2 = teacher(x1).float(), teacher(x2).float()
    q1, k2 = q1.float(), k2.float()  # the loss in fp32: logits / tau over K entries need the precision
    loss = soft_info_nce(q1, k2, queue, args.moco_t, eps, args.smooth_k, args.smooth_mode)
    if args.symmetric:
        loss = loss + soft_info_nce(q2.float(), k1.float(), queue, args.moco_t, eps, args.smooth_k, args.smooth_mode)
    if teacher is not None:
        loss = loss + distill_loss(q1, t1) + distill_loss(q2.float(), t2)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), contrastive_accuracy(q1.detach(), k2, queue)


# ---------------------------------------------------------------------------------------------------------------
# The run: the training loop with its log, checkpoints and summary
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    try:
        return run(args, argv)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", 0)) == 0:
            print(interrupted(args.out, argv), file=sys.stderr)
        raise SystemExit(130) from None


def run(args, argv):
    """Set-up (processes, device, resume, data, model), the training loop with its log and checkpoints, the summary."""
    rank, world, device, ddp = start_processes(args)
    master = rank == 0
    args, ckpt = open_run(args, argv, master)
    files = RunFiles(args.out, master)
    train = training_data(args, device, world)
    torch.manual_seed(args.seed + rank)
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + rank)
    raw, model, optimizer, scaler, autocast, step = prepare_model(args, ckpt, files.ckpt_path, device, rank, world,
                                                                  ddp, aug_gen)
    wall_before = ckpt["wall_s"] if ckpt else 0.0  # seconds the steps of a resumed checkpoint took
    teacher = load_teacher(args, device)
    knn_sets = ([data.load_data(args.data, split, args.data_dir, args.knn_subset, args.seed)
                 for split in ("train", "test")] if args.knn_every and master else None)

    steps_per_epoch = len(train) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    if master:
        os.makedirs(args.out, exist_ok=True)
        trim_log(files.log_path, step)
        n_params = sum(p.numel() for p in raw.encoder_q.backbone.parameters())
        print(f"{args.arch}: {n_params:,} backbone parameters; {len(train)} images, {steps_per_epoch} steps/epoch "
              f"x {args.epochs} epochs on {world} x {device}" + (f", resuming at step {step}" if step else ""))

    def knn(epoch):  # the kNN monitor of the query backbone, logged
        top1 = knn_monitor(raw.encoder_q.backbone, *knn_sets, args.img_size, device)
        files.log({"epoch": epoch, "step": step, "knn_top1": top1})
        print(f"epoch {epoch}: kNN top-1 {top1:.2f}%")
        return top1

    if step >= last_step:
        if master and not os.path.exists(files.summary_path):  # killed between the last checkpoint and the summary
            files.write_summary(args, raw, device, world, step, total_steps, wall_before, ckpt["images_per_s"],
                                (files.logged("knn_top1") or [None])[-1], step)
        if master:
            print(f"{args.out} has reached step {step} of {total_steps}; nothing to do.")
        return raw
    knn_top1 = knn(0) if step == 0 and knn_sets else None
    resumed_at, start_time = step, time.time()
    paused = 0.0  # seconds spent on checkpoints and kNN: they count neither towards images/s nor the ETA
    interval, epoch_sum = torch.zeros(2, device=device), torch.zeros(2, device=device)  # summed loss, pretext acc
    interval_steps, epoch_steps, images_seen = 0, 0, 0
    while step < last_step:
        epoch = step // steps_per_epoch
        for x1, x2 in epoch_batches(train, args, epoch, step % steps_per_epoch, rank, world, device, aug_gen):
            # this step's schedules: lr (warm-up, cosine) and smoothing eps
            lr = lr_at(step, total_steps, warmup_steps, peak_lr(args))
            eps = smooth_eps(args.smooth, args.smooth_schedule, step, total_steps, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, acc = train_step(model, x1, x2, optimizer, scaler, autocast, args, args.moco_m, eps, teacher)
            step += 1
            interval_steps, epoch_steps = interval_steps + 1, epoch_steps + 1
            images_seen += args.batch_size
            sums = torch.stack([loss, acc])  # no host sync here: the means are read once per interval
            interval += sums
            epoch_sum += sums
            if step % args.log_every == 0 or step == last_step:
                mean_loss, mean_acc = mean_over_ranks(interval, interval_steps)
                check_finite(mean_loss, step, args.out)
                speed = images_seen / (time.time() - start_time - paused)  # this session's mean: steadier
                files.log({"epoch": epoch, "step": step, "loss": mean_loss, "acc": mean_acc, "lr": lr, "eps": eps,
                           "img_per_s": speed})
                if master:
                    print(f"epoch {epoch + 1}/{args.epochs} step {step}/{last_step} loss {mean_loss:.4f} "
                          f"acc {mean_acc:5.1f}% lr {lr:.4f} eps {eps:.3f} {speed:6.0f} img/s "
                          f"eta {duration((last_step - step) * args.batch_size / speed)}", flush=True)
                interval.zero_()
                interval_steps = 0
            if step == last_step:
                break
        pause = time.time()
        epoch_loss, epoch_acc = mean_over_ranks(epoch_sum, max(1, epoch_steps))
        check_finite(epoch_loss, step, args.out)
        if step % steps_per_epoch == 0:  # the health curve: pretext accuracy and loss averaged over the epoch
            files.log({"epoch": step // steps_per_epoch, "step": step, "epoch_loss": epoch_loss,
                       "epoch_acc": epoch_acc, "epoch_steps": epoch_steps})
            if knn_sets and (step // steps_per_epoch) % args.knn_every == 0:
                knn_top1 = knn(step // steps_per_epoch)
        interval.zero_()  # the next logging interval starts with the epoch
        epoch_sum.zero_()
        epoch_steps = interval_steps = 0
        check_finite_weights(raw, step, args.out)
        states = rng_states(aug_gen)  # a collective: every rank takes part
        files.save_checkpoint({"args": vars(args), "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "epoch": step // steps_per_epoch, "step": step,
                               "rng": states, "wall_s": wall_before + time.time() - start_time,
                               "images_per_s": images_seen / (pause - start_time - paused),
                               "version": CHECKPOINT_VERSION})
        paused += time.time() - pause

    wall = time.time() - start_time
    files.write_summary(args, raw, device, world, step, total_steps, wall_before + wall,
                        images_seen / (wall - paused), knn_top1, resumed_at)
    if master:
        print(f"done: {step} steps in {wall:.0f} s; summary in {files.summary_path}")
    return raw


def epoch_batches(train, args, epoch, start, rank, world, device, aug_gen):
    """The rank's (view1, view2) batches of one epoch from step `start` on, in --channels-last's memory format. The
    image order depends only on (seed, epoch), so every rank cuts the same permutation and a resumed run sees the
    same batches."""
    steps = len(train) // args.batch_size
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + epoch))
    order = order[:steps * args.batch_size].view(steps, world, args.batch_size // world)[start:, rank]
    loader_gen = torch.Generator().manual_seed(args.seed * 1000 + epoch * world + rank)  # the workers' seeds
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for x1, x2, _ in data.view_batches(train, args.aug, args.img_size, order, device, backend=args.aug_backend,
                                       gen=aug_gen, workers=args.workers, loader_gen=loader_gen):
        yield x1.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt)


def mean_over_ranks(sums, count):
    """sums / count averaged over every process: the same numbers on every rank, so that a decision taken on them
    (stop on a NaN) is taken by all ranks together instead of leaving the others waiting in the next collective."""
    if dist.is_initialized():
        sums = sums.clone()
        dist.all_reduce(sums)
        count *= dist.get_world_size()
    return (sums / count).tolist()


def check_finite(loss, step, out):
    if not math.isfinite(loss):
        raise SystemExit(f"the loss became {loss} before step {step}; stopped without saving, so the last "
                         f"good checkpoint in {out} is kept: lower --lr, or use --amp off.")


def check_finite_weights(model, step, out):
    """No checkpoint with NaN or inf weights: a finite loss does not prove the update that followed it was finite.
    Every rank checks its own copy (BN statistics differ between ranks) and all stop if any rank found one."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    ranks_with_bad = torch.tensor([float(bool(bad))], device=model.queue.device)
    if dist.is_initialized():
        dist.all_reduce(ranks_with_bad)
    if ranks_with_bad.item():
        found = f"{len(bad)} weight tensors ({bad[0]}, ...)" if bad else "weight tensors on another process"
        raise SystemExit(f"{found} became NaN or inf by step {step}; stopped without saving, so the last good "
                         f"checkpoint in {out} is kept: lower --lr, or use --amp off.")


def duration(seconds):
    """H:MM:SS, with days in front past 24 h: 1d 01:18:36."""
    days, rest = divmod(round(seconds), 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"


class RunFiles:
    """What rank 0 writes to --out: log.jsonl (one JSON record per line), checkpoint.pt and summary.json. Other
    ranks write nothing."""

    def __init__(self, out, master):
        self.master = master
        self.log_path, self.ckpt_path = os.path.join(out, "log.jsonl"), os.path.join(out, "checkpoint.pt")
        self.summary_path = os.path.join(out, "summary.json")

    def log(self, record):
        if self.master:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def logged(self, key):
        with open(self.log_path) as f:
            return [r[key] for r in map(json.loads, f) if key in r]

    def save_checkpoint(self, state):
        if self.master:
            save_atomic(state, self.ckpt_path)

    def write_summary(self, args, raw, device, world, step, total_steps, wall_s, images_per_s, knn_top1, resumed_at):
        if not self.master:
            return
        peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        write_json({"arch": args.arch, "backbone_params": sum(p.numel() for p in raw.encoder_q.backbone.parameters()),
                    "epochs": step * args.epochs / total_steps, "steps": step, "images_per_s": images_per_s,
                    "peak_memory_mb": peak_mb, "wall_s": wall_s, "resumed_at_step": resumed_at,
                    "knn_top1": knn_top1, "world_size": world, "device": str(device), "args": vars(args),
                    "complete": step == total_steps},  # False after --max-steps: run_all.sh resumes it
                   self.summary_path)


# ---------------------------------------------------------------------------------------------------------------
# Set-up: processes, the run directory, data and model; checking flags; resuming
# ---------------------------------------------------------------------------------------------------------------


def start_processes(args):
    """(rank, world size, device, ddp): one process per GPU under torchrun (gloo on CPUs), else this one process."""
    if "RANK" not in os.environ:  # not started by torchrun
        return 0, 1, pick_device(args.device), False
    use_cuda = pick_device(args.device).type == "cuda"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, True


def open_run(args, argv, master):
    """(args, checkpoint or None): a new run directory, or with --resume the checkpoint in it and its flags."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out} is a file, not a run directory: choose another --out.")
    writable_dir(args.out, "--out")
    path = os.path.join(args.out, "checkpoint.pt")
    ckpt = None
    if os.path.exists(path):
        if not args.resume:
            raise SystemExit(f"{path} already exists: pass --resume to continue that run, or choose another --out.")
        ckpt = read_checkpoint(path)
        args = resume_args(args, ckpt["args"], given_flags(argv))
    if master and os.path.exists(path + ".tmp"):
        os.remove(path + ".tmp")  # a save that was killed: the checkpoint itself is the one before it
    return args, ckpt


def training_data(args, device, world):
    """The pretraining images; with --aug-backend batched, in memory on the device."""
    train = data.load_data(args.data, "pretrain", args.data_dir, args.subset, args.seed)
    args.img_size = args.img_size or data.default_img_size(args.data)
    check_setup(args, len(train), world)
    args.aug_backend = data.aug_backend(train, args.aug_backend)
    if args.aug_backend == "batched":
        train.images = train.images.to(device)
    return train


def check_setup(args, num_images, world):
    keys_per_step = args.batch_size * (2 if args.symmetric else 1)
    problems = [
        (args.batch_size % world, f"--batch-size {args.batch_size} is not divisible by the {world} processes"),
        (args.batch_size > num_images, f"--batch-size {args.batch_size} exceeds the {num_images} training images"),
        (args.moco_k >= num_images, f"--moco-k {args.moco_k} is not smaller than the {num_images} training "
                                    f"images, so the queue would hold stale copies of each query's own image; "
                                    + queue_advice(num_images, keys_per_step)),
        (args.moco_k < keys_per_step, f"--moco-k {args.moco_k} is smaller than the {keys_per_step} keys "
                                      f"enqueued per step; raise --moco-k or lower --batch-size"),
        ((args.batch_size // world) % args.bn_splits, f"--bn-splits {args.bn_splits} does not divide the "
                                                       f"per-process batch of {args.batch_size // world}"),
        (args.smooth_mode == "tiered" and args.smooth_k < 3, "--smooth-mode tiered needs --smooth-k 3 or more"),
        (args.smooth_k > args.moco_k, f"--smooth-k {args.smooth_k} exceeds the {args.moco_k} queue entries"),
        (args.warmup_epochs >= args.epochs, f"--warmup-epochs {args.warmup_epochs:g} must be below --epochs "
                                            f"{args.epochs}"),
    ]
    for failed, sentence in problems:
        if failed:
            raise SystemExit(sentence + ".")


def queue_advice(num_images, keys_per_step):
    """A --moco-k to suggest: the largest power of two at most an eighth of the images (4096 for CIFAR's 50k, as
    MoCo's CIFAR runs), if it still holds one step's keys."""
    k = 2 ** int(math.log2(max(1, num_images // 8)))
    if k >= keys_per_step:
        return f"use e.g. --moco-k {k} on {num_images} images"
    return (f"{num_images} images are too few for a queue that holds one step's {keys_per_step} keys and stays "
            f"well below their number: use more images or a smaller --batch-size")


def prepare_model(args, ckpt, ckpt_path, device, rank, world, ddp, aug_gen):
    """(raw MoCo model, the model to call (DDP under torchrun), optimizer, scaler, autocast, the step to start from):
    built, moved to the device, restored from ckpt when resuming, compiled with --compile."""
    raw, optimizer, scaler, autocast = build(args, device)
    raw.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    step = restore(ckpt, ckpt_path, raw, optimizer, scaler, aug_gen, args, rank, world, device) if ckpt else 0
    if args.compile:
        raw.encoder_q.compile()
        raw.encoder_k.compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: pick the fastest kernels once
    model = wrap_ddp(raw, device) if ddp else raw
    return raw, model, optimizer, scaler, autocast, step


def wrap_ddp(raw, device):
    """DDP over the MoCo model. The queue stays out of DDP's buffer broadcast at every forward (32 MB per step at
    K 65536): every rank enqueues the same gathered keys, so the queues stay equal without it (the DDP test checks)."""
    DDP._set_params_and_buffers_to_ignore_for_model(raw, ["queue", "queue_ptr"])
    return DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)


def load_teacher(args, device):
    if not args.teacher:
        return None
    backbone, head, _, saved = load_pretrained(args.teacher)
    if saved.get("moco_dim", 128) != args.moco_dim:
        raise SystemExit(f"the teacher {args.teacher} embeds in {saved['moco_dim']} dimensions, the student in "
                         f"{args.moco_dim}: pass --moco-dim {saved['moco_dim']}.")
    return torch.nn.Sequential(backbone, head).to(device).eval().requires_grad_(False)


def read_checkpoint(path):
    """A checkpoint this version of pretrain.py can resume (models.read_checkpoint checks the file itself)."""
    advice = "move it away or choose another --out"
    ckpt = models.read_checkpoint(path, advice)
    if not {"optimizer", "scaler", "rng", "wall_s"} <= ckpt.keys():
        raise SystemExit(f"{path} holds no training state (optimizer, RNG) to resume: {advice}.")
    if ckpt.get("version", 1) != CHECKPOINT_VERSION:
        raise SystemExit(f"{path} was written by another version of pretrain.py (checkpoint version "
                         f"{ckpt.get('version', 1)}, this one writes {CHECKPOINT_VERSION}) and cannot be resumed; the "
                         f"evaluation scripts still read it: {advice}.")
    return ckpt


def resume_args(args, saved, given):
    """The checkpoint's flags, except --max-steps (this session's stopping point) and the run-control flags given on
    the command line. Any other flag given must equal the checkpoint's; all that differ are named at once."""
    conflicts = []
    for key in [k for k in vars(args) if k in given - RUN_CONTROL and k in saved]:
        value, flag = getattr(args, key), "--" + key.replace("_", "-")
        if saved[key] != value and not (key == "img_size" and value == 0):
            conflicts.append(f"no {flag}" if value is True else f"{flag} {saved[key]}, not {value}")
    if conflicts:
        raise SystemExit(f"{args.out} holds a run trained with {'; '.join(conflicts)}: leave out these flags to "
                         f"resume it with the checkpoint's values, or choose another --out.")
    kept = (given & RUN_CONTROL) | {"out", "resume", "max_steps"}
    return argparse.Namespace(**{**vars(args), **saved, **{k: getattr(args, k) for k in kept}})


def given_flags(argv=None):
    """The flags on the command line: argparse fills in a default only where the namespace lacks the attribute, so
    parsing into one whose every attribute is a marker leaves the marker exactly where no flag was given."""
    p, unset = parser(), object()
    parsed = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(p.parse_args(argv)), unset)))
    return {key for key, value in vars(parsed).items() if value is not unset}


def restore(ckpt, path, raw, optimizer, scaler, aug_gen, args, rank, world, device):
    """Load a checkpoint into the model (already on its device, so that SGD's momentum buffers follow their
    parameters there), the optimizer and the scaler. Every random stream continues exactly when the number of
    processes and the kind of device are the checkpoint's; otherwise (a CPU and a CUDA generator's states differ in
    kind and size) each rank's streams start afresh from (seed, rank, step), so they neither fail nor repeat the first
    epoch's draws. Returns the checkpoint's step."""
    try:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"{path} does not fit this model ({str(e).splitlines()[0]}): move it away or choose "
                         f"another --out.")
    scaler.load_state_dict(ckpt["scaler"])
    step, saved = ckpt["step"], ckpt["rng"]
    if len(saved) == world and saved[rank]["aug"].shape == aug_gen.get_state().shape:
        torch.set_rng_state(saved[rank]["torch"])
        aug_gen.set_state(saved[rank]["aug"])
        if "cuda" in saved[rank] and device.type == "cuda":
            torch.cuda.set_rng_state(saved[rank]["cuda"])
        return step
    fresh = hash((args.seed, rank, step)) % 2**63  # ints and tuples of ints hash alike in every Python process
    torch.manual_seed(fresh)
    aug_gen.manual_seed(fresh)
    if rank == 0:
        print(f"resuming with {world} process(es) on {device.type} a run saved by {len(saved)} with other random "
              f"generators: the random streams (augmentation, shuffle BN) continue from fresh seeds of (--seed, rank, "
              f"step), so the run is no longer bit-identical to an uninterrupted one.")
    return step


def rng_states(aug_gen):
    """RNG states of every rank (shuffle BN, stochastic depth, augmentation), for an exact resume."""
    state = {"torch": torch.get_rng_state(), "aug": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def trim_log(path, step):
    """Keep the complete records up to the checkpoint's step: a kill between the checkpoint and the log leaves
    records after it, a partial last line, or no log at all (a new run: step 0 keeps nothing)."""
    kept = []
    if step and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if line.endswith("\n") and json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    pass  # a partial line
    with open(path, "w") as f:
        f.writelines(kept)


def interrupted(out, argv):
    """Ctrl-C's one sentence: where the last checkpoint is and the command that continues from it (under torchrun,
    a torchrun command with as many processes per node)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    launcher = ["python3"]
    if "LOCAL_WORLD_SIZE" in os.environ:
        nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
        launcher = ["torchrun", *(["--standalone"] if nodes == 1 else [f"--nnodes={nodes}", "..."]),
                    f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]
    command = shlex.join([*launcher, "pretrain.py", *argv, *([] if "--resume" in argv else ["--resume"])])
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.exists(path):
        return f"interrupted before the first checkpoint, so nothing was saved: rerun `{command}` to start again."
    step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    return f"interrupted; the last checkpoint, {path}, holds step {step}: resume with `{command}`."


if __name__ == "__main__":
    data.exit_on_unreadable_image(main)
    if dist.is_initialized():
        dist.destroy_process_group()
