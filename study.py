"""The study engine's command: what `bash run_all.sh PRESET` runs after its set-up.

    python3 study.py demo                          # the study: its jobs, their cost here, the pool, the table
    python3 study.py demo --dry-run                # every command, resolved, and what it would cost; nothing runs
    python3 study.py demo --plan                   # one self-contained line per pair of runs or reference job
    python3 study.py demo --job run:resnet18:0     # one line of the plan (both recipes' runs of a network and seed)
    python3 study.py demo --hours 2.5              # a time-boxed slice; run it again to continue

A study is a preset (presets/NAME/, engine/presets.py) over networks and seeds; the machinery is engine/: its jobs
and which are done (jobs.py), what they cost here (cost.py), the pool that runs them (pool.py), the table, its
statistics and figure (report.py, stats.py, figure.py; the command report.py rebuilds them). A study grows: a job
whose results are there and whose recorded commands mean today's is done, an interrupted pretraining resumes, a run
whose command differs is made again in .staging/ and replaces its old results only when it has finished.
Exit status: 0 the study is complete, 1 a job failed, 2 the user's mistake, 3 stopped by --hours with jobs left,
130 interrupted.
"""
import argparse
import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import time

import data
import run_state
from engine import presets
from engine.cost import breakdown, prediction, torch_device
from engine.jobs import Study, describe_kept, write_record
from engine.pool import STUDY_LOCK, Pool, write
from evaluation import machine, one_writer, utc

ROOT = presets.ROOT
# presets sized for GPUs, and what one would cost on a 2-core CPU (bench.py's small-stem speed: docs/performance.md)
GPU_PRESETS = {"fmnist": "about 100 days for its pretrainings alone", "cifar10": "about 100 days for its "
               "pretrainings alone", "imagenet": "years"}


def get_args(argv=None):
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
    a("--plan", action="store_true", help="one self-contained command line per pair of runs or reference job")
    a("--job", default=None, help="run one line of the plan (run:ARCH:SEED, refs:ARCH:SEED, pixels)")
    a("--python", default=None, help="the interpreter of every stage (default: this one)")
    a("--gpus", type=data.int_flag(0, 1024), default=None, help="GPUs torch can use (default: counted)")
    a("--invocation", default=None, help="the command the user typed, for study.json")
    a("--cpu-ok", action="store_true", help="run a preset sized for GPUs on a CPU anyway")
    a("--no-cost", dest="cost", action="store_false", help="--dry-run: print the commands alone, time nothing")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    import models
    import torch
    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    archs = args.archs or list(models.STUDY)
    nproc = os.cpu_count() or 1
    jobs = args.jobs or (1 if gpus else min(2, nproc))
    check(args, archs)
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
    if args.job:
        return run_line(study, args.job, env)
    if args.plan:
        return plan(study, args, env)
    print(f"study {args.preset}: {len(archs)} network(s) x 2 recipes x {args.seeds} seed(s)"
          + (f" (seeds past 0: {' '.join(study.seeds_archs)})" if args.seeds_archs is not None else "")
          + f" on {where(study)}, {jobs} job(s) at once (JOBS=N to change); results in {study.out}", flush=True)
    if args.dry_run:
        return dry_run(study, args, env)
    with one_writer(study.out, name=STUDY_LOCK), closed_terminal_as_ctrl_c():  # one study at a time in a folder
        return run_study(study, args, env)


@contextlib.contextmanager
def closed_terminal_as_ctrl_c():
    """A closed terminal (SIGHUP) is Ctrl-C while the study runs, before and after its pool too (which stops its
    jobs the same way); where SIGHUP was ignored when the study started (nohup), it stays ignored."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGHUP, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def where(study):
    return f"{study.gpus} GPU(s)" if study.gpus else f"a CPU of {os.cpu_count() or 1} cores"


def check(args, archs):
    """The command's mistakes, each one sentence (exit 2) before any folder is made; dry runs included."""
    import models
    presets.check(args.preset)
    for variable, names in (("ARCHS", archs), ("SEEDS_ARCHS", args.seeds_archs or [])):
        unknown = [a for a in names if a not in models.ARCHS]
        if unknown:
            fail(f"{variable} names {' '.join(unknown)}, not a network of models.py: choose from "
                 f"{' '.join(models.ARCHS)}.")
    outside = [a for a in args.seeds_archs or [] if a not in archs]
    if outside:
        fail(f"SEEDS_ARCHS names {' '.join(outside)}, not a network of this study (ARCHS: {' '.join(archs)}): name "
             f"networks of ARCHS, which get every seed.")


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


def dry_run(study, args, env):
    """Every command of every job, and (unless --no-cost, or a GPU preset here) what the jobs left would cost."""
    for line in study.lines():
        for job in line.jobs:
            print(f"# {job.kind} " + " ".join(str(x) for x in (job.arch, job.label, job.seed)) if job.is_run else
                  f"# {job.kind}" + (f" {job.arch} {job.seed}" if job.arch else ""))
            for st in job.stages(*job.folders()):
                print(shlex.join(study.launcher(st.script) + st.argv))
    if args.cost and not (args.preset in GPU_PRESETS and not study.gpus):  # on stderr, after the commands
        say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        todo = [j for j in study.all_jobs() if not j.done()]
        _, _, predicted = prediction(study, todo, env, say)
        say(f"study {args.preset}: {len(todo)} of {len(study.all_jobs())} jobs left, about "
            f"{run_state.duration(predicted)} here with {study.jobs} at once")
    return 0


def plan(study, args, env):
    """study.json as planned (earlier slices kept; report.py reads it), then one self-contained line per line of
    the plan, runnable in any order on any machine with the project and the data."""
    with one_writer(study.out, name=STUDY_LOCK):  # not while a study is running there
        write_record(study, args.invocation or shlex.join(sys.argv))
    python = study.python if os.sep not in study.python else os.path.join(ROOT, study.python)  # from any folder
    threads = [f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in env else []
    for line in study.lines():
        print(shlex.join(threads + [python, os.path.join(ROOT, "study.py"), args.preset, "--job", line.name,
                                    "--study-dir", os.path.abspath(args.study_dir)]
                         + (["--data-dir", args.data_dir] if args.data_dir else [])
                         + ["--archs", *study.archs, "--seeds", str(args.seeds)]
                         + (["--seeds-archs", *args.seeds_archs] if args.seeds_archs is not None else [])))
    return 0


def run_line(study, name, env):
    """One line of the plan, in the foreground, its jobs one after the other (no cost measured: it just runs)."""
    match = [line for line in study.lines() if line.name == name]
    if not match:
        raise SystemExit(f"--job {name} is not a line of this study's plan: "
                         f"{', '.join(line.name for line in study.lines())}.")
    study.jobs = 1
    return 0 if Pool(study, match[0].jobs, {}, env).run() == "done" else 130


def run_study(study, args, env):
    say = lambda line: write(sys.stdout, line + "\n")  # noqa: E731
    everything = study.all_jobs()
    for line in describe_kept(study, everything):
        say(line)
    started = time.time()
    todo = [j for j in everything if not j.done()]
    speeds, each, predicted = prediction(study, todo, env, say)
    if todo:
        runs = sum(1 for j in todo if j.left().stages[0].script == "pretrain.py")
        say(f"study {study.preset}: {len(todo)} of {len(everything)} jobs to run ({runs} pretraining(s)) on "
            f"{where(study)}, {study.jobs} at once: about {run_state.duration(predicted)} here, from the step and "
            f"evaluation speeds timed on this machine (one job after another: "
            + ", ".join(f"{k} {run_state.duration(v)}" for k, v in breakdown(todo, speeds).items()) + ")"
            + (f"; time box {args.hours:g} h" if args.hours else "") + f"; results in {study.out}")
    else:
        say(f"study {study.preset}: all {len(everything)} jobs are done; the table is rebuilt from their files in "
            f"{study.out} (study.json unchanged: nothing ran)")
    deadline = started + args.hours * 3600 if args.hours else None
    invocation = args.invocation or shlex.join(sys.argv)
    recorded = todo or not os.path.exists(os.path.join(study.out, "study.json"))  # decided once: the first write
    # below makes the file
    made = machine(started, torch_device())  # once (it asks git): each write below moves its end alone

    def record(closed):
        """This slice in study.json: written when it starts and as each job ends ("closed": false, so that a slice
        killed without a word keeps what it finished), and once more as it ends."""
        if recorded:
            write_record(study, invocation, {
                "invocation": invocation, "started": started, "closed": closed,
                "machine": {**made, "end": utc(time.time())}, "jobs": study.jobs, "predicted_s": round(predicted),
                "seconds": round(time.time() - started), "finished": [j.name for j, cost, _ in pool.finished if cost]})

    pool = Pool(study, everything, speeds, env, deadline, predicted=each,  # the finished ones say "done, skipped"
                on_end=lambda: record(False))
    record(False)
    try:
        outcome = pool.run()  # a failing job ends the study here (SystemExit, exit 1): no table of a broken study
    finally:
        record(True)
    subprocess.run([study.python, os.path.join(ROOT, "report.py"), study.out], cwd=ROOT)  # the table so far
    left = [j for j in everything if not j.done()]
    if outcome == "interrupted":
        say(f"study: interrupted; {len(everything) - len(left)} of {len(everything)} jobs done: run the same command "
            f"again to continue.")
        return 130
    if left:
        say(f"study: the time box ends; {len(everything) - len(left)} of {len(everything)} jobs done "
            f"({', '.join(j.name for j in left)} left): run the same command again to continue.")
        return 3
    say(f"study: complete in {run_state.duration(time.time() - started)} (predicted "
        f"{run_state.duration(predicted)}); the table: {study.out}/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
