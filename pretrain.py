"""Pretrain a small CNN with MoCo-v2 (Chen et al. 2020) and the softened InfoNCE of the ICME'23 paper.

    python3 pretrain.py --arch mobilenetv3_small --moco-k 4096 --out runs/mnv3s         # one process: CPU or a GPU
    python3 pretrain.py @recipes/small.args --arch resnet18 --moco-k 1024 --out runs/r18  # a recipe's flags, and more
    python3 -m torch.distributed.run --standalone --nproc_per_node=8 pretrain.py ...     # one process per GPU

The defaults are the MoCo-v2 baseline (with CIFAR's queue of 4096). recipes/*.args hold the two recipes' own flags
(@FILE reads flags from a file, # starts a comment), presets/NAME/*.args each study's others. OUT holds checkpoint.pt
(written atomically every epoch), log.jsonl and summary.json ("complete": false after a --max-steps stop); Ctrl-C
prints the command that resumes the run. Reading order: the flags; the method (lr schedule, model, one MoCo step);
the loop with its log and checkpoints; the set-up. What the loop keeps around the method (the run's folder, the
checks that stop or warn it, resuming) is in run_state.py.
"""
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import data
import run_state
from evaluation import knn_monitor, one_writer
from losses import SMOOTH_MODES, SMOOTH_SCHEDULES, contrastive_accuracy, distill_loss, smooth_eps, soft_info_nce
from models import ARCHS, MoCo, load_teacher


# the flags that say where a run's files go and how fast it runs, not what it computes: a study counts commands that
# differ only in these as equal, and a resumed run may be given other values (run_state.resume_args: these, and the
# stopping point, the kNN monitor's spacing and --amp's spelling)
RUN_CONTROL = {"out", "resume", "data_dir", "workers", "device", "compile", "knn_subset", "log_every"}


def parser():
    p = data.FlagParser(__doc__)  # @FILE reads a flag file: presets/*/*.args, recipes/*.args
    a = p.add_argument
    count, number, fraction = data.int_flag, data.float_flag, data.float_flag(0, 1)
    a("--arch", default="resnet18", choices=ARCHS, help="backbone")
    a("--small-stem", action="store_true", help="stem for 28-64 px inputs (total stride 8)")
    a("--mlp-hidden", type=count(0, 65536), default=0, help="hidden width of the projection head; 0 = feature size")
    a("--head-bn", action="store_true", help="BatchNorm on the head's hidden layer (SimCLR / MoCo v3 style)")
    a("--moco-dim", type=count(1, 65536), default=128, help="embedding size")
    a("--moco-k", type=count(1, 2**24), default=4096, help="queue size K, well below the number of images (MoCo "
                                                          "uses 65536 on ImageNet's 1.28M, 4096 on CIFAR's 50k)")
    a("--moco-m", type=fraction, default=0.999, help="key-encoder momentum")
    a("--moco-t", type=number(0, 100, low_open=True), default=0.2, help="temperature tau")
    a("--symmetric", action="store_true", help="loss L(q1, k2) + L(q2, k1)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--bn-splits", type=count(1, 4096), default=1,
                       help="split BN into this many groups of the per-process batch")
    split.add_argument("--bn-group", type=count(1, 2**20), default=0,
                       help="split BN into groups of this many images per process, whatever the number of processes "
                            "(a process holding this many or fewer is one group); the presets' way")
    a("--smooth", type=number(0, 1, high_open=True), default=0.0, help="eps of the softened InfoNCE; 0 = InfoNCE")
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
    a("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
      help="mixed precision, the loss in fp32: auto is bf16 on CUDA (fp16 with a gradient scaler where the GPU has "
           "no bf16), off on a CPU; bf16 and fp16 run on a CPU too, for testing: slower than fp32 there "
           "(docs/performance.md)")
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


# ----- the method: the learning-rate rule and schedule, the model, one MoCo step --------------------------------------

def peak_lr(args):
    """The linear scaling rule (Goyal et al.; MoCo v3): --lr is the rate for a global batch of 256 images."""
    return args.lr * args.batch_size / 256


def lr_at(step, total_steps, warmup_steps, base_lr):
    """The learning rate of optimizer step `step` (from 0): a linear warm-up to base_lr over warmup_steps, then a
    half cosine from base_lr down to 0 at total_steps (SGDR without restarts, as MoCo-v2's --cos)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


# bench.py's fp16 against fp32 on a CPU (machine A, AVX-512 without fp16 arithmetic: results/bench/amp_cpu.txt)
CPU_FP16_COST = "8 to 20 times slower than fp32"


def build(args, device):
    """The MoCo model (on the CPU until moved), its SGD optimizer, the fp16 gradient scaler (a no-op otherwise) and
    the autocast context for --amp on this device."""
    raw = MoCo(args.arch, args.small_stem, args.moco_dim, args.mlp_hidden, args.moco_k, args.bn_splits,
               args.symmetric, args.head_bn)
    optimizer = torch.optim.SGD(raw.encoder_q.parameters(), lr=peak_lr(args), momentum=0.9, weight_decay=args.wd)
    if args.amp == "auto":  # bf16 where the GPU has it, else fp16; fp32 on a CPU (docs/performance.md says why)
        cuda = device.type == "cuda"
        amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    else:
        amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if amp_dtype == torch.float16 and device.type == "cpu" and int(os.environ.get("RANK", 0)) == 0:
        print(f"--amp fp16 on a CPU runs the GPU's fp16 path (autocast and the gradient scaler) "
              f"{CPU_FP16_COST}: for testing that path; --amp auto trains in fp32 here.", file=sys.stderr)
    # fp16 alone needs the scaler: its range is too narrow for small gradients. The same object on every device:
    # it skips a step whose gradients hold an inf or NaN and halves its scale, doubles it after 2000 clean steps.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    args.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]  # what --amp means here
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    return raw, optimizer, scaler, autocast


def train_step(model, x1, x2, optimizer, scaler, autocast, args, m, eps, teacher=None):
    """One MoCo step at momentum m and smoothing eps (the optimizer holds this step's lr): query and key embeddings
    (the keys join the queue inside the model), the (softened) InfoNCE against the queue as it was before them, SGD.
    Returns the loss, the pretext accuracy (%, how often q1's positive key beats all K queue entries) and emb_std
    (SimSiam's collapse indicator: the standard deviation over the batch of q1, averaged over its dimensions; about
    1/sqrt(dim) when the embeddings spread over the sphere, 0 when they collapse to one point), as detached 0-dim
    tensors."""
    with autocast:
        # x1, x2: [B, 3, H, W], two views of the same B images; q*, k*: [B, dim], L2-normalised; queue: [dim, K]
        q1, q2, k1, k2, queue = model(x1, x2, m, both_queries=teacher is not None)
        if teacher is not None:
            with torch.no_grad():
                t1, t2 = teacher(x1).float(), teacher(x2).float()  # [B, dim]
    q1, k2 = q1.float(), k2.float()  # the loss in fp32: logits / tau over K entries need the precision
    loss = soft_info_nce(q1, k2, queue, args.moco_t, eps, args.smooth_k, args.smooth_mode)
    if args.symmetric:
        loss = loss + soft_info_nce(q2.float(), k1.float(), queue, args.moco_t, eps, args.smooth_k, args.smooth_mode)
    if teacher is not None:
        loss = loss + distill_loss(q1, t1) + distill_loss(q2.float(), t2)
    optimizer.zero_grad(set_to_none=True)
    # fp16 (the scaler is a no-op otherwise): the loss is scaled up before backward so that small gradients survive
    # fp16; step() unscales them and skips SGD (weights and momentum untouched) where any is inf or NaN, update()
    # halves the scale after a skip. As in MoCo's own code, the key encoder's momentum step and the enqueued keys of
    # this step (in the forward above) stand, and the loop counts the step and moves the lr schedule on.
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    q1 = q1.detach()
    return loss.detach(), contrastive_accuracy(q1, k2, queue), q1.std(0).mean()


# ----- the run: the training loop with its log, checkpoints and summary -----------------------------------------------

def main(argv=None):
    args = get_args(argv)
    master = int(os.environ.get("RANK", 0)) == 0  # rank 0 writes the run's folder, and holds it while it does
    try:
        with one_writer(args.out, f"--out {args.out}") if master else nullcontext():
            return run(args, argv)
    except KeyboardInterrupt:
        if master:
            print(run_state.interrupted(args.out, argv, __file__), file=sys.stderr)
        raise SystemExit(130) from None


def run(args, argv):
    """Set-up (processes, device, resume, data, model), the training loop with its log and checkpoints, the summary."""
    rank, world, device, ddp = run_state.start_processes(args)
    master = rank == 0
    args, ckpt = run_state.open_run(args, argv, master, parser, RUN_CONTROL)
    files = run_state.RunFiles(args.out, master)
    files.sessions = ckpt.get("machines", []) if ckpt else []  # where the run's earlier sessions ran
    train = training_data(args, device, world)
    torch.manual_seed(args.seed + rank)
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + rank)
    raw, model, optimizer, scaler, autocast, step = prepare_model(args, ckpt, files.ckpt_path, device, rank, world,
                                                                  ddp, aug_gen)
    wall_before = ckpt["wall_s"] if ckpt else 0.0  # seconds the steps of a resumed checkpoint took
    teacher = load_teacher(args.teacher, args.moco_dim).to(device) if args.teacher else None  # DisCo
    knn_sets = ([data.load_data(args.data, split, args.data_dir, args.knn_subset, args.seed)
                 for split in ("train", "test")] if args.knn_every and master else None)

    steps_per_epoch = len(train) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    if master:
        os.makedirs(args.out, exist_ok=True)
        run_state.trim_log(files.log_path, step)
        n_params = sum(p.numel() for p in raw.encoder_q.backbone.parameters())
        print(f"{args.arch}: {n_params:,} backbone parameters; {len(train)} images, {steps_per_epoch} steps/epoch "
              f"x {args.epochs} epochs on {world} x {device}" + (f", resuming at step {step}" if step else ""))

    def knn(epoch):  # the kNN monitor of the query backbone, logged
        top1 = knn_monitor(raw.encoder_q.backbone, *knn_sets, args.img_size, device)
        files.log({"epoch": epoch, "step": step, "knn_top1": top1})
        print(f"epoch {epoch}: kNN top-1 {top1:.2f}%")

    if step >= last_step:
        if master and not os.path.exists(files.summary_path):  # killed between the last checkpoint and the summary
            files.write_summary(args, raw, device, world, len(train), step, total_steps, wall_before,
                                ckpt["images_per_s"], step)
        if master:
            print(f"{args.out} has reached step {step} of {total_steps}; nothing to do.")
        return raw
    if step == 0 and knn_sets:
        knn(0)
    resumed_at, start_time = step, time.time()
    paused = 0.0  # seconds spent on checkpoints and kNN: they count neither towards images/s nor the ETA
    meter = run_state.Meter(device, args.batch_size * (2 if args.symmetric else 1), args.moco_k, warmup_steps)
    collapse_said = master and bool(files.logged("collapsed_at_step"))  # once per run, resumes included
    while step < last_step:
        epoch = step // steps_per_epoch
        for x1, x2 in epoch_batches(train, args, epoch, step % steps_per_epoch, rank, world, device, aug_gen):
            lr = lr_at(step, total_steps, warmup_steps, peak_lr(args))  # this step's schedules: lr and eps
            eps = smooth_eps(args.smooth, args.smooth_schedule, step, total_steps, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = train_step(model, x1, x2, optimizer, scaler, autocast, args, args.moco_m, eps, teacher)
            step += 1
            meter.add(step, stats)
            if step % args.log_every == 0 or step == last_step:
                (loss, acc, emb_std), settled, count = meter.interval()
                run_state.check_finite(loss, step, args.out)
                if master and settled and not collapse_said:
                    collapse_said = run_state.collapsed(settled[0], settled[2], args, step - count + 1, step)
                    if collapse_said:
                        files.log({"epoch": epoch, "step": step, "collapsed_at_step": step})
                speed = (step - resumed_at) * args.batch_size / (time.time() - start_time - paused)  # this session's
                # fp16: the gradient scaler's scale; each halving is a step it skipped (docs/performance.md, fp16)
                scale = {"amp_scale": scaler.get_scale()} if scaler.is_enabled() else {}
                files.log({"epoch": epoch, "step": step, "loss": loss, "acc": acc, "emb_std": emb_std, "lr": lr,
                           "eps": eps, "img_per_s": speed, **scale})
                if master:
                    print(f"epoch {epoch + 1}/{args.epochs} step {step}/{last_step} loss {loss:.4f} acc {acc:5.1f}% "
                          f"emb_std {emb_std:.3f} lr {lr:.4f} eps {eps:.3f} {speed:6.0f} img/s "
                          + (f"scale {scale['amp_scale']:g} " if scale else "")
                          + f"eta {run_state.duration((last_step - step) * args.batch_size / speed)}", flush=True)
            if step == last_step:
                break
        pause = time.time()
        (epoch_loss, epoch_acc, epoch_emb_std), epoch_steps = meter.epoch()
        run_state.check_finite(epoch_loss, step, args.out)
        if step % steps_per_epoch == 0:  # the health curve: pretext accuracy and loss averaged over the epoch
            files.log({"epoch": step // steps_per_epoch, "step": step, "epoch_loss": epoch_loss,
                       "epoch_acc": epoch_acc, "epoch_emb_std": epoch_emb_std, "epoch_steps": epoch_steps})
            if knn_sets and (step // steps_per_epoch) % args.knn_every == 0:
                knn(step // steps_per_epoch)
        run_state.check_finite_weights(raw, step, args.out)
        states = run_state.rng_states(aug_gen)  # a collective: every rank takes part
        files.save_checkpoint({"args": vars(args), "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "epoch": step // steps_per_epoch, "step": step,
                               "rng": states, "wall_s": wall_before + time.time() - start_time,
                               "images_per_s": (step - resumed_at) * args.batch_size / (pause - start_time - paused),
                               "version": run_state.CHECKPOINT_VERSION}, device, world)
        paused += time.time() - pause

    wall = time.time() - start_time
    files.write_summary(args, raw, device, world, len(train), step, total_steps, wall_before + wall,
                        (step - resumed_at) * args.batch_size / (wall - paused), resumed_at)
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


# ----- set-up: data, model --------------------------------------------------------------------------------------------

def training_data(args, device, world):
    """The pretraining images; with --aug-backend batched, in memory on the device."""
    train = data.load_data(args.data, "pretrain", args.data_dir, args.subset, args.seed)
    args.img_size = args.img_size or data.default_img_size(args.data)
    run_state.check_setup(args, len(train), world)
    args.aug_backend = data.aug_backend(train, args.aug_backend)
    if args.aug_backend == "batched":
        train.images = train.images.to(device)
    return train


def prepare_model(args, ckpt, ckpt_path, device, rank, world, ddp, aug_gen):
    """(raw MoCo model, the model to call (DDP under torchrun), optimizer, scaler, autocast, the step to start from):
    built, moved to the device, restored from ckpt when resuming, compiled with --compile."""
    raw, optimizer, scaler, autocast = build(args, device)
    raw.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    step = (run_state.restore(ckpt, ckpt_path, raw, optimizer, scaler, aug_gen, args, rank, world, device) if ckpt
            else 0)
    if args.compile:
        raw.encoder_q.compile()
        raw.encoder_k.compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: pick the fastest kernels once
    model = run_state.wrap_ddp(raw, device) if ddp else raw
    return raw, model, optimizer, scaler, autocast, step


if __name__ == "__main__":
    data.exit_on_unreadable_image(main)
    if dist.is_initialized():
        dist.destroy_process_group()
