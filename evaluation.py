"""What the evaluation scripts (knn_eval.py, linear_eval.py) and pretrain.py's kNN monitor share: the network to
evaluate (a checkpoint's encoder, or an untrained one) and its flags, features under the evaluation transform, the
weighted kNN (Wu et al. 2018, InstDisc), the results files every script writes and the record of the machine each
was made on.
"""
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import data
import models
from data import DATASETS, default_img_size, eval_loader


# ----- the network to evaluate and its data ---------------------------------------------------------------------------

# of the flags below, those that say where things are and how fast they run, not what is computed (each script's
# RUN_CONTROL adds its own)
MODEL_RUN_CONTROL = {"ckpt", "data_dir", "workers", "device"}


def add_model_flags(p):
    a = p.add_argument
    count = data.int_flag
    a("--ckpt", help="checkpoint.pt written by pretrain.py")
    a("--arch", choices=models.ARCHS, help="with --random-init: the untrained baseline; with --ckpt: must match it")
    a("--random-init", action="store_true", help="evaluate an untrained backbone, initialised with --seed")
    a("--pixels", action="store_true", help="evaluate the pixels themselves (the evaluation transform's output, "
                                            "flattened): the raw-pixel reference")
    a("--encoder", default="query", choices=("query", "key"), help="the checkpoint's query or momentum encoder")
    a("--precise-bn", "--reestimate-bn", action="store_true",
      help="first set the BN running statistics to those of the training images under the evaluation transform "
           "(precise BN; with --random-init: the 'BN of data' reference); no weight changes")
    a("--small-stem", action="store_true", help="stem for 28-64 px inputs; read from the checkpoint")
    a("--data", choices=DATASETS, help="default: the checkpoint's (another one is a transfer evaluation), else "
                                       "fashionmnist")
    a("--data-dir", default=None, help="default: the checkpoint's")
    a("--subset", default=None, help="training images used, 'N' or 'N/class'; default: the checkpoint's")
    a("--test-subset", default=None, help="test images used, 'N' or 'N/class'; default: all")
    a("--img-size", type=data.img_size_flag, default=0, help="0 = the checkpoint's, else the data set's native "
                                                             "size")
    a("--seed", type=count(0, 2**32 - 1), default=None, help="subset draws and random init; default: the "
                                                             "checkpoint's, else 0")
    a("--batch-size", type=count(1, 2**20), default=256, help="images per forward pass")
    a("--workers", type=count(0, 256), default=0, help="DataLoader workers (image-file data sets)")
    a("--channels-last", action="store_true", help="channels-last memory format (MobileNet/EfficientNet on a CPU: "
                                                   "several times faster)")
    a("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")


def load_model(args):
    """(backbone, head or None, feat_dim) named by --ckpt, --arch --random-init or --pixels, on the CPU in eval mode.
    Fills the unset flags from the checkpoint's args; a flag contradicting them is an error."""
    if sum((bool(args.ckpt), args.random_init, args.pixels)) != 1:
        raise SystemExit("pass either --ckpt CHECKPOINT, or --arch NAME --random-init (the untrained baseline), or "
                         "--pixels (the raw-pixel reference).")
    if not args.ckpt:
        if args.random_init and args.arch is None:
            raise SystemExit("--random-init needs --arch NAME: the architecture to initialise.")
        if args.pixels and (args.arch or args.small_stem or args.precise_bn):
            raise SystemExit("--pixels evaluates the images themselves: drop --arch, --small-stem and --precise-bn.")
        if args.encoder != "query":
            raise SystemExit("--encoder key needs a --ckpt: a random initialisation or the pixels have a single "
                             "encoder.")
        args.data, args.pretrain_data = args.data or "fashionmnist", None
        args.ckpt_step = args.ckpt_sha256 = None
        args.seed = 0 if args.seed is None else args.seed
        args.img_size = args.img_size or default_img_size(args.data)
        if args.pixels:
            args.arch = "pixels"
            return torch.nn.Flatten().eval(), None, 3 * args.img_size ** 2
        torch.manual_seed(args.seed)
        backbone, dim = models.build_backbone(args.arch, args.small_stem)
        return backbone.eval(), None, dim
    backbone, head, dim, saved = models.load_pretrained(args.ckpt, args.encoder)
    args.ckpt_step, args.ckpt_sha256 = checkpoint_identity(args.ckpt)
    stored_size = saved.get("img_size") or 0
    for conflict, trained in ((args.arch not in (None, saved["arch"]), f"--arch {saved['arch']}"),
                              (args.small_stem and not saved.get("small_stem"), "the standard stem"),
                              (args.img_size and stored_size and args.img_size != stored_size,
                               f"--img-size {stored_size}")):
        if conflict:
            raise SystemExit(f"{args.ckpt} was trained with {trained}: drop the contradicting flag, the checkpoint's "
                             f"setting is used.")
    args.arch, args.small_stem = saved["arch"], bool(saved.get("small_stem"))
    args.pretrain_data = saved.get("data")
    args.data = args.data or args.pretrain_data or "fashionmnist"
    same_data = args.data == args.pretrain_data
    args.data_dir = args.data_dir or (saved.get("data_dir") if same_data else None)
    args.subset = args.subset or (saved.get("subset") if same_data else None)
    args.seed = saved.get("seed", 0) if args.seed is None else args.seed
    args.img_size = args.img_size or stored_size or default_img_size(args.data)
    if not same_data:
        print(f"transfer evaluation: {args.ckpt} was pretrained on {args.pretrain_data}, evaluated on {args.data}")
    return backbone, head, dim


def checkpoint_identity(path):
    """(step, SHA-256 of the file's bytes): written into every result, so that a result outlives neither the
    checkpoint it measured nor a new pretraining in the same folder (study.py redoes it on a mismatch)."""
    return checkpoint_step(path), file_sha256(path)


def checkpoint_step(path):
    """The step a checkpoint holds, read with its tensors memory-mapped (not read): cheap for any size."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def settings(args, device, dim, num_classes):
    return {"arch": args.arch, "ckpt": args.ckpt, "ckpt_step": args.ckpt_step, "ckpt_sha256": args.ckpt_sha256,
            "random_init": args.random_init, "pixels": args.pixels, "encoder": args.encoder,
            "small_stem": args.small_stem, "img_size": args.img_size, "data": args.data,
            "pretrain_data": args.pretrain_data, "subset": args.subset, "test_subset": args.test_subset,
            "seed": args.seed, "feat_dim": dim, "num_classes": num_classes, "device": str(device),
            "precise_bn": args.precise_bn, "bn_initial_fraction": args.bn_initial_fraction}


# ----- features and the weighted kNN ----------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(model, data, img_size, batch_size=256, device="cpu", workers=0):
    """(features float32 [N, d] on the CPU, labels [N]) of every image under the evaluation transform, in data-set
    order. The model runs in eval mode; every submodule's train/eval mode is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    feats, labels = [], []
    try:
        for x, y in eval_loader(data, img_size, batch_size, workers, device):
            feats.append(model(x).float().cpu())
            labels.append(y.cpu())
    finally:
        for m, mode in modes.items():
            m.training = mode
    return torch.cat(feats), torch.cat(labels)


def nearest(sim, k):
    """(values, indices) of the k largest entries of each row, largest first; equal values rank the lower column
    first. torch.topk leaves the order of equal values unspecified, so rows with ties are re-ranked by a stable sort."""
    values, idx = sim.topk(k, dim=1)
    tied = ((sim >= values[:, -1:]).sum(1) > k) | (values[:, 1:] == values[:, :-1]).any(1)
    if tied.any():
        v, i = sim[tied].sort(dim=1, descending=True, stable=True)
        values[tied], idx[tied] = v[:, :k], i[:, :k]
    return values, idx


def knn_predict(query, bank, bank_labels, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted-kNN class scores [Nq, C] (InstDisc): each of a query's k most similar bank entries (cosine similarity,
    inputs L2-normalised; k clamped to the bank size) votes for its class with weight exp(sim / t). Only `chunk`
    rows of the similarity matrix exist at a time."""
    k = min(k, len(bank))
    scores = []
    for q in query.split(chunk):
        sim, idx = nearest(q @ bank.T, k)
        votes = torch.zeros(len(q), num_classes, device=q.device, dtype=sim.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[idx], (sim / t).exp()))
    return torch.cat(scores)


def topk_accuracy(scores, labels):
    """(top-1 %, top-5 %), top-5 None with 5 classes or fewer; equal scores rank the lower class index first."""
    ranked = scores.argsort(dim=1, descending=True, stable=True)[:, :5]
    hit = ranked == labels.view(-1, 1)
    top5 = 100 * hit.any(1).sum().item() / len(labels) if scores.shape[1] > 5 else None
    return 100 * hit[:, 0].sum().item() / len(labels), top5


# ----- BN running statistics: what is left of their initial values, and precise BN -----------------------------------

# A checkpoint whose BN running statistics still hold more than this fraction of their initial values (mean 0,
# variance 1) is evaluated with statistics that are not its data's: the evaluation scripts say so.
STALE_BN = 0.1


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def bn_initial_fraction(model):
    """(fraction, updates, momentum) of the BN layer whose running statistics hold the most of their initial values
    (mean 0, variance 1): after n updates of an exponential average with momentum m, (1 - m)^n; a cumulative average
    (momentum None) holds none once updated. None for a model without BN (raw pixels)."""
    layers = [((1 - m.momentum) ** n if m.momentum is not None else float(n == 0), n, m.momentum)
              for m in batch_norms(model) for n in [int(m.num_batches_tracked)]]
    return max(layers, key=lambda layer: layer[0], default=None)


@torch.no_grad()
def precise_bn(model, data, img_size, batch_size=256, device="cpu", workers=0):
    """Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): every BN layer's running statistics set to
    the average of its batch statistics over data's images under the evaluation transform, the rest of the network
    in eval mode (EfficientNet's stochastic depth off); no weight changes. Returns the model in eval mode."""
    norms = batch_norms(model)
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    for x, _ in eval_loader(data, img_size, batch_size, workers, device):
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def evaluated_bn(args, model, train, device):
    """The BN statistics an evaluation uses: with --precise-bn, those of the training images; otherwise the model's
    own, and one warning line when a checkpoint's are still mostly their initial values (a run of a few steps, or a
    BN momentum of 0.01 as MobileNetV3's: its features are then not the trained network's). Records the checkpoint's
    own fraction in args.bn_initial_fraction."""
    stale = bn_initial_fraction(model)
    args.bn_initial_fraction = None if stale is None else stale[0]
    if args.precise_bn:
        precise_bn(model, train, args.img_size, args.batch_size, device, args.workers)
    elif args.ckpt and stale and stale[0] > STALE_BN:
        fraction, updates, momentum = stale
        print(f"warning: the BN running statistics of {args.ckpt} still hold {fraction:.0%} of their initial values "
              f"(mean 0, variance 1) after {updates} updates at momentum {momentum:g}, so these features are not the "
              f"trained network's (a short run can evaluate near chance): add --precise-bn to re-estimate them on "
              f"the training images.", file=sys.stderr)


def knn_monitor(backbone, train_data, test_data, img_size, device, k=200, t=0.1):
    """Weighted-kNN top-1 % of test_data against a bank of train_data (pretrain.py's monitor)."""
    bank, bank_labels = extract_features(backbone, train_data, img_size, device=device)
    query, labels = extract_features(backbone, test_data, img_size, device=device)
    scores = knn_predict(F.normalize(query.to(device), dim=1), F.normalize(bank.to(device), dim=1),
                         bank_labels.to(device), train_data.num_classes, k, t)
    return topk_accuracy(scores, labels.to(device))[0]


# ----- devices and results files --------------------------------------------------------------------------------------

def pick_device(name):
    """--device: auto is cuda where torch can use a GPU, else the CPU, but never the CPU in silence where nvidia-smi
    sees a GPU that torch cannot use (a driver older than the CUDA build of torch, most often). A device that is not
    there, or not a device, is one sentence."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise SystemExit(f"--device {name} is not a device this project runs on: use auto, cpu, cuda or cuda:N.")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(gpus_torch_cannot_use() or f"--device {name} asks for a GPU, and torch "
                             f"{torch.__version__} sees none on this machine: use --device cpu (or auto).")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s) here, numbered from 0.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    unusable = gpus_torch_cannot_use()
    if unusable:
        raise SystemExit(unusable)
    return torch.device("cpu")


def gpus_torch_cannot_use():
    """One sentence when nvidia-smi lists GPUs that torch cannot use, else None. GPUs hidden on purpose
    (CUDA_VISIBLE_DEVICES set empty) are not complained about."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or torch.cuda.is_available() or not shutil.which("nvidia-smi"):
        return None
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not listed:
        return None
    name, _, driver = listed[0].rpartition(",")
    return (f"nvidia-smi sees {len(listed)} GPU(s) ({name.strip()}, driver {driver.strip()}) that this torch "
            f"{torch.__version__} (built for CUDA {torch.version.cuda}) cannot use, most likely a driver older than "
            f"that CUDA build: install a torch build for this driver, or use the CPU on purpose with --device cpu "
            f"(run_all.sh: CUDA_VISIBLE_DEVICES= bash run_all.sh).")


def save_atomic(obj, path):
    """torch.save through a temporary file and a rename: a kill during the write leaves the previous file intact."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_json(results, path):
    """Atomically (a temporary file, then a rename): run_all.sh takes an existing file as a finished stage."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


def writable_dir(folder, flag, output=None):
    """Refuse at start-up a folder that `output` (default: the folder itself) cannot go to: the nearest existing
    folder on its path must be a writable directory (the rest is created)."""
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag} {output or folder} cannot be written, as {parent} is not a writable directory: "
                         f"choose another {flag}.")


# ----- one writer per folder ------------------------------------------------------------------------------------------

LOCK = ".lock"  # the file a writer locks in the folder it writes (pretrain.py's --out, an evaluation's output folder)
_held = {}  # the folders this process holds: {lock file: [open file, holders]}


@contextlib.contextmanager
def one_writer(folder, label=None, name=LOCK, what=None):
    """Hold an exclusive lock on `folder` inside the block: a second writer, whichever script or machine it runs
    on, stops at once, before it writes anything, with one sentence naming the holder and what to do. The lock is
    the operating system's (flock on folder/NAME): it dies with its process however that ends, so a killed run
    never leaves an obstacle behind. Local disks and NFS (Linux clients emulate flock with NFS locks) honour it
    across processes and machines; where the filesystem has no locks (Lustre mounted without -o flock, some FUSE
    mounts) the folder goes unguarded and one line says so. A process may hold one folder twice (nested)."""
    path = os.path.join(folder, name)
    if path in _held:  # this process holds it already
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    new = not os.path.exists(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(path, "a+")
    except OSError:  # not a folder that can be written: the script's own checks say so in their words
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        try:
            h = json.loads(holder)
            who = (f"process {h['pid']} on {h['host']} ({h['command']}) since {h['since']}: wait for it to end, or "
                   f"stop it (on {h['host']}: kill {h['pid']})")
        except (ValueError, KeyError):  # its holder has not written its name yet
            who = "another process that is starting: wait for it to end, or stop it"
        raise SystemExit(f"{label or folder} is being written by {who}; then run this again. Nothing was written."
                         ) from None
    except OSError as err:  # no locks on this filesystem
        print(f"{label or folder}: its filesystem takes no locks ({err.strerror}), so a second writer would not be "
              f"stopped: run one writer per folder.", file=sys.stderr)
        handle.close()
        yield
        return
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": platform.node(), "since": utc(time.time()),
                             "command": what or shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:200]}))
    handle.flush()
    _held[path] = [handle, 1]
    try:
        yield
    finally:
        _held.pop(path)
        with contextlib.suppress(OSError):  # the folder may have moved (a run from .staging/ into its place)
            if new and os.listdir(folder) == [name]:  # refused at its start (a mistake): no folder is left behind
                os.remove(path)
                os.rmdir(folder)
        handle.close()  # closing releases the lock


@contextlib.contextmanager
def writing(outputs):
    """one_writer over the folders of an evaluation's output files {flag: path or None}, held inside the block."""
    folders = {}
    for flag, path in outputs.items():
        if path:
            folder = os.path.dirname(path) or "."
            folders.setdefault(os.path.abspath(folder), f"{folder} (the folder of {flag})")
    with contextlib.ExitStack() as stack:
        for folder, label in folders.items():
            stack.enter_context(one_writer(folder, label))
        yield


def is_json(path):
    try:
        with open(path, "rb") as f:
            if f.read(1) not in (b"{", b"["):  # not even the start of a results file: no need to read it all
                return False
            f.seek(0)
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


# a pretraining run's files (run_state.RunFiles): no evaluation output may replace one
RUN_FILES = ("summary.json", "log.jsonl", "checkpoint.pt")


def check_json_output(path, flag="--json", ckpt=None, is_result=is_json, result="a JSON results file"):
    """Before any work: the output file can be written, and replacing it loses nothing, i.e. it is new or holds
    `result` (an earlier one; is_result tells); never the checkpoint, a pretraining run's file (RUN_FILES: one that
    exists, or any in the folder of the checkpoint) or another kind of file. --neighbours passes is_png."""
    writable_dir(os.path.dirname(path) or ".", flag, path)
    if ckpt and os.path.exists(path) and os.path.exists(ckpt) and os.path.samefile(path, ckpt):
        raise SystemExit(f"{flag} {path} is the checkpoint being evaluated: choose another {flag}.")
    name = os.path.basename(path)
    if name in RUN_FILES and (os.path.exists(path) or ckpt and os.path.realpath(os.path.dirname(path) or ".")
                              == os.path.realpath(os.path.dirname(ckpt) or ".")):
        raise SystemExit(f"{flag} {path} names a pretraining run's {name}, which an evaluation never replaces: "
                         f"choose another {flag}.")
    if os.path.isdir(path) or (os.path.exists(path) and not is_result(path)):
        raise SystemExit(f"{flag} {path} exists and is not {result}, so it is not replaced: move it away or choose "
                         f"another {flag}.")


# ----- where a result was made ----------------------------------------------------------------------------------------

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16")  # the instruction sets that decide a CPU's speed here (bf16 most)


def machine(start, device, world_size=1):
    """Where a run or an evaluation ran, from `start` (time.time()) until now: the "machine" record of summary.json
    and of every evaluation's JSON (report.py's Machine line counts them). Its keys:
    cpu: the CPU's model; cpu_flags: those of CPU_FLAGS it has; cores: the CPUs this process may use; threads:
    torch's threads; gpu: the name of the GPU used (else of GPU 0; None without one torch can use); gpus: how many
    torch sees; world_size: the run's processes (torchrun's; 1 otherwise); torch: its version; commit: the project's
    git commit and modified: whether its files differ from it, results/ and runs/ aside (both None outside a git
    checkout); start, end: UTC, ISO 8601."""
    cpu, flags = cpu_model_and_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = (torch.cuda.get_device_name(device if device.type == "cuda" else 0) if torch.cuda.is_available()
           else None)
    status = git("status", "--porcelain", "--", ".", ":(exclude)results", ":(exclude)runs")
    return {"cpu": cpu, "cpu_flags": flags, "cores": cores, "threads": torch.get_num_threads(), "gpu": gpu,
            "gpus": torch.cuda.device_count() if gpu else 0, "world_size": world_size, "torch": str(torch.__version__),
            "commit": git("rev-parse", "HEAD"), "modified": None if status is None else bool(status),
            "start": utc(start), "end": utc(time.time())}


def cpu_model_and_flags():
    """(model name, the CPU_FLAGS it has) of the first processor in /proc/cpuinfo; elsewhere platform's name and no
    flags."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, [f for f in CPU_FLAGS if f in flags]


def git(*command):
    """The output of a git command in the project's folder; None where git or the checkout is missing."""
    try:
        # no index lock: a git command of the user's at the same time still runs
        proc = subprocess.run(["git", "--no-optional-locks", *command], cwd=data.PROJECT, capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def utc(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")
