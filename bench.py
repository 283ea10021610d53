"""Throughput of pretraining on this machine, nanoGPT-style: the real pretrain.py step, timed.

For each architecture, at one image size and stem, on in-memory images (synthetic, or a data set such as the
embedded Fashion-MNIST), the benchmark runs pretrain.train_step (two-view augmentation, query forward and backward,
key forward, loss, SGD, queue update) for --warmup untimed and --steps timed steps and prints medians of:
- images/s end to end with the `batched` backend, and the milliseconds of a step spent in augmentation, in the
  query encoder's forward-backward, and in the rest (key encoder, loss, optimizer, queue);
- the MoCo overhead: (step - augmentation - query forward-backward - SGD) / query forward-backward;
- the `torchvision` worker pipeline's images/s on the same model (--workers processes) and the batched speed-up;
- channels_last against the default memory format, bf16 and fp16 autocast (fp16 with its gradient scaler) against
  fp32 (on a CPU too: --amp auto is fp32 there, bf16 on CUDA), and on CUDA torch.compile against plain fp32;
- on a CPU, the step and the query's forward-backward with models.SmallMapConv2d's oneDNN workaround against plain
  nn.Conv2d (`workaround`, `q f+b`: how many times faster with it);
- peak memory (CUDA: allocated; CPU: the resident size of a fresh process per architecture) and forward MACs.
With --primitives, on a CPU, it also says where a step's time goes inside oneDNN, the library that runs PyTorch's
convolutions there: the implementations that took the most time, each with its pass and shape, in milliseconds per
step and as a share of the step. A `gemm` implementation among the convolutions is oneDNN's im2col fallback.

    python3 bench.py                                     # the five networks, 32 px, ImageNet stem, batch 256
    python3 bench.py --arch resnet18 --small-stem --batch-size 64 --json bench.json
    python3 bench.py --arch resnet18 --img-size 28 --primitives 12 --no-compare    # where oneDNN spends a step
    python3 bench.py --aug-only --img-size 32 224        # the augmentation backends alone

Nothing here is asserted by the tests: the figures are for reading and comparing.
"""
import argparse
import collections
import ctypes
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

import data
import models
import pretrain
from evaluation import check_json_output, pick_device
from models import ARCHS, STUDY, build_backbone


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    a = parser.add_argument
    count = data.int_flag
    a("--arch", nargs="+", default=list(STUDY), choices=ARCHS, help="networks to time")
    a("--img-size", type=data.int_flag(data.MIN_IMG_SIZE, 4096), nargs="+", default=[32],
      help="view size (--aug-only: several sizes)")
    a("--small-stem", action="store_true", help="stem for 28-64 px inputs (total stride 8)")
    a("--data", default="synthetic", help="in-memory data set the views are cut from (synthetic, fashionmnist, ...)")
    a("--data-dir", default=None, help="where --data is (see pretrain.py)")
    a("--batch-size", type=count(1, 2**20), default=256, help="images per step")
    a("--warmup", type=count(0, 10**6), default=2, help="untimed steps before each measurement")
    a("--steps", type=count(1, 10**6), default=8, help="timed steps per measurement")
    a("--aug", default="small", choices=data.AUGS, help="augmentation preset")
    a("--moco-k", type=count(1, 2**24), default=4096, help="queue size K, at least --batch-size")
    a("--mlp-hidden", type=count(0, 65536), default=512, help="hidden width of the projection head")
    a("--bn-splits", type=count(1, 4096), default=8, help="split BN groups; must divide --batch-size")
    a("--workers", type=count(0, 256), default=os.cpu_count(), help="DataLoader workers of the torchvision backend")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--no-compare", action="store_true", help="time the default configuration only (no backend or format ratios)")
    a("--primitives", type=count(0, 1000), default=0, metavar="N",
      help="CPU: the N oneDNN implementations (with pass and shape) that take the most time in a step, with "
           "models.SmallMapConv2d's workaround and without it")
    a("--aug-only", action="store_true", help="time two-view augmentation alone")
    a("--batches", type=count(1, 10**6), default=5, help="--aug-only: timed batches per measurement")
    a("--json", default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    if not args.aug_only and args.batch_size % args.bn_splits:
        raise SystemExit(f"--bn-splits {args.bn_splits} does not divide --batch-size {args.batch_size}.")
    if not args.aug_only and args.moco_k < args.batch_size:
        raise SystemExit(f"--moco-k {args.moco_k} is smaller than the {args.batch_size} keys enqueued per step; "
                         f"raise --moco-k or lower --batch-size.")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_macs(model, img_size):
    """Multiply-accumulates of one forward pass of one image, over convolutions and Linear layers (the usual
    convention of model tables: BN, activations and pooling are left out)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel_ops = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * kernel_ops
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


def train_args(args, arch, img_size, **changes):
    """pretrain.py's flags for the benchmark's configuration (long schedule: the lr stays near its peak)."""
    flags = ["--arch", arch, "--img-size", str(img_size), "--batch-size", str(args.batch_size), "--moco-k",
             str(args.moco_k), "--moco-m", "0.99", "--moco-t", "0.1", "--lr", "0.06", "--wd", "5e-4",
             "--mlp-hidden", str(args.mlp_hidden), "--head-bn", "--bn-splits", str(args.bn_splits), "--aug", args.aug,
             "--epochs", "1000"] + (["--small-stem"] if args.small_stem else [])
    return argparse.Namespace(**{**vars(pretrain.get_args(flags)), **changes})


class Timer:
    """Records the seconds of each call of named phases, synchronising CUDA at each boundary."""

    def __init__(self, device):
        self.device, self.times = device, {}

    def __call__(self, name, fn, *inputs):
        sync(self.device)
        start = time.perf_counter()
        out = fn(*inputs)
        sync(self.device)
        self.times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def medians(self, skip):
        """Median seconds per phase, leaving out the first `skip` (warm-up) calls."""
        return {name: statistics.median(t[skip:]) for name, t in self.times.items()}


def query_forward_backward(raw, x, autocast, optimizer):
    """The query encoder's forward and backward alone (a stand-in loss on its output), as in supervised training."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        q = raw.encoder_q(x)
    q.float().square().mean().backward()


@contextmanager
def true_fp32():
    """fp32 that means fp32: PyTorch lets cuDNN's convolutions round to TF32 by default, which would make the fp32
    baseline of the AMP and compile ratios a TF32 one."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@contextmanager
def onednn_workaround(on):
    """models.SmallMapConv2d's workaround on or off inside the block."""
    saved, models.ONEDNN_WORKAROUND = models.ONEDNN_WORKAROUND, on
    try:
        yield
    finally:
        models.ONEDNN_WORKAROUND = saved


@contextmanager
def onednn_verbose(log):
    """oneDNN's verbose lines (one per primitive executed, with its time) written to the file `log` inside the
    block: oneDNN prints them on the C library's stdout, so file descriptor 1 points at `log` meanwhile."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    os.dup2(log.fileno(), 1)
    try:
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def primitive_table(lines, steps, step_s, top):
    """The `top` oneDNN (primitive, implementation, pass, shape) rows by time, from its verbose `lines` over
    `steps` steps of `step_s` seconds each: [{primitive, implementation, pass, shape, calls, ms, share}], per step."""
    ms, calls = collections.Counter(), collections.Counter()
    for line in lines:
        fields = line.strip().split(",")
        # onednn_verbose,v1,primitive,exec,cpu,<primitive>,<implementation>,<pass>,<memory>,<attributes>,<aux>,
        # <shape>,<milliseconds>
        if len(fields) < 13 or fields[:4] != ["onednn_verbose", "v1", "primitive", "exec"]:
            continue
        key = (fields[5], fields[6], fields[7], fields[-2])
        ms[key] += float(fields[-1]) / steps
        calls[key] += 1
    rows = [{"primitive": p, "implementation": impl, "pass": prop, "shape": shape, "calls": calls[k] // steps,
             "ms": t, "share": t / (1e3 * step_s)} for k, t in ms.most_common(top) for p, impl, prop, shape in [k]]
    return rows, sum(ms.values())


def profile_primitives(train, targs, device, args, workaround):
    """Where args.steps training steps spend their time inside oneDNN (after args.warmup untimed ones): the
    primitive_table of the step as pretrain.py runs it, with models.SmallMapConv2d's workaround or without it."""
    raw, optimizer, scaler, autocast = pretrain.build(targs, device)
    fmt = torch.channels_last if targs.channels_last else torch.contiguous_format
    raw.to(device, memory_format=fmt)
    order = torch.randint(len(train), (args.warmup + args.steps, targs.batch_size),
                          generator=torch.Generator().manual_seed(0))
    batches = data.view_batches(train, targs.aug, targs.img_size, order, device, backend="batched",
                                gen=torch.Generator(device=device).manual_seed(0), workers=args.workers)
    step = lambda x1, x2: pretrain.train_step(raw, x1.contiguous(memory_format=fmt),  # noqa: E731
                                              x2.contiguous(memory_format=fmt), optimizer, scaler, autocast, targs,
                                              targs.moco_m, targs.smooth)
    with onednn_workaround(workaround), tempfile.TemporaryFile("w+") as log:
        for _ in range(args.warmup):
            step(*next(batches)[:2])
        seconds = 0.0
        for _ in range(args.steps):
            x1, x2, _ = next(batches)
            with onednn_verbose(log):
                start = time.perf_counter()
                step(x1, x2)
                seconds += time.perf_counter() - start
        log.seek(0)
        rows, onednn_ms = primitive_table(log, args.steps, seconds / args.steps, args.primitives)
    return {"step_ms": 1e3 * seconds / args.steps, "onednn_ms": onednn_ms, "workaround": workaround, "rows": rows}


def run_steps(train, targs, device, args, backend, parts=False):
    """Median seconds per phase over args.steps timed steps of pretrain.train_step, after args.warmup untimed ones.
    With parts=True each step is followed, on the same batch, by the query encoder's forward-backward alone and by
    an SGD step alone: timed in the same loop, so that a drifting machine affects the step and its parts alike."""
    raw, optimizer, scaler, autocast = pretrain.build(targs, device)  # the optimizer at the peak lr
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as pretrain.py: fixed shapes, the fastest kernels
    fmt = torch.channels_last if targs.channels_last else torch.contiguous_format
    raw.to(device, memory_format=fmt)
    if targs.compile:
        raw.encoder_q.compile()
        raw.encoder_k.compile()
    total = args.warmup + args.steps
    gen = torch.Generator(device=device).manual_seed(0)
    order = torch.randint(len(train), (total, targs.batch_size), generator=torch.Generator().manual_seed(0))
    batches = data.view_batches(train, targs.aug, targs.img_size, order, device, backend=backend, gen=gen,
                                workers=args.workers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = Timer(device)
    for i in range(total):
        x1, x2, _ = timer("augment", next, batches)
        x1, x2 = x1.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt)
        timer("step", pretrain.train_step, raw, x1, x2, optimizer, scaler, autocast, targs, targs.moco_m,
              targs.smooth)
        if parts:
            timer("query_fwd_bwd", query_forward_backward, raw, x1, autocast, optimizer)
            timer("sgd", optimizer.step)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return timer.medians(args.warmup), peak


def bench_arch(args, arch, img_size, device):
    """Every figure of one architecture, as a dict."""
    torch.manual_seed(0)
    if args.data == "synthetic":
        images, labels = data.synthetic_data("train", max(2 * args.batch_size, 512), size=img_size)
        train = data.ImageData("synthetic", images, None, labels, 10, *data.STATS["synthetic"])
    else:
        train = data.load_data(args.data, "pretrain", args.data_dir)
        if train.images is None:
            raise SystemExit(f"bench.py needs an in-memory data set, and {args.data} is read from image files.")
    channels_last = True  # the default the figures are reported for: worth 3-4x for depthwise networks on a CPU
    targs = train_args(args, arch, img_size, channels_last=channels_last, amp="auto", compile=False)
    backbone = build_backbone(arch, args.small_stem)[0]
    row = {"arch": arch, "img_size": img_size, "small_stem": args.small_stem, "batch_size": args.batch_size,
           "device": device_name(device), "threads": torch.get_num_threads(),
           "backbone_params": sum(p.numel() for p in backbone.parameters()),
           "forward_mmacs": count_macs(backbone, img_size) / 1e6}
    del backbone

    phases, peak = run_steps(train, targs, device, args, "batched", parts=True)
    step_s = phases["augment"] + phases["step"]
    fwd_bwd, sgd = phases["query_fwd_bwd"], phases["sgd"]
    row.update(images_per_s=args.batch_size / step_s, step_ms=1e3 * step_s, augment_ms=1e3 * phases["augment"],
               query_fwd_bwd_ms=1e3 * fwd_bwd, rest_ms=1e3 * (phases["step"] - fwd_bwd),
               moco_overhead=(phases["step"] - fwd_bwd - sgd) / fwd_bwd)
    if device.type == "cuda":
        row["peak_memory_mb"] = peak
    if not args.no_compare:
        # the default (--amp auto) is bf16 on CUDA and fp32 on a CPU: the other one is timed beside it, and fp16
        # with its gradient scaler (a GPU without bf16 runs it; a CPU only to test that path)
        other = ("fp32", {"amp": "off"}) if device.type == "cuda" else ("bf16", {"amp": "bf16"})
        variants = {"torchvision": ("torchvision", {}), "default_format": ("batched", {"channels_last": False}),
                    other[0]: ("batched", other[1]), "fp16": ("batched", {"amp": "fp16"})}
        if device.type == "cuda":  # torch.compile: nothing gained on a CPU (docs/performance.md)
            variants["bf16_compile"] = ("batched", {"compile": True})
        for name, (backend, changes) in variants.items():
            with true_fp32() if name == "fp32" else nullcontext():
                phases = run_steps(train, argparse.Namespace(**{**vars(targs), **changes}), device, args, backend)[0]
            row[f"{name}_images_per_s"] = args.batch_size / (phases["augment"] + phases["step"])
        if device.type == "cpu":  # the same step with plain nn.Conv2d, and its query forward-backward
            with onednn_workaround(False):
                phases = run_steps(train, targs, device, args, "batched", parts=True)[0]
            row["plain_conv_images_per_s"] = args.batch_size / (phases["augment"] + phases["step"])
            row["plain_conv_query_fwd_bwd_ms"] = 1e3 * phases["query_fwd_bwd"]
            row["workaround_speedup"] = row["images_per_s"] / row["plain_conv_images_per_s"]
            row["workaround_query_speedup"] = row["plain_conv_query_fwd_bwd_ms"] / row["query_fwd_bwd_ms"]
        row[f"{'bf16' if device.type == 'cuda' else 'fp32'}_images_per_s"] = row["images_per_s"]
        row["batched_over_torchvision"] = row["images_per_s"] / row["torchvision_images_per_s"]
        row["channels_last_speedup"] = row["images_per_s"] / row["default_format_images_per_s"]
        row["bf16_over_fp32"] = row["bf16_images_per_s"] / row["fp32_images_per_s"]
        row["fp16_over_fp32"] = row["fp16_images_per_s"] / row["fp32_images_per_s"]
        if device.type == "cuda":
            row["compile_over_fp32"] = row["bf16_compile_images_per_s"] / row["fp32_images_per_s"]
    if device.type != "cuda":
        row["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.primitives and device.type == "cpu":
        row["primitives"] = [profile_primitives(train, targs, device, args, on) for on in (False, True)]
    return row


def _child(queue, args, arch, img_size, device):
    try:
        queue.put(bench_arch(args, arch, img_size, device))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        queue.put(f"{type(e).__name__}: {e}")


def in_fresh_process(args, arch, img_size, device):
    """bench_arch in a new process, so that the peak memory is this architecture's alone and torch.compile starts
    with empty caches: in one process, the fifth network's encoders pass the recompile limit (8) and silently run
    eager, so its compile ratio would be wrong."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, args, arch, img_size, device))
    proc.start()
    result = queue.get()
    proc.join()
    if isinstance(result, str):
        raise SystemExit(f"{arch}: {result}")
    return result


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def print_table(rows):
    cols = [("arch", "{:<18}", "arch"), ("images_per_s", "{:>8.0f}", "img/s"), ("step_ms", "{:>8.1f}", "step ms"),
            ("augment_ms", "{:>7.1f}", "aug ms"), ("query_fwd_bwd_ms", "{:>8.1f}", "q f+b ms"),
            ("rest_ms", "{:>8.1f}", "rest ms"), ("moco_overhead", "{:>8.0%}", "MoCo +"),
            ("torchvision_images_per_s", "{:>8.0f}", "tv img/s"), ("batched_over_torchvision", "{:>7.2f}x", "batched"),
            ("channels_last_speedup", "{:>7.2f}x", "ch_last"), ("bf16_over_fp32", "{:>7.2f}x", "bf16"),
            ("fp16_over_fp32", "{:>7.2f}x", "fp16"), ("compile_over_fp32", "{:>7.2f}x", "compile"),
            ("plain_conv_images_per_s", "{:>8.0f}", "nn img/s"), ("workaround_speedup", "{:>8.2f}x", "workarnd"),
            ("workaround_query_speedup", "{:>7.2f}x", "q f+b"), ("peak_memory_mb", "{:>8.0f}", "peak MB"),
            ("forward_mmacs", "{:>8.1f}", "MMACs")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    print("  ".join(f"{title:>{len(fmt.format(0)) if key != 'arch' else 18}}" if key != "arch" else f"{title:<18}"
                    for key, fmt, title in cols))
    for r in rows:
        print("  ".join(fmt.format(r[key]) if key in r else " " * len(fmt.format(0)) for key, fmt, _ in cols))
    for r in rows:
        for profile in r.get("primitives", []):
            print_primitives(r, profile)


def print_primitives(row, p):
    print(f"\n{row['arch']} at {row['img_size']} px, {'with' if p['workaround'] else 'without'} the oneDNN "
          f"workaround: a step of {p['step_ms']:.0f} ms under oneDNN's verbose mode, {p['onednn_ms']:.0f} ms of it "
          f"in oneDNN ({p['onednn_ms'] / p['step_ms']:.0%}); the {len(p['rows'])} implementations taking the most:")
    print(f"{'ms/step':>8} {'share':>6} {'calls':>5}  {'primitive':<12} {'implementation':<44} {'pass':<17} shape")
    for r in p["rows"]:
        print(f"{r['ms']:>8.1f} {r['share']:>6.1%} {r['calls']:>5}  {r['primitive']:<12} {r['implementation']:<44} "
              f"{r['pass']:<17} {r['shape']}")


# --- augmentation alone (--aug-only) ---

def timed(batches, step, device):
    """Seconds per call of step(), after one warm-up call."""
    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    sync(device)
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
    rows = []
    print(f"two-view augmentation ({args.aug}), batch {args.batch_size}, {args.batches} timed batches; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device_name(device)}")
    print(f"{'px':>5}  {'backend':<12} {'device':<8} {'images/s':>9}  {'views/s':>9}")
    for size in args.img_size:
        images = data.synthetic_data("train", args.batch_size, size=size)[0]
        for backend, where, rate in (
                ("torchvision", f"{args.workers} wkr", lambda: torchvision_rate(images, args, size)),
                ("batched", device.type, lambda: batched_rate(images, args, size, device))):
            rate = rate()
            rows.append({"img_size": size, "backend": backend, "device": device_name(device), "images_per_s": rate})
            print(f"{size:>5}  {backend:<12} {where:<8} {rate:>9.0f}  {2 * rate:>9.0f}", flush=True)
    return rows


def main(argv=None):
    args = get_args(argv)
    if args.json:
        check_json_output(args.json)
    device = pick_device(args.device)
    if args.aug_only:
        rows = bench_aug(args, device)
    else:
        print(f"MoCo training step: {args.aug} views, batch {args.batch_size}, K {args.moco_k}, split BN "
              f"{args.bn_splits}, {'small' if args.small_stem else 'ImageNet'} stem, channels_last, "
              f"{args.warmup} + {args.steps} steps; torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{device_name(device)}", flush=True)
        rows = []
        for img_size in args.img_size:
            for arch in args.arch:
                rows.append(in_fresh_process(args, arch, img_size, device))
                print(f"  {arch} at {img_size} px: {rows[-1]['images_per_s']:.0f} img/s", flush=True)
        print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
