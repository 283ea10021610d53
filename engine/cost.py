"""What a study's jobs cost on this machine: measured before anything runs, then predicted job by job.

The measurement runs the preset's own pretrain.py for one untimed and PROBE_STEPS timed steps of each recipe, and
knn_eval.py on a small bank, per network, with the threads a job will get; it is kept in runs/PRESET/cost.json for
this machine and preset (a few seconds per network). A job's prediction is its stages': a pretraining's steps left
(a resumed run: those after its checkpoint) and kNN monitors, an evaluation's images through the network, each plus
its process's start. The study's is the jobs' predictions placed on the JOBS slots in order (makespan).
"""
import json
import os
import subprocess
import tempfile
import time

import data
import run_state
from engine.presets import RECIPES, ROOT
from evaluation import machine

PROBE_STEPS = 4  # timed pretraining steps of the measurement, after one untimed


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
    """(seconds per image through the network in evaluation, seconds to start, the data set's classes):
    knn_eval.py on a small bank."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = study.eval_command("knn_eval.py", ["--arch", arch, "--random-init", *study.data_flags()],
                                  ["--subset", "512", "--test-subset", "256", "--k", "20", "--json",
                                   os.path.join(tmp, "knn.json")])
        start = time.time()
        proc = subprocess.run([study.python] + argv, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"timing {arch}'s evaluation failed: {proc.stderr.strip().splitlines()[-1]}")
        results = json.load(open(os.path.join(tmp, "knn.json")))
    return results["seconds"] / 768, time.time() - start - results["seconds"], results["num_classes"]


def measure(study, archs, env, say=print):
    """{arch: the speeds measured}, from runs/PRESET/cost.json when they were measured on this machine for these
    settings, else measured now (a few seconds per network and recipe) and kept there."""
    path = os.path.join(study.runs, "cost.json")
    commands = [study.pretrain_command("resnet18", r, 0, "OUT") for r in RECIPES] + [
        study.eval_command(script, ["--random-init"], ["--json", "OUT.json"])
        for script in ("knn_eval.py", "linear_eval.py")]
    key = {"machine": machine_key(), "threads": env.get("OMP_NUM_THREADS"), "commands": commands,
           "data_dir": study.data_dir, "per_run": study.per_run}
    kept = json.load(open(path)) if os.path.exists(path) else {}
    if kept.get("key") != json.loads(json.dumps(key)):
        kept = {"key": key, "archs": {}}
    todo = [a for a in archs if a not in kept["archs"]]
    if todo:
        say(f"study: timing each network's training step and evaluation here ({', '.join(todo)}), once for this "
            f"machine and preset")
    for arch in todo:
        speeds = {}
        for recipe in RECIPES:
            step_s, start_s, steps, images = probe_pretraining(study, arch, recipe, env)
            speeds[recipe] = {"step_s": step_s, "start_s": start_s, "steps": steps, "images": images}
        speeds["eval_image_s"], speeds["eval_start_s"], speeds["classes"] = probe_evaluation(study, arch, env)
        kept["archs"][arch] = speeds
        say(f"  {arch}: a training step takes {speeds['baseline']['step_s']:.2f} s (baseline), "
            f"{speeds['small']['step_s']:.2f} s (small); {speeds['baseline']['steps']} steps per run")
        os.makedirs(study.runs, exist_ok=True)
        with open(path, "w") as f:
            json.dump(kept, f, indent=2)
    return kept["archs"]


def bank_images(args, speeds):
    """(bank, test) images of an evaluation as its flags say: --subset / --test-subset, else the pretraining's
    images and the 10k test images of the data sets here."""
    bank = data.subset_size(args.subset, speeds["baseline"]["images"], speeds["classes"])
    test = data.subset_size(args.test_subset, 10000, speeds["classes"])
    return bank, test


def job_cost(job, speeds):
    """Predicted seconds of what is left of a job, its stages' summed; 0 where nothing was measured (a plan's job
    runs without a prediction)."""
    if not speeds:
        return 0.0
    return sum(stage_cost(job, st, speeds) for st in job.left().stages)


def stage_cost(job, st, speeds):
    """Predicted seconds of one stage: a pretraining's steps left and its kNN monitors; an evaluation as images
    through the network (kNN with diagnostics about twice its bank and queries, precise BN one more pass over the
    bank; raw pixels as a kNN without a network's diagnostics); each plus its process's start."""
    s = job.study
    f = speeds[job.arch] if job.arch else next(iter(speeds.values()))
    per, start = f["eval_image_s"], f["eval_start_s"]
    args = st.args
    if st.script == "pretrain.py":
        r = f[job.label]
        monitors = args.knn_every and args.epochs // args.knn_every + 1
        knn = 2 * data.subset_size(args.knn_subset, bank_images(s.eval_args, f)[0], f["classes"])
        left = 1 - min(run_state.saved_step(st.run) or 0, r["steps"]) / r["steps"]  # a resumed run: what is left
        return r["start_s"] + left * (r["steps"] * r["step_s"] + monitors * knn * per)
    bank, test = bank_images(args, f)
    if st.script == "linear_eval.py":
        return start + ((1 if args.cached else args.epochs) * bank + test) * per
    if job.kind == "pixels":
        return start + (bank + test) * per
    return start + ((2 if args.diagnostics else 1) * (bank + test) + (bank if args.precise_bn else 0)) * per


def breakdown(jobs, speeds):
    """Predicted seconds of pretraining, of the runs' evaluations and of the references (raw pixels included), one
    job after another: what the study's cost is made of."""
    seconds = {"pretraining": 0.0, "evaluation": 0.0, "references": 0.0}
    for job in jobs:
        for st in job.left().stages:
            kind = "pretraining" if st.script == "pretrain.py" else "evaluation" if job.is_run else "references"
            seconds[kind] += stage_cost(job, st, speeds)
    return seconds


def makespan(costs, slots, running=()):
    """Seconds until JOBS slots have worked through `costs` in order, each job to the first free slot, the slots
    busy for `running` seconds first."""
    free = sorted(list(running) + [0.0] * (slots - len(running)))
    for c in costs:
        free[0] += c
        free.sort()
    return max(free) if free else 0.0


def prediction(study, jobs, env, say):
    """(speeds, {job: its predicted seconds}, the study's predicted seconds) of the jobs, measured or read here."""
    speeds = measure(study, sorted({j.arch for j in jobs if j.arch}) or study.archs[:1], env, say) if jobs else {}
    each = {job: job_cost(job, speeds) for job in jobs}
    return speeds, each, makespan(list(each.values()), study.jobs)
