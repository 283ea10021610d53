"""A pretraining run's state outside the method: its folder (log.jsonl, checkpoint.pt, summary.json), the numbers it
logs, the checks that stop or warn a run that went wrong (flags that do not fit together, a NaN, a collapse), its
processes (DDP under torchrun), resuming (the checkpoint's flags, weights and random streams) and the Ctrl-C
sentence. pretrain.py holds the method and the loop; this module holds what a reader of the method can skip.
"""
import argparse
import json
import math
import os
import resource
import shlex
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import models
from evaluation import checkpoint_step, machine, pick_device, save_atomic, writable_dir, write_json

# 2: --lr is a rate per 256 images (version 1 stored the peak rate itself); resuming needs the same version
CHECKPOINT_VERSION = 2
# beyond pretrain.RUN_CONTROL, the flags a resumed run may be given other values of: where this session stops, the
# kNN monitor's spacing, and --amp in another spelling of the checkpoint's precision (restore checks it)
RESUMABLE = {"max_steps", "knn_every", "amp"}


# ----- the run's folder -----------------------------------------------------------------------------------------------

class RunFiles:
    """What rank 0 writes to --out: log.jsonl (one JSON record per line), checkpoint.pt and summary.json. Other
    ranks write nothing."""

    def __init__(self, out, master):
        self.master = master
        self.log_path, self.ckpt_path = os.path.join(out, "log.jsonl"), os.path.join(out, "checkpoint.pt")
        self.summary_path = os.path.join(out, "summary.json")
        self.started = time.time()  # this session's start: summary.json's machine record
        self.sessions = []  # the machine records of the sessions before this one (a resumed run's checkpoint)

    def log(self, record):
        if self.master:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def logged(self, key):
        with open(self.log_path) as f:
            return [r[key] for r in map(json.loads, f) if key in r]

    def save_checkpoint(self, state, device, world):
        """checkpoint.pt, with the machine records of every session of the run so far."""
        if self.master:
            save_atomic({**state, "machines": self.sessions + [machine(self.started, device, world)]}, self.ckpt_path)

    def write_summary(self, args, raw, device, world, n_images, step, total_steps, wall_s, images_per_s, resumed_at):
        """summary.json; the last kNN monitor and emb_std, and the step where the run looked collapsed (None if it
        never did), are read from the log; "machine" (evaluation.machine) is where this session ran, from its start
        (a resumed run: resumed_at_step) until now, and "machines" where every session of the run did, in order."""
        if not self.master:
            return
        here = machine(self.started, device, world)
        peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        write_json({"arch": args.arch, "backbone_params": sum(p.numel() for p in raw.encoder_q.backbone.parameters()),
                    "epochs": step * args.epochs / total_steps, "steps": step, "n_images": n_images,
                    "images_per_s": images_per_s, "peak_memory_mb": peak_mb, "wall_s": wall_s,
                    "resumed_at_step": resumed_at, "knn_top1": last(self.logged("knn_top1")),
                    "emb_std": last(self.logged("emb_std")), "amp_scale": last(self.logged("amp_scale")),
                    "collapsed_at_step": last(self.logged("collapsed_at_step")), "world_size": world,
                    "device": str(device), "machine": here, "machines": self.sessions + [here], "args": vars(args),
                    "complete": step == total_steps},  # False after --max-steps: run_all.sh resumes it
                   self.summary_path)


def last(values):
    return values[-1] if values else None


def duration(seconds):
    """H:MM:SS, with days in front past 24 h: 1d 01:18:36."""
    days, rest = divmod(round(seconds), 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"


# ----- a run's numbers, summed on the device and read once per logging interval ---------------------------------------

class Meter:
    """Each step's (loss, pretext accuracy, emb_std), summed where they were computed (no host synchronisation per
    step) over the logging interval, over the epoch, and over the interval's settled steps: those whose queue held
    only the network's own keys (before that, its random start vectors make a collapse look healthy) and whose lr
    had finished its warm-up (during it, a run that learns can keep its loss near ln(K+1) while the lr is small, as
    the demo24 preset's 4-epoch warm-up did: results/demo24). Means are over every process."""

    def __init__(self, device, keys_per_step, queue_size, warmup_steps=0):
        self.sums = torch.zeros(3, 3, device=device)  # rows: interval, epoch, settled
        self.steps = [0, 0, 0]
        self.keys_per_step, self.queue_size, self.warmup_steps = keys_per_step, queue_size, warmup_steps

    def add(self, step, stats):
        """Step `step`'s (loss, acc, emb_std) tensors (step counts from 1)."""
        settled = (step - 1) * self.keys_per_step >= self.queue_size and step > self.warmup_steps
        rows = 3 if settled else 2
        self.sums[:rows] += torch.stack(stats)
        for row in range(rows):
            self.steps[row] += 1

    def interval(self):
        """(mean loss, acc, emb_std of the interval; of its settled steps, or None; how many were settled); starts
        the next interval."""
        means = mean_over_ranks(self.sums[0], self.steps[0])
        settled = mean_over_ranks(self.sums[2], self.steps[2]) if self.steps[2] else None
        count = self.steps[2]
        self.sums[0::2] = 0
        self.steps[0] = self.steps[2] = 0
        return means, settled, count

    def epoch(self):
        """(the epoch's mean loss, acc, emb_std; its steps in this session); starts the next epoch and interval."""
        means, count = mean_over_ranks(self.sums[1], max(1, self.steps[1])), self.steps[1]
        self.sums.zero_()
        self.steps = [0, 0, 0]
        return means, count


def mean_over_ranks(sums, count):
    """sums / count averaged over every process: the same numbers on every rank, so that a decision taken on them
    (stop on a NaN) is taken by all ranks together instead of leaving the others waiting in the next collective."""
    if dist.is_initialized():
        sums = sums.clone()
        dist.all_reduce(sums)
        count *= dist.get_world_size()
    return (sums / count).tolist()


# ----- checks: flags that do not fit, a NaN, a collapse ---------------------------------------------------------------

def bn_splits(batch_size, world, bn_group):
    """--bn-group's number of split-BN groups per process: the per-process batch in groups of bn_group images, one
    group where a process holds bn_group images or fewer."""
    per = batch_size // world
    return per // bn_group if per > bn_group else 1


def check_setup(args, num_images, world):
    if args.bn_group:  # the groups for this number of processes (a resume with another number included)
        if args.batch_size // world > args.bn_group and (args.batch_size // world) % args.bn_group:
            raise SystemExit(f"--bn-group {args.bn_group} does not divide the per-process batch of "
                             f"{args.batch_size // world}.")
        args.bn_splits = bn_splits(args.batch_size, world, args.bn_group)
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


# A run has collapsed when its queries no longer spread (emb_std x sqrt(dim) below COLLAPSED_SPREAD; about 1 when they
# spread evenly over the sphere) or when its loss sits within LOSS_AT_UNIFORM of ln(K+1), its value when every logit is
# equal. Where the lines come from: docs/training-health.md (tools/probe_collapse.sh).
COLLAPSED_SPREAD, LOSS_AT_UNIFORM = 0.1, 0.1


def collapsed(loss, emb_std, args, first, step):
    """True, with one warning in words, when the mean loss and emb_std of steps first..step look collapsed: SimSiam's
    standard deviation of the embeddings near 0, or InfoNCE's loss stuck at ln(K+1)."""
    uniform = (2 if args.symmetric else 1) * math.log(args.moco_k + 1)
    signs = []
    if emb_std * math.sqrt(args.moco_dim) < COLLAPSED_SPREAD:
        signs.append(f"the queries' emb_std is {emb_std:.4f}, near 0 (about {1 / math.sqrt(args.moco_dim):.3f} when "
                     f"they spread)")
    if not args.teacher and loss > uniform - LOSS_AT_UNIFORM:
        signs.append(f"the loss {loss:.3f} is at or above {'2 ' if args.symmetric else ''}ln(K+1) = {uniform:.3f}, "
                     f"its value when every logit is equal: the positive is not told apart from the queue")
    if signs:
        slow_keys = (f"too few steps for a key momentum of {args.moco_m:g} (the key encoder is still close to its "
                     f"random start; short runs use --moco-m 0.99), " if args.moco_m > 0.99 else "")
        print(f"warning: the run looks collapsed at step {step}: over steps {first}-{step}, {'; '.join(signs)}. Its "
              f"features are unlikely to be worth evaluating. Likely causes: {slow_keys}a learning rate too high for "
              f"the batch (lower --lr), a projection head without BN at a small budget (--head-bn), BN groups too "
              f"small for shuffle BN (fewer --bn-splits), or too few steps for this network to learn at all.",
              file=sys.stderr)
    return bool(signs)


# ----- the processes of a run: one, or one per GPU under torchrun -----------------------------------------------------

def start_processes(args):
    """(rank, world size, device, ddp): one process per GPU under torchrun (gloo on CPUs), else this one process."""
    if "RANK" not in os.environ:  # not started by torchrun
        return 0, 1, pick_device(args.device), False
    use_cuda = pick_device(args.device).type == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent serves one store for all its restarts: keys of their own for this attempt, or a restarted
        # worker reads a dead worker's address from the first attempt and fails (gloo: connectFullMesh, Connection
        # refused). docs/install.md, "torchrun restarts"; tests/test_pretrain.py kills a worker to check.
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
        store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group(backend)
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, True


def wrap_ddp(raw, device):
    """DDP over the MoCo model. The queue stays out of DDP's buffer broadcast at every forward (32 MB per step at
    K 65536): every rank enqueues the same gathered keys, so the queues stay equal without it (the DDP test checks)."""
    DDP._set_params_and_buffers_to_ignore_for_model(raw, ["queue", "queue_ptr"])
    return DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)


# ----- starting and resuming a run ------------------------------------------------------------------------------------

def open_run(args, argv, master, parser, run_control):
    """(args, checkpoint or None): a new run directory, or with --resume the checkpoint in it and its flags (those
    of `run_control` and RESUMABLE as given)."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out} is a file, not a run directory: choose another --out.")
    writable_dir(args.out, "--out")
    path = os.path.join(args.out, "checkpoint.pt")
    ckpt = None
    if os.path.exists(path):
        if not args.resume:
            raise SystemExit(f"{path} already exists: pass --resume to continue that run, or choose another --out.")
        ckpt = read_checkpoint(path)
        args = resume_args(args, ckpt["args"], data.given_flags(parser(), argv), run_control | RESUMABLE)
    if master and os.path.exists(path + ".tmp"):
        os.remove(path + ".tmp")  # a save that was killed: the checkpoint itself is the one before it
    return args, ckpt


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


def resume_args(args, saved, given, may_change):
    """The checkpoint's flags, except those of `may_change` given on the command line (--max-steps, this session's
    stopping point, whether given or not). Any other flag given must equal the checkpoint's; all that differ are
    named at once."""
    conflicts = []
    for key in [k for k in vars(args) if k in given - may_change and k in saved]:
        value, flag = getattr(args, key), "--" + key.replace("_", "-")
        if saved[key] != value and not (key == "img_size" and value == 0):
            conflicts.append(f"no {flag}" if value is True else f"{flag} {saved[key]}, not {value}")
    if conflicts:
        raise SystemExit(f"{args.out} holds a run trained with {'; '.join(conflicts)}: leave out these flags to "
                         f"resume it with the checkpoint's values, or choose another --out.")
    kept = (given & may_change) | {"out", "resume", "max_steps"}
    return argparse.Namespace(**{**vars(args), **saved, **{k: getattr(args, k) for k in kept}})


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
    saved_amp = ckpt["args"].get("amp")  # checkpoints from before "precision": off, bf16 and fp16 say it, auto not
    trained_in = ckpt["args"].get("precision") or {"off": "fp32"}.get(saved_amp, saved_amp)
    if trained_in in ("fp32", "bf16", "fp16") and trained_in != args.precision:
        raise SystemExit(f"{path} was trained in {trained_in} and --amp {args.amp} means {args.precision} on "
                         f"{device.type}: resume it with --amp {'off' if trained_in == 'fp32' else trained_in}, or "
                         f"choose another --out.")
    scaler.load_state_dict(ckpt["scaler"])  # fp16: the scale and the count of clean steps since it last changed
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


def saved_step(out):
    """The step of the checkpoint in run folder `out`, or None without one."""
    path = os.path.join(out, "checkpoint.pt")
    return checkpoint_step(path) if os.path.exists(path) else None


def interrupted(out, argv, script):
    """Ctrl-C's one sentence: where the last checkpoint is and the command that continues from it, started by the
    Python that is running (a bare python3 may lack torch); under torchrun, through torch.distributed.run with as
    many processes per node."""
    argv = sys.argv[1:] if argv is None else list(argv)
    launcher = [data.interpreter()]
    if "LOCAL_WORLD_SIZE" in os.environ:
        nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
        launcher += ["-m", "torch.distributed.run", *(["--standalone"] if nodes == 1 else [f"--nnodes={nodes}", "..."]),
                     f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]
    script = os.path.relpath(os.path.abspath(script))  # from the working directory, as the interpreter's path
    command = shlex.join([*launcher, script, *argv, *([] if "--resume" in argv else ["--resume"])])
    step = saved_step(out)
    if step is None:
        return f"interrupted before the first checkpoint, so nothing was saved: rerun `{command}` to start again."
    return (f"interrupted; the last checkpoint, {os.path.join(out, 'checkpoint.pt')}, holds step {step}: resume "
            f"with `{command}`.")
