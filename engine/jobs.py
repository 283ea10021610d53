"""A study's jobs, their commands, and which of them are done.

A study is a preset over networks and seeds. Its jobs: per network and seed, one run per recipe (a pretraining, then
its kNN and linear evaluations), the references (the network untrained, and the same with the data's BN
statistics), and raw pixels once. A job is a list of stages, each a command of pretrain.py, knn_eval.py or
linear_eval.py, resolved from the preset's flag files by the script's own parser. The two runs of a network and seed
are a pair: they start in the same slice, on one machine, so that their difference carries no machine's. A line of
the plan (study.py --job) runs a pair, or a references or the raw pixels job.

A stage is done when its result exists and the command recorded beside it (command.txt) means what the study would
run now: the same script and flags, as its parser reads them, but for where files go and how fast it runs (each
script's RUN_CONTROL); a pretraining is done with or without its checkpoint (a clone's tracked results). A run to be
made again while its old results exist is made in .staging/ and takes their place when it has finished.
"""
import contextlib
import importlib
import io
import json
import os
import shlex
import shutil
import sys

import data
import run_state
from engine import presets
from engine.presets import RECIPES
from evaluation import file_sha256, write_json


def script_module(script):
    """The module of pretrain.py, knn_eval.py or linear_eval.py: its parser(), get_args() and RUN_CONTROL."""
    return importlib.import_module(os.path.basename(script)[:-3])


def resolved(script, argv):
    """[script, *flags]: argv as the script's own parser reads it (@FILEs read, a flag given twice taken where it
    was given last), every flag once, written out: the command that runs and is recorded."""
    return [script] + data.command_line(script_module(script).parser(), argv)


class Study:
    """One invocation's study: a preset over networks and seeds, its checkpoints in STUDY_DIR/runs/PRESET and
    everything else in STUDY_DIR/results/PRESET."""

    def __init__(self, preset, archs, seeds=1, seeds_archs=None, study_dir=".", data_dir=None, python=None,
                 gpus=0, jobs=1):
        import pretrain
        self.preset = preset
        self.archs, self.seeds = list(archs), seeds
        self.seeds_archs = list(archs if seeds_archs is None else seeds_archs)
        self.runs = os.path.join(study_dir, "runs", preset)
        self.out = os.path.join(study_dir, "results", preset)
        self.data_dir, self.python = data_dir, python or sys.executable
        self.gpus, self.jobs = gpus, jobs
        self.per_run = gpus if gpus > 1 and jobs == 1 else 1  # processes per pretraining (torchrun over the GPUs)
        self.pretrain_args = pretrain.get_args([presets.flag_file(preset, "pretrain")])
        self.eval_args = script_module("knn_eval.py").get_args([presets.flag_file(preset, "eval")])

    def data_flags(self, stem=True):
        a = self.pretrain_args
        return (["--data", a.data] + (["--data-dir", self.data_dir] if self.data_dir else [])
                + (["--img-size", str(a.img_size)] if a.img_size else [])
                + (["--small-stem"] if stem and a.small_stem else []))

    def lines(self):
        """The plan's lines, runs first (the longest), seed by seed; then the references; raw pixels last."""
        seeded = [(arch, seed) for seed in range(self.seeds) for arch in self.archs
                  if seed == 0 or arch in self.seeds_archs]
        return ([Line(self, "run", a, s) for a, s in seeded] + [Line(self, "refs", a, s) for a, s in seeded]
                + [Line(self, "pixels")])

    def all_jobs(self):
        return [job for line in self.lines() for job in line.jobs]

    def pretrain_command(self, arch, recipe, seed, out):
        return resolved("pretrain.py", [presets.flag_file(self.preset, "pretrain"), presets.recipe_file(recipe),
                                        presets.flag_file(self.preset, recipe), "--arch", arch]
                        + (["--data-dir", self.data_dir] if self.data_dir else [])
                        + ["--seed", str(seed), "--out", out, "--resume"])

    def eval_command(self, script, first, last=()):
        """An evaluation: the job's `first` flags (the network, the data), then the preset's eval.args (and
        linear.args), which may override them, then the job's `last` (the outputs, what to report)."""
        own = [presets.flag_file(self.preset, "linear")] if script == "linear_eval.py" else []
        return resolved(script, [*first, presets.flag_file(self.preset, "eval"), *own, *last])

    def launcher(self, script):
        if script == "pretrain.py" and self.per_run > 1:
            return [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.per_run}"]
        return [self.python]


class Stage:
    """One command of a job: its script and flags, the file that says it finished, the results folder its
    command.txt and output.log go to, and for an evaluation of a run the checkpoint it reads."""

    def __init__(self, argv, output, results, ckpt=None, run=None):
        self.argv, self.output, self.results, self.ckpt, self.run = argv, output, results, ckpt, run
        self.script = argv[0]
        self.key = "pretrain" if self.script == "pretrain.py" else os.path.basename(output)

    @property
    def args(self):
        """The command as its script reads it."""
        return script_module(self.script).get_args(self.argv[1:])


class Line:
    """A line of the plan: kind "run", a network and seed's pair of runs; "refs", its references; "pixels"."""

    def __init__(self, study, kind, arch=None, seed=0):
        self.study, self.kind, self.arch, self.seed = study, kind, arch, seed
        self.name = {"run": f"run:{arch}:{seed}", "refs": f"refs:{arch}:{seed}", "pixels": "pixels"}[kind]
        self.jobs = [Job(self, label) for label in (RECIPES if kind == "run" else (kind,))]
        if kind == "run":
            self.jobs[0].partner, self.jobs[1].partner = self.jobs[1], self.jobs[0]

    def current(self):
        return all(job.current() for job in self.jobs)


class Left:
    """What is left of a job: its final results and run folders, the .staging/ pair it works in instead (a run made
    again while its old results exist) or None, and its stages left there."""

    def __init__(self, results, run, staged, stages):
        self.results, self.run, self.staged, self.stages = results, run, staged, stages


class Job:
    """What the pool starts: one recipe's run of a network and seed (label: the recipe), a network and seed's
    references ("refs") or raw pixels ("pixels"). Its partner is the other recipe's run of the pair."""

    def __init__(self, line, label):
        self.label = label
        self.study, self.kind, self.arch, self.seed = line.study, line.kind, line.arch, line.seed
        self.name = line.name + (f":{label}" if self.kind == "run" else "")
        self.is_run = self.kind == "run"
        self.partner = None

    def folders(self):
        """(results folder, run folder or None), the final ones."""
        s = self.study
        if self.is_run:
            name = f"{self.arch}_{self.label}_s{self.seed}"
            return os.path.join(s.out, name), os.path.join(s.runs, name)
        return os.path.join(s.out, f"{self.arch}_random_s{self.seed}" if self.kind == "refs" else "pixels"), None

    def stages(self, res, run):
        s = self.study
        if self.is_run:
            ckpt = os.path.join(run, "checkpoint.pt")
            return [Stage(s.pretrain_command(self.arch, self.label, self.seed, run), os.path.join(res, "summary.json"),
                          res, run=run),
                    Stage(s.eval_command("knn_eval.py", ["--ckpt", ckpt],
                                         ["--k", "20", "200", "--sweep", "--diagnostics", "--neighbours",
                                          os.path.join(res, "neighbours.png"), "--json",
                                          os.path.join(res, "knn.json")]),
                          os.path.join(res, "knn.json"), res, ckpt),
                    Stage(s.eval_command("linear_eval.py", ["--ckpt", ckpt],
                                         ["--json", os.path.join(res, "linear.json")]),
                          os.path.join(res, "linear.json"), res, ckpt)]
        if self.kind == "refs":
            def ref(*flags, png, out):
                return Stage(s.eval_command("knn_eval.py", ["--arch", self.arch, "--random-init", *flags, "--seed",
                                                            str(self.seed), *s.data_flags()],
                                            ["--k", "20", "200", "--neighbours", os.path.join(res, png), "--json",
                                             os.path.join(res, out)]), os.path.join(res, out), res)
            return [ref(png="neighbours.png", out="knn.json"),
                    ref("--precise-bn", png="neighbours_bn.png", out="knn_bn.json")]
        return [Stage(s.eval_command("knn_eval.py", ["--pixels", *s.data_flags(stem=False)],
                                     ["--k", "20", "200", "--diagnostics", "--neighbours",
                                      os.path.join(res, "neighbours.png"), "--json", os.path.join(res, "knn.json")]),
                      os.path.join(res, "knn.json"), res)]

    def left(self):
        """What is left to do, and where: a run whose finished results a new pretraining would replace works in
        .staging/ (so that they are lost only when the new run has finished)."""
        res, run = self.folders()
        todo = [st for st in self.stages(res, run) if not done(st)]
        staged = None
        if run is not None:
            staging = (staging_dir(res), staging_dir(run))
            retrain = bool(todo) and (todo[0].script == "pretrain.py" or not os.path.exists(
                os.path.join(run, "checkpoint.pt")))  # an evaluation left and no checkpoint: train again
            if os.path.isdir(staging[0]) or (retrain and os.path.exists(os.path.join(res, "summary.json"))):
                staged = staging
                todo = [st for st in self.stages(*staging) if not done(st)]
        return Left(res, run, staged, todo)

    def done(self):
        """Nothing left to run, and no finished run waiting in .staging/ to take its place (a study stopped
        between the two: the pool moves it)."""
        left = self.left()
        return not left.stages and not left.staged

    def current(self):
        """Its results are there and their numbers were made by today's commands (report.py tables only these)."""
        return all(done(st, numbers=True) for st in self.stages(*self.folders()))


def staging_dir(path):
    return os.path.join(os.path.dirname(path), ".staging", os.path.basename(path))


# ----- when a stage is done: its result, and a recorded command that means today's ----------------------------------

def parsed(argv):
    """The script's reading of a recorded command, or None where today's script cannot read it (a flag that is gone:
    not today's command)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage message: not the user's mistake
            return script_module(argv[0]).get_args(argv[1:])
    except SystemExit:
        return None


def recorded(results):
    """{stage key: (the last command recorded for it, its processes per run)} from results/command.txt (environment
    and interpreter left out)."""
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
        if argv[0] == "pretrain.py":
            key = "pretrain"
        else:  # a command today's script cannot read still names its output: it is that stage's, and not today's
            args = parsed(argv)
            key = os.path.basename((args.json if args else argv[argv.index("--json") + 1] if "--json" in argv[:-1]
                                    else None) or "")
        out[key] = (argv, launch_processes(words[:scripts[0]]))
    return out


def launch_processes(prefix):
    """The processes per run of a recorded launcher (torchrun's --nproc_per_node; 1 for plain python)."""
    for word in prefix:
        if word.startswith("--nproc_per_node="):
            return int(word.split("=")[1])
    return 1


def meaning(argv, processes=1, numbers=False):
    """What a command computes: its script and every flag as its own parser reads it but for the script's
    RUN_CONTROL (where files go, how fast it runs); --neighbours as whether a picture is drawn (numbers=True: left
    out, as it changes no number); split BN as the groups it makes on `processes`. None for a command today's
    script cannot read."""
    args = parsed(argv)
    if args is None:
        return None
    args = vars(args)
    if "bn_group" in args:
        if args["bn_group"]:
            args["bn_splits"] = run_state.bn_splits(args["batch_size"], processes, args["bn_group"])
        args.pop("bn_group")
    if "neighbours" in args:
        args["neighbours"] = None if numbers else bool(args["neighbours"])
    control = script_module(argv[0]).RUN_CONTROL
    return os.path.basename(argv[0]), {k: v for k, v in args.items() if k not in control}


def difference(old, new):
    """The flags whose meaning differs, in words: '--lr 0.06, not 0.03; ...'."""
    if old is None:
        return "a command today's script cannot read"
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


# ----- a run made again takes the old one's place ---------------------------------------------------------------------

def replace(staged, final):
    """Move a finished run from .staging/ into its place: the old results and checkpoint go only now. The paths its
    evaluations recorded (the checkpoint, the classifier, the picture) follow it."""
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
    moved = {new: old for new, old in zip(staged, final)}
    for name in ("knn.json", "linear.json"):
        path = os.path.join(final[0], name)
        if os.path.exists(path):
            results = json.load(open(path))
            for key in ("ckpt", "classifier"):
                if isinstance(results.get(key), str):
                    results[key] = moved_path(results[key], moved)
            if results.get("neighbours"):
                results["neighbours"]["png"] = moved_path(results["neighbours"]["png"], moved)
            write_json(results, path)


def moved_path(path, moved):
    for new, old in moved.items():
        if path == new or path.startswith(new + os.sep):
            return old + path[len(new):]
    return path


def describe_kept(study, jobs):
    """Lines naming the runs kept from earlier (with the commit and machine they ran on) and those made again
    because their recorded command differs from today's, saying how."""
    kept, rerun = [], []
    for job in (j for j in jobs if j.is_run):
        res, run = job.folders()
        stages = job.stages(res, run)
        why = []
        if all(done(st, why) for st in stages):
            summary = json.load(open(os.path.join(res, "summary.json")))
            m = summary.get("machine") or {}
            kept.append(f"{os.path.basename(res)} (commit {(m.get('commit') or 'not recorded')[:7]}, "
                        f"{m.get('cpu') or 'machine not recorded'}"
                        + ("" if os.path.exists(os.path.join(run, "checkpoint.pt")) else ", no checkpoint") + ")")
        elif why:
            rerun.append("; ".join(why) + "; " + how_made_again(job, stages))
    lines = []
    if kept:
        lines.append(f"study: {len(kept)} run(s) kept, their results and recorded commands as today's: "
                     + ", ".join(kept))
    for r in rerun:
        lines.append(f"study: made again, its recorded command differs from today's: {r}")
    return lines


def how_made_again(job, stages):
    """What happens to a run whose recorded command differs: where it trains, or resumes, or whether only its
    evaluations run again."""
    left = job.left()
    if left.stages and left.stages[0].script != "pretrain.py":
        return f"its evaluations run again ({', '.join(st.key for st in left.stages)})"
    step = run_state.saved_step(left.stages[0].run) if left.stages else None
    where = ".staging/" if left.staged else "its run folder"
    if step:
        return f"it resumes in {where} from the checkpoint of step {step} there"
    if done(stages[0]) and not os.path.exists(os.path.join(left.run, "checkpoint.pt")):
        return f"its checkpoint is not here, so it trains again in {where}"
    return f"it trains again in {where}"


# ----- study.json: what report.py reads -------------------------------------------------------------------------------

def write_record(study, invocation, slice_=None):
    """results/PRESET/study.json, the one place it is written: the study as this invocation describes it (its
    networks and seeds grow with every invocation: a subset study adds to the table, never removes from it) and
    every slice that worked on it, `slice_` appended, or put in the place of the record with its "started" (a slice
    records itself when it starts and as each job ends, so that one killed keeps what it did; None: a plan, which
    runs nothing itself)."""
    path = os.path.join(study.out, "study.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    slices = [s for s in old.get("slices", []) if not slice_ or "started" not in s
              or s["started"] != slice_["started"]] + ([slice_] if slice_ else [])
    archs = list(dict.fromkeys(old.get("archs", []) + study.archs))
    seeds_archs = list(dict.fromkeys([a for a in old.get("seeds_archs", []) if old.get("seeds", 1) > 1]
                                     + (study.seeds_archs if study.seeds > 1 else [])))
    record = {"preset": study.preset, "archs": archs, "seeds": max(study.seeds, old.get("seeds", 1)),
              "seeds_archs": seeds_archs, "invocation": invocation,
              "seconds": round(sum(s["seconds"] for s in slices)) if slices else None, "slices": slices}
    write_json(record, path)
