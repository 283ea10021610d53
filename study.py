"""The study engine behind run_all.sh: a preset's jobs, what they cost on this machine, and running them.

    python3 study.py demo                          # what `bash run_all.sh demo` runs after its set-up
    python3 study.py demo --dry-run                # every command, resolved; nothing runs
    python3 study.py demo --plan                   # one self-contained line per job, for any scheduler
    python3 study.py demo --job run:resnet18:0     # one job of the plan (both recipes of a network and seed)
    python3 study.py demo --hours 2.5              # a time-boxed slice; run it again to continue

A preset is a folder of flag files (presets/NAME/): pretrain.args (every pretraining), baseline.args and small.args
(the preset's additions to recipes/baseline.args and recipes/small.args), eval.args (every evaluation) and
linear.args (the linear evaluation's own). One run by hand is
`pretrain.py @presets/demo/pretrain.args @recipes/small.args @presets/demo/small.args --arch resnet18 --seed 0`.

The jobs: per network and seed, both recipes' pretrainings each with its kNN and linear evaluation (one job, so that
the pair whose difference the study reports runs on one machine); per network and seed the two random-init
references; raw pixels once. A job's stages are done when their results exist and their recorded commands
(command.txt) mean what the study would run now (same script, same flags but for paths and run control); a pretraining
is done with or without its checkpoint (a clone's tracked results). Results are never deleted before the run that
replaces them has finished: a run rerun with another command trains in .staging/ and takes the old one's place at
its end. Before anything runs the study times each network's real training step at the preset's settings here
(pretrain.py for a few steps, knn_eval.py on a small bank; kept in runs/PRESET/cost.json for this machine) and says
what the study will cost; while it runs, one line shows the runs done and the ETA.
Exit status: 0 the study is complete, 1 a job failed, 2 the user's mistake, 3 stopped by --hours with runs left,
130 interrupted.
"""
import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import data
import run_state
from evaluation import file_sha256, machine

ROOT = os.path.dirname(os.path.abspath(__file__))
RECIPES = ("baseline", "small")
PRESET_FILES = ("pretrain", "baseline", "small", "eval", "linear")
# flags that say where or how fast a stage runs, not what it computes: commands that differ only in these are equal
WHERE = {"out", "ckpt", "json", "resume", "workers", "device", "data_dir", "compile", "knn_subset", "log_every"}
PROBE_STEPS = 4  # timed pretraining steps of the cost probe, after one untimed


# ----- the preset and its commands ------------------------------------------------------------------------------------

def read_args(path):
    """The flags of an @FILE as pretrain.py reads it: shell words, # starts a comment, @FILE inside read in its place
    (relative to the repository, as the scripts run from there)."""
    with open(path) as f:
        words = shlex.split(f.read(), comments=True)
    return [flag for w in words for flag in (read_args(os.path.join(ROOT, w[1:])) if w.startswith("@") else [w])]


def presets():
    return sorted(d for d in os.listdir(os.path.join(ROOT, "presets"))
                  if os.path.isdir(os.path.join(ROOT, "presets", d)))


def load_preset(name):
    """{file: flags} of presets/NAME/, and the recipes' own flags under "recipe_baseline" / "recipe_small"."""
    if name not in presets():
        raise SystemExit(f"unknown preset '{name}': choose one of presets/ ({' '.join(presets())}), or tests, "
                         f"gpucheck.")
    flags = {f: read_args(os.path.join(ROOT, "presets", name, f + ".args")) for f in PRESET_FILES}
    for recipe in RECIPES:
        flags["recipe_" + recipe] = read_args(os.path.join(ROOT, "recipes", recipe + ".args"))
    return flags


class Study:
    """The jobs of one invocation: a preset over networks and seeds, in STUDY_DIR/runs/PRESET (checkpoints) and
    STUDY_DIR/results/PRESET (everything else)."""

    def __init__(self, preset, archs, seeds=1, seeds_archs=None, study_dir=".", data_dir=None, python=None,
                 gpus=0, jobs=1):
        self.preset, self.flags = preset, load_preset(preset)
        self.archs, self.seeds = list(archs), seeds
        self.seeds_archs = list(archs if seeds_archs is None else seeds_archs)
        self.runs = os.path.join(study_dir, "runs", preset)
        self.out = os.path.join(study_dir, "results", preset)
        self.data_dir, self.python = data_dir, python or sys.executable
        self.gpus, self.jobs = gpus, jobs
        self.per_run = gpus if gpus > 1 and jobs == 1 else 1  # processes per pretraining (torchrun over the GPUs)
        import pretrain
        self.pretrain_args = pretrain.get_args(self.flags["pretrain"])

    def data_flags(self, stem=True):
        a = self.pretrain_args
        return (["--data", a.data] + (["--data-dir", self.data_dir] if self.data_dir else [])
                + (["--img-size", str(a.img_size)] if a.img_size else []) + (["--small-stem"] if stem and
                                                                             a.small_stem else []))

    def job_list(self):
        """Runs first (the longest), seed by seed; then the references; raw pixels last."""
        seeded = [(arch, seed) for seed in range(self.seeds) for arch in self.archs
                  if seed == 0 or arch in self.seeds_archs]
        return ([Job(self, "run", a, s) for a, s in seeded] + [Job(self, "refs", a, s) for a, s in seeded]
                + [Job(self, "pixels")])

    def pretrain_command(self, arch, recipe, seed, out):
        import pretrain
        return ["pretrain.py"] + last_wins(pretrain.parser(), ["--arch", arch] + self.flags["pretrain"]
                                           + self.flags["recipe_" + recipe] + self.flags[recipe]
                                           + (["--data-dir", self.data_dir] if self.data_dir else [])
                                           + ["--seed", str(seed), "--out", out, "--resume"])

    def launcher(self, script):
        if script == "pretrain.py" and self.per_run > 1:
            return [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.per_run}"]
        return [self.python]


def last_wins(parser, flags):
    """The flags with each option given once, where it was given last (as argparse reads them: a preset file that
    reads another and overrides one of its flags, cifar10's --data, prints as the command that runs)."""
    groups, i = [], 0
    while i < len(flags):
        action = parser._option_string_actions.get(flags[i])  # noqa: SLF001 - argparse's own table of flags
        n = 1
        if action is not None:
            if action.nargs == 0:
                n = 1
            elif action.nargs in ("+", "*"):
                while i + n < len(flags) and not flags[i + n].startswith("--"):
                    n += 1
            else:
                n = 1 + (action.nargs if isinstance(action.nargs, int) else 1)
        groups.append((action.dest if action is not None else None, flags[i:i + n]))
        i += n
    last = {dest: k for k, (dest, _) in enumerate(groups) if dest is not None}
    return [w for k, (dest, words) in enumerate(groups) if dest is None or last[dest] == k for w in words]


class Stage:
    """One command of a job: its script and flags, the file that says it finished, the results folder its
    command.txt and output.log go to, and for evaluations the checkpoint they read."""

    def __init__(self, argv, output, results, ckpt=None, run=None):
        self.argv, self.output, self.results, self.ckpt, self.run = argv, output, results, ckpt, run
        self.script = argv[0]
        self.key = "pretrain" if self.script == "pretrain.py" else os.path.basename(output)


class Job:
    """kind "run": both recipes of (arch, seed), each a pretraining, its kNN and its linear evaluation; "refs": the
    untrained network and the same with the data's BN statistics; "pixels": raw pixels."""

    def __init__(self, study, kind, arch=None, seed=0):
        self.study, self.kind, self.arch, self.seed = study, kind, arch, seed
        self.name = {"run": f"run:{arch}:{seed}", "refs": f"refs:{arch}:{seed}", "pixels": "pixels"}[kind]

    def folders(self):
        """{label: (results folder, run folder or None)}, the final ones."""
        s = self.study
        if self.kind == "run":
            return {r: (os.path.join(s.out, f"{self.arch}_{r}_s{self.seed}"),
                        os.path.join(s.runs, f"{self.arch}_{r}_s{self.seed}")) for r in RECIPES}
        name = f"{self.arch}_random_s{self.seed}" if self.kind == "refs" else "pixels"
        return {self.kind: (os.path.join(s.out, name), None)}

    def stages(self, label, res, run):
        s, ev = self.study, self.study.flags["eval"]
        if self.kind == "run":
            ckpt = os.path.join(run, "checkpoint.pt")
            return [Stage(s.pretrain_command(self.arch, label, self.seed, run), os.path.join(res, "summary.json"),
                          res, run=run),
                    Stage(["knn_eval.py", "--ckpt", ckpt, *ev, "--k", "20", "200", "--sweep", "--diagnostics",
                           "--neighbours", os.path.join(res, "neighbours.png"), "--json",
                           os.path.join(res, "knn.json")], os.path.join(res, "knn.json"), res, ckpt),
                    Stage(["linear_eval.py", "--ckpt", ckpt, *ev, *s.flags["linear"], "--json",
                           os.path.join(res, "linear.json")], os.path.join(res, "linear.json"), res, ckpt)]
        if self.kind == "refs":
            base = ["knn_eval.py", "--arch", self.arch, "--random-init"]
            rest = ["--seed", str(self.seed), *s.data_flags(), *ev, "--k", "20", "200"]
            return [Stage(base + rest + ["--neighbours", os.path.join(res, "neighbours.png"), "--json",
                                         os.path.join(res, "knn.json")], os.path.join(res, "knn.json"), res),
                    Stage(base + ["--precise-bn"] + rest + ["--neighbours", os.path.join(res, "neighbours_bn.png"),
                                                            "--json", os.path.join(res, "knn_bn.json")],
                          os.path.join(res, "knn_bn.json"), res)]
        return [Stage(["knn_eval.py", "--pixels", *s.data_flags(stem=False), *ev, "--k", "20", "200", "--diagnostics",
                       "--neighbours", os.path.join(res, "neighbours.png"), "--json", os.path.join(res, "knn.json")],
                      os.path.join(res, "knn.json"), res)]

    def parts(self):
        """[(label, final results folder, final run folder, the folders it works in now, its stages there, what is
        left to do)]: a run whose finished results would be replaced by a new pretraining works in .staging/."""
        parts = []
        for label, (res, run) in self.folders().items():
            todo = [st for st in self.stages(label, res, run) if not done(st)]
            staged = None
            if run is not None:
                staging = (staging_dir(res), staging_dir(run))
                pretrain_left = bool(todo) and (todo[0].script == "pretrain.py" or not os.path.exists(
                    os.path.join(run, "checkpoint.pt")))  # an evaluation left and no checkpoint: train again
                if os.path.isdir(staging[0]) or (pretrain_left and os.path.exists(os.path.join(res,
                                                                                               "summary.json"))):
                    staged = staging
                    todo = [st for st in self.stages(label, *staging) if not done(st)]
                elif pretrain_left and todo[0].script != "pretrain.py":
                    todo = self.stages(label, res, run)
            parts.append((label, res, run, staged, todo))
        return parts

    def is_done(self):
        return all(not todo for *_, todo in self.parts())

    def current(self):
        """Its results are there and their numbers were made by today's commands (report.py tables only these)."""
        return all(done(st, numbers=True) for label, (res, run) in self.folders().items()
                   for st in self.stages(label, res, run))




class Unit:
    """What the pool schedules: one recipe's run of a pair (its partner is the other recipe's, started in the same
    slice, so that the pair's difference carries no machine difference), or a whole references / pixels job."""

    def __init__(self, job, label=None):
        self.job, self.label = job, label
        self.study, self.kind, self.arch, self.seed = job.study, job.kind, job.arch, job.seed
        self.name = job.name + (f":{label}" if label else "")
        self.runs = 1 if label else 0
        self.partner = None

    def parts(self):
        return [p for p in self.job.parts() if self.label is None or p[0] == self.label]

    def is_done(self):
        return all(not todo for *_, todo in self.parts())


def units(jobs):
    """The pool's units of the jobs, in order, each recipe run knowing its partner."""
    out = []
    for job in jobs:
        if job.kind == "run":
            pair = [Unit(job, r) for r in RECIPES]
            pair[0].partner, pair[1].partner = pair[1], pair[0]
            out += pair
        else:
            out.append(Unit(job))
    return out


def staging_dir(path):
    return os.path.join(os.path.dirname(path), ".staging", os.path.basename(path))


# ----- when a stage is done: its result, and a recorded command that means today's --------------------------------

def recorded(results):
    """{stage key: the last command recorded for it} from results/command.txt (env and interpreter left out)."""
    out = {}
    try:
        lines = open(os.path.join(results, "command.txt")).read().splitlines()
    except OSError:
        return out
    for line in lines:
        words = shlex.split(line)
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts:
            continue
        argv = words[scripts[0]:]
        argv[0] = os.path.basename(argv[0])
        key = "pretrain" if argv[0] == "pretrain.py" else os.path.basename(value_of(argv, "--json") or "")
        out[key] = (argv, launch_processes(words[:scripts[0]]))
    return out


def value_of(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


def launch_processes(prefix):
    """The processes per run of a recorded launcher (torchrun's --nproc_per_node; 1 for plain python)."""
    for word in prefix:
        if word.startswith("--nproc_per_node="):
            return int(word.split("=")[1])
    return 1


def meaning(argv, processes=1, numbers=False):
    """What a command computes: its script and every flag as its own parser reads it, paths and run control (WHERE)
    left out, --neighbours as whether a picture is drawn (numbers=True: left out, as it changes no number), split BN
    as the groups it makes on `processes`."""
    script, flags = os.path.basename(argv[0]), argv[1:]
    if script == "pretrain.py":
        import pretrain
        args = vars(pretrain.parser().parse_args(flags))
        if args["bn_group"]:
            args["bn_splits"] = run_state.bn_splits(args["batch_size"], processes, args["bn_group"])
        args.pop("bn_group")
    else:
        module = __import__(script[:-3])
        args = vars(module.get_args(flags))
    if "neighbours" in args:
        args["neighbours"] = None if numbers else bool(args["neighbours"])
    if "reestimate_bn" in args:
        args["precise_bn"] = args.pop("reestimate_bn") or args.get("precise_bn", False)
    return script, {k: v for k, v in args.items() if k not in WHERE}


def difference(old, new):
    """The flags whose meaning differs, in words: '--lr 0.06, not 0.03; ...'."""
    (s1, a), (s2, b) = old, new
    if s1 != s2:
        return f"{s1}, not {s2}"
    return "; ".join(f"--{k.replace('_', '-')} {a.get(k)}, not {b.get(k)}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


def done(stage, why=None, numbers=False):
    """The stage's result exists, its recorded command means today's, and an evaluation of a checkpoint that is
    there measured that checkpoint. `why`, a list, receives the reason a recorded stage is not done; numbers=True
    asks only whether its numbers are today's (a missing picture aside)."""
    if not os.path.exists(stage.output):
        return False
    rec = recorded(stage.results).get(stage.key)
    if rec is None:
        return False
    processes = rec[1] if stage.script == "pretrain.py" else 1
    old, new = meaning(rec[0], processes, numbers), meaning(stage.argv, processes, numbers)
    if old != new:
        if why is not None:
            why.append(f"{os.path.basename(stage.results)} {stage.key}: {difference(old, new)}")
        return False
    result = json.load(open(stage.output))
    if stage.script == "pretrain.py":
        return bool(result.get("complete"))
    if stage.ckpt and os.path.exists(stage.ckpt):
        return result.get("ckpt_sha256") == file_sha256(stage.ckpt)
    return True


# ----- the cost, measured here ----------------------------------------------------------------------------------------

def machine_key():
    m = machine(time.time(), torch_device())
    return {k: m[k] for k in ("cpu", "cpu_flags", "cores", "gpu", "gpus", "torch")}


def torch_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def probe_pretraining(study, arch, recipe, env):
    """(seconds per training step, seconds to start, steps of the whole run, images): pretrain.py itself at the
    preset's settings, one untimed and PROBE_STEPS timed steps, from its own log."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = study.pretrain_command(arch, recipe, 0, os.path.join(tmp, "run"))
        argv += ["--max-steps", str(PROBE_STEPS + 1), "--log-every", "1", "--knn-every", "0"]
        start = time.time()
        proc = subprocess.run(study.launcher("pretrain.py") + argv, cwd=ROOT, env=env, capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(f"timing {arch} ({recipe}) failed: {proc.stderr.strip().splitlines()[-1]}")
        log = [json.loads(line) for line in open(os.path.join(tmp, "run", "log.jsonl")) if '"img_per_s"' in line]
        summary = json.load(open(os.path.join(tmp, "run", "summary.json")))
    batch = summary["args"]["batch_size"]
    seconds = [r["step"] * batch / r["img_per_s"] for r in log]  # since the first step began, pauses aside
    step_s = (seconds[-1] - seconds[0]) / (len(seconds) - 1)
    total_steps = round(summary["steps"] / summary["epochs"] * summary["args"]["epochs"])
    return step_s, time.time() - start - seconds[-1], total_steps, summary["n_images"]


def probe_evaluation(study, arch, env):
    """(seconds per image through the network in evaluation, seconds to start): knn_eval.py on a small bank."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["knn_eval.py", "--arch", arch, "--random-init", *study.data_flags(), *study.flags["eval"],
                "--subset", "512", "--test-subset", "256", "--k", "20", "--json", os.path.join(tmp, "knn.json")]
        start = time.time()
        proc = subprocess.run([study.python] + argv, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"timing {arch}'s evaluation failed: {proc.stderr.strip().splitlines()[-1]}")
        seconds = json.load(open(os.path.join(tmp, "knn.json")))["seconds"]
    return seconds / 768, time.time() - start - seconds


def measure(study, archs, env, say=print):
    """{arch: the probes' figures}, from runs/PRESET/cost.json when they were measured on this machine for these
    settings, else measured now (a few seconds per network and recipe) and kept there."""
    path = os.path.join(study.runs, "cost.json")
    key = {"machine": machine_key(), "threads": env.get("OMP_NUM_THREADS"), "flags": study.flags,
           "data_dir": study.data_dir, "per_run": study.per_run}
    kept = json.load(open(path)) if os.path.exists(path) else {}
    if kept.get("key") != json.loads(json.dumps(key)):
        kept = {"key": key, "archs": {}}
    todo = [a for a in archs if a not in kept["archs"]]
    if todo:
        say(f"study: timing each network's training step and evaluation here ({', '.join(todo)}), once for this "
            f"machine and preset")
    for arch in todo:
        figures = {}
        for recipe in RECIPES:
            step_s, start_s, steps, images = probe_pretraining(study, arch, recipe, env)
            figures[recipe] = {"step_s": step_s, "start_s": start_s, "steps": steps, "images": images}
        figures["eval_image_s"], figures["eval_start_s"] = probe_evaluation(study, arch, env)
        kept["archs"][arch] = figures
        say(f"  {arch}: a training step takes {figures['baseline']['step_s']:.2f} s (baseline), "
            f"{figures['small']['step_s']:.2f} s (small); {figures['baseline']['steps']} steps per run")
        os.makedirs(study.runs, exist_ok=True)
        with open(path, "w") as f:
            json.dump(kept, f, indent=2)
    return kept["archs"]


def eval_images(study, figures):
    """(bank, test) images of an evaluation: eval.args' --subset / --test-subset, else the training set and 10k."""
    a = data_args(study.flags["eval"])
    bank = count_of(a.get("--subset")) or figures["baseline"]["images"]
    return bank, count_of(a.get("--test-subset")) or 10000


def data_args(flags):
    return {f: flags[i + 1] for i, f in enumerate(flags[:-1]) if f.startswith("--")}


def count_of(subset):
    """Images of a --subset value: 'N' or 'N/class' (ten classes assumed)."""
    if not subset:
        return None
    n, _, per_class = subset.partition("/")
    return int(n) * (10 if per_class else 1)


def job_cost(job, costs):
    """Predicted seconds of what is left of a job (stage_cost summed over its stages left); 0 where nothing was
    measured (a plan's job runs without a prediction)."""
    if not costs:
        return 0.0
    return sum(stage_cost(job, label, st, costs) for label, _, _, _, todo in job.parts() for st in todo)


def stage_cost(job, label, st, costs):
    """Predicted seconds of one stage: pretraining steps and kNN monitors; evaluations as images through the network
    (kNN with diagnostics about twice its bank and queries, precise BN one more pass over the bank; raw pixels as a
    kNN without a network's diagnostics); each plus its process's start."""
    s = job.study
    f = costs[job.arch] if job.arch else next(iter(costs.values()))
    bank, test = eval_images(s, f)
    per, start = f["eval_image_s"], f["eval_start_s"]
    if st.script == "pretrain.py":
        r = f[label]
        monitors = (s.pretrain_args.knn_every and s.pretrain_args.epochs // s.pretrain_args.knn_every + 1)
        knn = 2 * (count_of(s.pretrain_args.knn_subset) or bank)
        left = 1 - min(run_state.saved_step(st.run) or 0, r["steps"]) / r["steps"]  # a resumed run: what is left
        return r["start_s"] + left * (r["steps"] * r["step_s"] + monitors * knn * per)
    if st.key == "linear.json":
        epochs = 1 if "--cached" in st.argv else int(value_of(st.argv, "--epochs") or 100)
        return start + (epochs * bank + test) * per
    if job.kind == "pixels":
        return start + (bank + test) * per
    return start + ((2 if "--diagnostics" in st.argv else 1) * (bank + test)
                    + (bank if "--precise-bn" in st.argv else 0)) * per


def cost_breakdown(units_left, costs):
    """Predicted seconds of pretraining, of the runs' evaluations and of the references (raw pixels included), one
    job after another: what the study's cost is made of."""
    parts = {"pretraining": 0.0, "evaluation": 0.0, "references": 0.0}
    for u in units_left:
        for label, _, _, _, todo in u.parts():
            for st in todo:
                kind = ("pretraining" if st.script == "pretrain.py" else "evaluation" if u.kind == "run"
                        else "references")
                parts[kind] += stage_cost(u, label, st, costs)
    return parts


def makespan(costs, slots, running=()):
    """Seconds until JOBS slots have worked through `costs` in order, each job to the first free slot, the slots
    busy for `running` seconds first."""
    free = sorted(list(running) + [0.0] * (slots - len(running)))
    for c in costs:
        free[0] += c
        free.sort()
    return max(free) if free else 0.0


# ----- running the jobs -----------------------------------------------------------------------------------------------

class Stopped(Exception):
    pass


class Runner:
    """JOBS slots, each working through one job's stages as processes of their own (a process group each, so that
    stopping a job stops its torchrun and DataLoader workers too); one progress line; Ctrl-C, TERM and the time box
    stop every running stage like Ctrl-C (pretrain.py saves nothing partial and resumes), TERM after 30 s."""

    def __init__(self, study, jobs, costs, env, deadline=None, out=sys.stdout):
        self.study, self.queue, self.costs, self.env, self.deadline = study, list(jobs), costs, env, deadline
        self.slots = [None] * study.jobs
        self.out, self.tty = out, out.isatty()
        self.finished, self.not_started, self.interrupted, self.committed = [], [], None, set()
        self.predicted = {}  # unit: its predicted seconds (Runner.cost)
        self.started = time.time()
        self.spent_predicted = 0.0  # predicted seconds of the jobs finished, against their actual seconds

    def slot_env(self, i):
        env = dict(self.env)
        if self.study.jobs > 1 and self.study.gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % self.study.gpus)
        return env

    def say(self, line):
        self.out.write(("\r\033[K" if self.tty else "") + line + "\n")
        self.out.flush()

    def run(self):
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        shown = 0.0
        try:
            while self.queue or any(self.slots):
                if self.interrupted:
                    raise Stopped(self.interrupted)
                if self.deadline and time.time() >= self.deadline and any(self.slots):
                    raise Stopped("time box")
                for i, slot in enumerate(self.slots):
                    if slot is not None:
                        self.poll(i)
                    if self.slots[i] is None:
                        self.start_next(i)
                if not any(self.slots) and self.queue:
                    continue
                if time.time() - shown >= (1 if self.tty else 60):
                    shown = time.time()
                    self.progress()
                time.sleep(0.5)
        except Stopped as e:
            self.stop_all()
            return "time box" if str(e) == "time box" else "interrupted"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.tty:  # the progress line makes way for what follows
                self.out.write("\r\033[K")
                self.out.flush()
        return "time box" if self.not_started else "done"

    def on_signal(self, signum, frame):
        self.interrupted = signal.Signals(signum).name

    def start_next(self, i):
        while self.queue:
            job = self.queue.pop(0)
            parts = job.parts()
            if all(not todo for *_, todo in parts):
                self.finished.append((job, 0.0, 0.0))
                self.say(f"== {job.name}: done, skipped")
                continue
            cost = self.cost(job)
            partner = getattr(job, "partner", None)
            pair = max(cost, self.cost(partner)) if partner in self.queue else cost
            if self.deadline and job not in self.committed and time.time() + pair * self.pace() > self.deadline:
                self.not_started.append(job)  # would not finish inside the box: left for the next slice
                continue
            if partner in self.queue:
                self.committed.add(partner)  # the pair's other run starts in this slice too, on this machine
            stages = [(label, res, run, staged, st) for label, res, run, staged, todo in parts for st in todo]
            self.slots[i] = {"job": job, "stages": stages, "proc": None, "cost": cost, "start": time.time(),
                             "parts": parts}
            self.say(f"== {time.strftime('%H:%M:%S')} {job.name} -> {parts[0][1]}" + (
                " (replacing its results when it has finished)" if any(p[3] for p in parts) else ""))
            self.launch(i)
            return

    def launch(self, i):
        slot = self.slots[i]
        label, res, run, staged, st = slot["stages"][0]
        os.makedirs(st.results, exist_ok=True)
        env = self.slot_env(i)
        argv = self.study.launcher(st.script) + st.argv
        threads = [f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in env else []
        with open(os.path.join(st.results, "command.txt"), "a") as f:
            f.write(shlex.join(threads + argv) + "\n")
        slot["log"] = open(os.path.join(st.results, "output.log"), "a")
        slot["proc"] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=slot["log"], stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def poll(self, i):
        slot = self.slots[i]
        rc = slot["proc"].poll()
        if rc is None:
            return
        slot["log"].close()
        label, res, run, staged, st = slot["stages"].pop(0)
        if rc:
            self.slots[i] = None
            self.stop_all()
            log = os.path.join(st.results, "output.log")
            tail = "".join(open(log).readlines()[-15:])
            raise SystemExit(f"{tail}study: the job '{slot['job'].name}' failed ({st.script} exit {rc}); the end of "
                             f"{log} is above.")
        if st.script == "pretrain.py":  # the run's logs beside its results
            for name in ("log.jsonl", "summary.json"):
                shutil.copy(os.path.join(st.run, name), os.path.join(st.results, name))
        if staged and not any(s[0] == label for s in slot["stages"]):
            replace(staged, (res, run))  # the new run takes the old one's place now that it has finished
        if slot["stages"]:
            self.launch(i)
            return
        took = time.time() - slot["start"]
        self.finished.append((slot["job"], slot["cost"], took))
        self.spent_predicted += slot["cost"]
        self.slots[i] = None
        predicted = f" (predicted {run_state.duration(slot['cost'])})" if self.costs else ""
        self.say(f"== {time.strftime('%H:%M:%S')} {slot['job'].name}: done in {run_state.duration(took)}{predicted}; "
                 f"{self.status()}")

    def cost(self, unit):
        """job_cost of a unit not yet started, worked out once: nothing changes what is left of it while it waits
        (the progress line asks for every queued unit's each second)."""
        if unit not in self.predicted:
            self.predicted[unit] = job_cost(unit, self.costs)
        return self.predicted[unit]

    def pace(self):
        """Actual over predicted seconds of the jobs finished so far (1 before any): the ETA's correction."""
        actual = sum(took for _, cost, took in self.finished if cost)
        return actual / self.spent_predicted if self.spent_predicted and actual else 1.0

    def status(self):
        jobs = [j for j, _, _ in self.finished]
        runs_done = sum(j.runs for j in jobs)
        all_runs = runs_done + sum(j.runs for j in self.queue + self.not_started) + sum(
            s["job"].runs for s in self.slots if s)
        refs = [j for j in jobs if not j.runs]
        all_refs = len(refs) + sum(1 for j in self.queue + self.not_started if not j.runs) + sum(
            1 for s in self.slots if s and not s["job"].runs)
        running = [max(0.0, s["cost"] * self.pace() - (time.time() - s["start"])) for s in self.slots if s]
        eta = makespan([self.cost(j) * self.pace() for j in self.queue], len(self.slots), running)
        return (f"{runs_done} of {all_runs} runs and {len(refs)} of {all_refs} references done"
                + (f"; study ETA {run_state.duration(eta)}" if self.costs else ""))

    def progress(self):
        line = f"-- {time.strftime('%H:%M:%S')} {self.status()}"
        for s in self.slots:
            if s:
                last = last_line(os.path.join(s["stages"][0][4].results, "output.log"))
                line += f" | {s['job'].name}: {last[:60]}" if not self.tty else ""
        if self.tty:
            self.out.write("\r\033[K" + line[:max(40, shutil.get_terminal_size().columns - 1)])
            self.out.flush()
        else:
            self.say(line)

    def stop_all(self, grace=30):
        """Ctrl-C to every running stage's process group; TERM after `grace` seconds to any still running."""
        procs = [s["proc"] for s in self.slots if s and s.get("proc")]
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            p.wait()
        for s in self.slots:
            if s and s.get("log"):
                s["log"].close()
        self.slots = [None] * len(self.slots)


def last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4000))
            lines = [x for x in f.read().decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def replace(staged, final):
    """Move a finished run from .staging/ into its place: the old results and checkpoint go only now."""
    for new, old in zip(staged, final):
        if os.path.exists(old):
            trash = old + ".old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(old, trash)
            os.replace(new, old)
            shutil.rmtree(trash)
        else:
            os.makedirs(os.path.dirname(old), exist_ok=True)
            os.replace(new, old)
        with contextlib.suppress(OSError):  # .staging/ itself, once empty
            os.rmdir(os.path.dirname(new))


# ----- what was kept, and the invocation ------------------------------------------------------------------------------

def describe_kept(study, jobs):
    """Lines naming the runs kept from earlier (with the commit and machine they ran on) and those rerun because their
    recorded command differs from today's."""
    kept, rerun = [], []
    for job in jobs:
        if job.kind != "run":
            continue
        for label, (res, run) in job.folders().items():
            stages = job.stages(label, res, run)
            why = []
            if all(done(st, why) for st in stages):
                summary = json.load(open(os.path.join(res, "summary.json")))
                m = summary.get("machine") or {}
                kept.append(f"{os.path.basename(res)} (commit {(m.get('commit') or 'not recorded')[:7]}, "
                            f"{m.get('cpu') or 'machine not recorded'}"
                            + ("" if os.path.exists(os.path.join(run, "checkpoint.pt")) else ", no checkpoint")
                            + ")")
            elif why:
                retrain = done(stages[0]) and not os.path.exists(os.path.join(run, "checkpoint.pt"))
                rerun.append("; ".join(why) + ("; its checkpoint is not here, so it trains again" if retrain else ""))
    lines = []
    if kept:
        lines.append(f"study: {len(kept)} run(s) kept, their results and recorded commands as today's: "
                     + ", ".join(kept))
    for r in rerun:
        lines.append(f"study: rerun, its recorded command differs from today's: {r}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    a = p.add_argument
    a("preset", help="presets/NAME")
    a("--archs", nargs="+", default=None, help="networks (default: models.STUDY)")
    a("--seeds", type=data.int_flag(1, 1000), default=1, help="seeds 0 .. N-1")
    a("--seeds-archs", nargs="*", default=None, help="the networks that get every seed (default: all)")
    a("--study-dir", default=".", help="runs/ and results/ go there")
    a("--data-dir", default=None, help="where the data set is")
    a("--jobs", type=data.int_flag(1, 1024), default=None, help="jobs at once (default: 2 on a CPU of 2+ cores)")
    a("--hours", type=data.float_flag(0, 10**6, low_open=True), default=None,
      help="time box: start no job the measured cost says cannot finish inside it, stop at its end (exit 3)")
    a("--dry-run", action="store_true", help="print every command, run nothing")
    a("--plan", action="store_true", help="one self-contained command line per job, for any scheduler")
    a("--job", default=None, help="run one job of the plan (run:ARCH:SEED, refs:ARCH:SEED, pixels)")
    a("--python", default=None, help="the interpreter of every stage (default: this one)")
    a("--gpus", type=data.int_flag(0, 1024), default=None, help="GPUs torch can use (default: counted)")
    a("--invocation", default=None, help="the command the user typed, for study.json")
    a("--cpu-ok", action="store_true", help="run a preset sized for GPUs on a CPU anyway")
    a("--no-cost", dest="cost", action="store_false", help="--dry-run: print the commands alone, time nothing")
    args = p.parse_args(argv)
    import models
    import torch
    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    archs = args.archs or list(models.STUDY)
    nproc = os.cpu_count() or 1
    jobs = args.jobs or (1 if gpus else min(2, nproc))
    check(args, archs, gpus)
    study = Study(args.preset, archs, args.seeds, args.seeds_archs, args.study_dir, args.data_dir, args.python,
                  gpus, jobs)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # a missing data set: its one sentence, before any folder
            data.load_data(study.pretrain_args.data, "test", args.data_dir)
    except SystemExit as e:
        fail(str(e))
    check_gpu(args, archs, gpus)
    env = dict(os.environ)
    if jobs > 1 and not gpus:
        env["OMP_NUM_THREADS"] = str(max(1, nproc // jobs))
    all_jobs = study.job_list()
    where = f"{gpus} GPU(s)" if gpus else f"a CPU of {nproc} cores"
    if not args.plan and not args.job:
        print(f"study {args.preset}: {len(archs)} network(s) x 2 recipes x {args.seeds} seed(s)"
              + (f" (seeds past 0: {' '.join(study.seeds_archs)})" if args.seeds_archs is not None else "")
              + f" on {where}, {jobs} job(s) at once (JOBS=N to change); results in {study.out}", flush=True)
    if args.job:
        return run_one(study, all_jobs, args.job, env)
    if args.dry_run:
        for job in all_jobs:
            for label, (res, run) in job.folders().items():
                print(f"# {job.kind} {' '.join(str(x) for x in (job.arch, label, job.seed) if x is not None)}"
                      if job.kind == "run" else f"# {job.kind}" + (f" {job.arch} {job.seed}" if job.arch else ""))
                for st in job.stages(label, res, run):
                    print(shlex.join(study.launcher(st.script) + st.argv))
        if args.cost and not (args.preset in GPU_PRESETS and not gpus):  # what it would cost here, on stderr
            say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
            todo = [u for u in units(all_jobs) if not u.is_done()]
            costs = measure(study, sorted({u.arch for u in todo if u.arch}) or archs[:1], env, say) if todo else {}
            say(f"study {args.preset}: {len(todo)} of {len(units(all_jobs))} jobs left, about "
                f"{run_state.duration(makespan([job_cost(u, costs) for u in todo], jobs))} here with {jobs} at once")
        return 0
    if args.plan:  # the study as planned (study.json, for report.py; earlier slices kept), then the jobs' lines
        os.makedirs(study.out, exist_ok=True)
        path = os.path.join(study.out, "study.json")
        old = json.load(open(path)) if os.path.exists(path) else {}
        with open(path, "w") as f:
            json.dump(study_record(study, args, old.get("slices", []), old), f, indent=2)
        for job in all_jobs:
            python = study.python if os.sep not in study.python else os.path.join(ROOT, study.python)  # any folder
            line = ([f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in env else []) + [
                python, os.path.join(ROOT, "study.py"), args.preset, "--job", job.name, "--study-dir",
                os.path.abspath(args.study_dir)] + (["--data-dir", args.data_dir] if args.data_dir else []) + [
                "--archs", *archs, "--seeds", str(args.seeds)] + (
                ["--seeds-archs", *args.seeds_archs] if args.seeds_archs is not None else [])
            print(shlex.join(line))
        return 0
    return run_study(study, all_jobs, env, args)


# presets sized for GPUs, and what one would cost on a 2-core CPU (bench.py's small-stem speed: docs/performance.md)
GPU_PRESETS = {"fmnist": "about 100 days for its pretrainings alone", "cifar10": "about 100 days for its "
               "pretrainings alone", "imagenet": "years"}


def check(args, archs, gpus):
    """The command's mistakes, each one sentence (exit 2) before any folder is made; dry runs included."""
    import models
    for variable, names in (("ARCHS", archs), ("SEEDS_ARCHS", args.seeds_archs or [])):
        unknown = [a for a in names if a not in models.ARCHS]
        if unknown:
            fail(f"{variable} names {' '.join(unknown)}, not a network of models.py: choose from "
                 f"{' '.join(models.ARCHS)}.")
    outside = [a for a in args.seeds_archs or [] if a not in archs]
    if outside:
        fail(f"SEEDS_ARCHS names {' '.join(outside)}, not a network of this study (ARCHS: {' '.join(archs)}): name "
             f"networks of ARCHS, which get every seed.")
    if args.preset not in presets():
        fail(f"unknown preset '{args.preset}': choose one of presets/ ({' '.join(presets())}), or tests, gpucheck.")


def check_gpu(args, archs, gpus):
    """A preset sized for GPUs on a machine without one: what it would cost, and how to run it anyway."""
    if args.preset in GPU_PRESETS and not gpus and not (args.dry_run or args.plan or args.cpu_ok):
        fail(f"run_all.sh {args.preset} is sized for GPUs: {len(archs)} network(s) x 2 recipes x 200 epochs, and this "
             f"machine has no GPU torch can use. On a 2-core CPU it would take {GPU_PRESETS[args.preset]} "
             f"(docs/performance.md). Run it on a GPU machine, or the CPU demo (bash run_all.sh demo); to run it "
             f"here anyway: CPU_OK=1 bash run_all.sh {args.preset}.")


def fail(sentence):
    print(sentence, file=sys.stderr)
    raise SystemExit(2)


def run_one(study, all_jobs, name, env):
    """One job of the plan, in the foreground, its stages one after the other (no cost probe: it just runs)."""
    match = [j for j in all_jobs if j.name == name]
    if not match:
        raise SystemExit(f"--job {name} is not a job of this study: {', '.join(j.name for j in all_jobs)}.")
    study.jobs = 1
    outcome = Runner(study, units(match), {}, env).run()
    return 0 if outcome == "done" else 130


def run_study(study, all_jobs, env, args):
    say = lambda line: print(line, flush=True)  # noqa: E731
    for line in describe_kept(study, all_jobs):
        say(line)
    started = time.time()
    all_units = units(all_jobs)
    todo = [u for u in all_units if not u.is_done()]
    costs = measure(study, sorted({j.arch for j in todo if j.arch}) or study.archs[:1], env, say) if todo else {}
    predicted_of = {u: job_cost(u, costs) for u in todo}  # worked out once: the pool reuses them
    predicted = makespan(list(predicted_of.values()), study.jobs)
    runs = sum(1 for u in todo for *_, t in u.parts() if t and t[0].script == "pretrain.py")
    where = f"{study.gpus} GPU(s)" if study.gpus else f"a CPU of {os.cpu_count()} cores"
    if todo:
        parts = cost_breakdown(todo, costs)
        say(f"study {study.preset}: {len(todo)} of {len(all_units)} jobs to run ({runs} pretraining(s)) on {where}, "
            f"{study.jobs} at once: about {run_state.duration(predicted)} here, from the step and evaluation speeds "
            f"timed just now (one job after another: "
            + ", ".join(f"{k} {run_state.duration(v)}" for k, v in parts.items()) + ")"
            + (f"; time box {args.hours:g} h" if args.hours else "") + f"; results in {study.out}")
    else:
        say(f"study {study.preset}: all {len(all_units)} jobs are done; the table is rebuilt from their files in "
            f"{study.out} (study.json unchanged: nothing ran)")
    deadline = started + args.hours * 3600 if args.hours else None
    runner = Runner(study, all_units, costs, env, deadline)  # the finished ones say "done, skipped"
    runner.predicted.update(predicted_of)
    outcome = runner.run()  # a failing job ends the study here (SystemExit, exit 1): no table of a broken study
    write_study(study, args, predicted, time.time() - started, runner, record=bool(todo))  # the table so far
    left = [u for u in all_units if not u.is_done()]
    if outcome == "interrupted":
        say(f"study: interrupted; {len(all_units) - len(left)} of {len(all_units)} jobs done: run the same command "
            f"again to continue.")
        return 130
    if left:
        say(f"study: the time box ends; {len(all_units) - len(left)} of {len(all_units)} jobs done "
            f"({', '.join(j.name for j in left)} left): run the same command again to continue.")
        return 3
    say(f"study: complete in {run_state.duration(time.time() - started)} (predicted "
        f"{run_state.duration(predicted)}); the table: {study.out}/RESULTS.md")
    return 0


def write_study(study, args, predicted, seconds, runner, record=True):
    """results/PRESET/study.json: the study as today's invocation describes it, and every slice that worked on it
    (this one appended: its invocation, machine, predicted and actual seconds, the jobs it finished); then the
    table, from whatever has finished. An invocation that found nothing to run (record False) leaves study.json as
    it was: a clone that reruns the study's command gets the tracked files back unchanged."""
    path = os.path.join(study.out, "study.json")
    os.makedirs(study.out, exist_ok=True)
    old = json.load(open(path)) if os.path.exists(path) else {}
    if record or not old:
        slices = old.get("slices", [])
        slices.append({"invocation": args.invocation or shlex.join(sys.argv), "machine": machine(runner.started,
                                                                                                 torch_device()),
                       "jobs": study.jobs, "predicted_s": round(predicted), "seconds": round(seconds),
                       "finished": [j.name for j, cost, _ in runner.finished if cost]})
        with open(path, "w") as f:
            json.dump(study_record(study, args, slices, old), f, indent=2)
    subprocess.run([study.python, os.path.join(ROOT, "report.py"), study.out], cwd=ROOT)


def study_record(study, args, slices, old=None):
    """study.json: what report.py reads. The networks and seeds grow with every invocation (a subset study adds to
    the table, never removes from it)."""
    old = old or {}
    archs = list(dict.fromkeys(old.get("archs", []) + study.archs))
    seeds_archs = list(dict.fromkeys([a for a in old.get("seeds_archs", []) if old.get("seeds", 1) > 1]
                                     + (study.seeds_archs if study.seeds > 1 else [])))
    return {"preset": study.preset, "archs": archs, "seeds": max(study.seeds, old.get("seeds", 1)),
            "seeds_archs": seeds_archs, "invocation": args.invocation or shlex.join(sys.argv),
            "seconds": round(sum(s["seconds"] for s in slices)) if slices else None, "slices": slices}


if __name__ == "__main__":
    raise SystemExit(main())
