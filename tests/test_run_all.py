"""run_all.sh, study.py and engine/ end to end on the `smoke` preset (synthetic images, a few steps, one network):
one study grows through the steps a user takes (a first seed, a time box too short for anything, a dry run, a
second seed, a rerun) and the tests that only read it share it; the tests that change it work on a copy. The jobs
chain, the table is written, a finished study is skipped on rerun and grows by what is new, an evaluation is redone
when its checkpoint changes, a run whose recorded command differs is made again without losing the old one first, a
failing job stops the study, a time box stops it with the runs kept, and the plan runs under xargs. Also every
preset's commands, and the pool's logic in-process."""
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import run_state
import study as command
from engine import cost, jobs, pool, presets, report, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "mobilenetv3_small_small_s0"


def study(tmp_path, preset="smoke", **env):
    env = {**os.environ, "ARCHS": "mobilenetv3_small", "STUDY_DIR": str(tmp_path), "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": "", "COST": "0", **env}  # a test meant for the CPU, GPU or not; dry runs untimed
    return subprocess.run(["bash", "run_all.sh", preset], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """One smoke study through the steps of a user, two jobs at once: seed 0 (the cost is measured first); seeds 0-1
    in a time box too short for any job; their dry run with its cost; seeds 0-1 (only seed 1 runs). Returns the
    folder and each step's completed process."""
    tmp_path = tmp_path_factory.mktemp("study")
    steps = {"first": study(tmp_path, SEEDS="1", JOBS="2")}
    steps["boxed"] = study(tmp_path, SEEDS="2", JOBS="2", HOURS="0.0001")
    steps["dry"] = study(tmp_path, SEEDS="2", JOBS="2", DRY_RUN="1", COST="1")
    steps["grown"] = study(tmp_path, SEEDS="2", JOBS="2")
    return tmp_path, steps


@pytest.fixture
def finished(grown):
    """(the grown study's folder, its last step)."""
    return grown[0], grown[1]["grown"]


def copy_of(finished, tmp_path, runs=True):
    """The finished study copied to tmp_path (without runs/ but for the cost measured: a clone)."""
    shutil.copytree(finished[0] / "results", tmp_path / "results")
    if runs:
        shutil.copytree(finished[0] / "runs", tmp_path / "runs")
    else:
        (tmp_path / "runs" / "smoke").mkdir(parents=True)
        shutil.copy(finished[0] / "runs" / "smoke" / "cost.json", tmp_path / "runs" / "smoke" / "cost.json")
    return tmp_path


def test_the_study_writes_one_row_per_recipe_and_seed(grown):
    tmp_path, steps = grown
    proc, first = steps["grown"], steps["first"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "results" / "smoke"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["arch"], r["recipe"], r["seed"]) for r in rows] == [
        ("mobilenetv3_small", recipe, seed) for seed in "01" for recipe in ("baseline", "small")]
    pixels = json.load(open(out / "pixels" / "knn.json"))
    for r in rows:
        ref = json.load(open(out / f"mobilenetv3_small_random_s{r['seed']}" / "knn.json"))
        ref_bn = json.load(open(out / f"mobilenetv3_small_random_s{r['seed']}" / "knn_bn.json"))
        assert ref["seed"] == int(r["seed"]) and ref_bn["precise_bn"]
        assert int(r["knn_k"]) == 64  # k 200 asked, the smoke bank's 64 images used: the table says k 64
        assert float(r["knn_random"]) == ref["knn"][1]["top1"] and ref["knn"][1]["k"] == 64
        assert float(r["knn_random_bn"]) == ref_bn["knn"][1]["top1"]
        assert float(r["knn_pixels"]) == pixels["knn"][1]["top1"] and pixels["pixels"]
        assert float(r["knn_gain"]) == pytest.approx(float(r["knn"]) - float(r["knn_random"]), abs=1e-6)
        assert 0 <= float(r["linear_top1"]) <= 100 and float(r["images_per_s"]) > 0
    table = (out / "RESULTS.md").read_text()
    for recipe in ("baseline", "small"):  # pretext accuracy, first -> last epoch, mean +- sd over the seeds' logs
        acc = [[json.loads(line)["epoch_acc"] for line in open(out / f"mobilenetv3_small_{recipe}_s{s}" / "log.jsonl")
                if "epoch_acc" in line] for s in (0, 1)]
        assert f"| mobilenetv3_small | {recipe} | 2 | 1 | {stats.spread([a[0] for a in acc], 1)} -> " in table
    assert "| mobilenetv3_small | 1.52M |" in table  # the references' table
    assert table.strip().splitlines()[-1] in proc.stdout  # the table is printed at the end
    assert (out / "results.svg").read_text().startswith("<svg")
    invocation = json.load(open(out / "study.json"))["invocation"]  # the command that reruns it, subset included
    assert invocation == 'JOBS=2 SEEDS=2 ARCHS="mobilenetv3_small" bash run_all.sh smoke', invocation
    assert first.returncode == 0 and "x 1 seed(s)" in first.stdout, first.stderr[-3000:]


def test_every_command_is_recorded_beside_its_results(grown):
    tmp_path, steps = grown
    out = tmp_path / "results" / "smoke"
    dry = steps["dry"]
    assert dry.returncode == 0, dry.stderr
    jobs = dry.stdout.split("\n# ")[1:]
    assert len(jobs) == 7  # 2 seeds x (2 runs + references) + raw pixels
    for job in jobs:
        name, *commands = job.strip().splitlines()
        kind, *what = name.split()
        folder = ("pixels" if kind == "pixels" else f"{what[0]}_random_s{what[1]}" if kind == "refs"
                  else f"{what[0]}_{what[1]}_s{what[2]}")
        recorded = (out / folder / "command.txt").read_text().splitlines()
        assert [c.removeprefix("OMP_NUM_THREADS=1 ") for c in recorded] == commands, folder
        assert (out / folder / "output.log").stat().st_size > 0


def test_the_two_recipes_differ_as_the_script_says(finished):
    tmp_path, _ = finished
    runs = tmp_path / "runs" / "smoke"
    base = run_state.read_checkpoint(str(runs / "mobilenetv3_small_baseline_s0" / "checkpoint.pt"))["args"]
    small = run_state.read_checkpoint(str(runs / "mobilenetv3_small_small_s1" / "checkpoint.pt"))["args"]
    assert (base["smooth"], base["moco_t"], base["mlp_hidden"], base["seed"]) == (0.0, 0.2, 0, 0)
    assert (small["smooth"], small["moco_t"], small["mlp_hidden"], small["smooth_k"], small["seed"]) == (0.1, 0.1,
                                                                                                       2048, 10, 1)


def test_a_rerun_skips_finished_stages(finished, tmp_path):
    tmp_path = copy_of(finished, tmp_path)
    ckpt = tmp_path / "runs" / "smoke" / RUN / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns
    record = (tmp_path / "results" / "smoke" / "study.json").read_text()
    proc = study(tmp_path, SEEDS="2", JOBS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps/epoch" not in proc.stdout and "kNN top-1" not in proc.stdout  # nothing trained or evaluated
    assert proc.stdout.count(": done, skipped") == 7  # and it says so, job by job (4 runs, 2 refs, pixels)
    assert "timing each network" not in proc.stdout  # nothing to run: no cost probe either
    assert "study smoke: all 7 jobs are done" in proc.stdout and "jobs to run" not in proc.stdout
    assert ckpt.stat().st_mtime_ns == before
    assert (tmp_path / "results" / "smoke" / "RESULTS.md").exists()
    # no slice of nothing: a clone that reruns the tracked study's command keeps its study.json as it was
    assert (tmp_path / "results" / "smoke" / "study.json").read_text() == record
    # without a study.json, the same rerun (in this process) writes one, its slice of nothing closed
    (tmp_path / "results" / "smoke" / "study.json").unlink()
    assert command.main(["smoke", "--archs", "mobilenetv3_small", "--seeds", "2", "--jobs", "1", "--study-dir",
                         str(tmp_path), "--python", sys.executable]) == 0
    slices = json.load(open(tmp_path / "results" / "smoke" / "study.json"))["slices"]
    assert [(s["closed"], s["finished"]) for s in slices] == [(True, [])], slices


def test_the_table_is_rebuilt_from_the_files_alone(finished, tmp_path):
    """report.py OUT_DIR needs nothing but the study's folder (its study.json names what ran)."""
    shutil.copytree(finished[0] / "results" / "smoke", tmp_path / "smoke")
    before = (tmp_path / "smoke" / "RESULTS.md").read_text()
    (tmp_path / "smoke" / "RESULTS.md").unlink()
    proc = subprocess.run([sys.executable, "report.py", str(tmp_path / "smoke")], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "smoke" / "RESULTS.md").read_text() == before
    assert "1 network x 2 recipes" in before and "Linear: a linear classifier on features extracted once" in before
    assert "the last epoch's top-1" in before
    proc = subprocess.run([sys.executable, "report.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "study.json does not exist" in proc.stderr


def refused(argv, capsys):
    """study.py's exit status and stderr for argv, in this process."""
    with pytest.raises(SystemExit) as exit_:
        command.main(argv)
    return exit_.value.code, capsys.readouterr().err


def test_mistakes_are_refused_before_any_folder_is_made(tmp_path, capsys):
    """Dry runs and real runs alike check the networks and the data first; a GPU preset on a CPU says what it would
    cost and stops. Nothing is written under STUDY_DIR. (In this process: study.py decides; run_all.sh hands the
    variables over, which the tests of run_all.sh's own checks below show.)"""
    base = ["--study-dir", str(tmp_path), "--gpus", "0", "--no-cost"]
    for argv, sentence in ((["smoke", "--archs", "resnet19"], "ARCHS names resnet19, not a network of models.py"),
                           (["cifar10", "--data-dir", "/nonexistent"], "--data-dir /nonexistent is not a directory"),
                           (["fmnist"], "run_all.sh fmnist is sized for GPUs"),
                           (["tiny"], "unknown preset 'tiny': choose one of presets/ (")):
        for dry in (["--dry-run"], []):
            if dry and argv == ["fmnist"]:  # a dry run prints the commands: it costs nothing
                assert command.main(argv + base + dry) == 0
                capsys.readouterr()
                continue
            code, err = refused(argv + base + dry, capsys)
            assert code == 2 and sentence in err and len(err.strip().splitlines()) == 1, (argv, dry, err)
    assert "CPU_OK=1 bash run_all.sh fmnist" in refused(["fmnist"] + base, capsys)[1]
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "results")


def test_seeds_archs_mistakes_are_one_sentence(tmp_path, capsys):
    """The issue's SEEDS_ARCHS typo ran one seed under a "3 seed(s)" banner: a network models.py lacks, or one this
    study's ARCHS leaves out, is refused like ARCHS. Nothing is made."""
    base = ["smoke", "--study-dir", str(tmp_path), "--gpus", "0", "--no-cost", "--archs", "mobilenetv3_small",
            "--seeds", "3"]
    for extra, sentence, dry_runs in (
            (["--seeds-archs", "mobilenet_v3_small"], "SEEDS_ARCHS names mobilenet_v3_small, not a network of "
                                                     "models.py: choose from", (True, False)),
            (["--seeds-archs", "resnet18"], "SEEDS_ARCHS names resnet18, not a network of this study (ARCHS: "
                                            "mobilenetv3_small): name networks of ARCHS", (True,))):
        for dry in dry_runs:
            code, err = refused(base + extra + (["--dry-run"] if dry else []), capsys)
            assert code == 2 and sentence in err and len(err.strip().splitlines()) == 1, (extra, dry, err)
    assert not tmp_path.joinpath("runs").exists() and not tmp_path.joinpath("results").exists()
    assert command.main(base + ["--seeds-archs", "mobilenetv3_small", "--dry-run"]) == 0  # the networks of ARCHS
    assert "x 3 seed(s) (seeds past 0: mobilenetv3_small)" in capsys.readouterr().out


def test_run_all_checks_its_own_variables_before_the_set_up(tmp_path):
    """run_all.sh refuses a STUDY_DIR that cannot be a folder, an unknown preset and numbers that are not numbers
    before it builds anything, in one sentence (exit 2); PYTHON names no interpreter, so any set-up would fail."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for env, preset, sentence in (({"STUDY_DIR": str(blocker)}, "smoke",
                                   f"STUDY_DIR={blocker} cannot hold the study's runs/ and results/, as {blocker} is "
                                   f"not a folder: choose another STUDY_DIR."),
                                  ({"STUDY_DIR": str(blocker / "sub")}, "smoke", f"as {blocker} is not a folder"),
                                  ({}, "tiny", "unknown preset 'tiny': choose one of presets/ ("),
                                  ({"SEEDS": "0"}, "smoke", "SEEDS=0 is not a number"),
                                  ({"JOBS": "two"}, "smoke", "JOBS=two is not a number"),
                                  ({"HOURS": "0"}, "smoke", "HOURS=0 is not a number"),
                                  ({"HOURS": "1h"}, "smoke", "HOURS=1h is not a number")):
        proc = study(tmp_path / "study", preset, PYTHON="/nonexistent/python", **env)
        assert proc.returncode == 2 and sentence in proc.stderr, (env, preset, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout, proc.stderr
    assert not (tmp_path / "study").exists() and blocker.read_text() == "not a folder"
    proc = study(tmp_path / "study", ARCHS="resnet19", DRY_RUN="1")  # what study.py refuses, through run_all.sh
    assert proc.returncode == 2 and "ARCHS names resnet19" in proc.stderr, proc.stderr


def test_help_prints_the_usage_before_the_set_up():
    """The header of run_all.sh is its usage; PYTHON names no interpreter, so any set-up would fail."""
    with open(os.path.join(ROOT, "run_all.sh")) as f:
        header = [line for line in f.read().split("\nset -euo pipefail")[0].splitlines()[1:]]
    usage = "".join(line.removeprefix("#").removeprefix(" ") + "\n" for line in header)
    for word in ("--help", "-h", "help"):
        proc = subprocess.run(["bash", "run_all.sh", word], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHON": "/nonexistent/python"})
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, usage, ""), word
    assert "bash run_all.sh [PRESET] [DATA_DIR]" in usage and "\n#" not in usage


def test_the_table_names_the_machine_its_runs_recorded(finished):
    tmp_path, _ = finished
    out = tmp_path / "results" / "smoke"
    summary = json.load(open(out / RUN / "summary.json"))
    here = report.machine_name(summary)
    assert here.startswith(summary["machine"]["cpu"]) and summary["machine"]["torch"] == torch.__version__
    table = (out / "RESULTS.md").read_text()  # 2 seeds x 2 recipes; 13 files: 4 x (kNN, linear), 2 x 2 refs, pixels
    assert f"Machine: pretraining, 4 runs on {here}. Evaluations, 13 files on {here}." in table


def test_a_new_checkpoint_is_evaluated_again(finished, tmp_path):
    """An evaluation names the checkpoint it measured: one written by another pretraining in the same folder (here
    its weights perturbed) gets new kNN and linear results; the other runs' results stay."""
    copy_of(finished, tmp_path)
    out, ckpt = tmp_path / "results" / "smoke", tmp_path / "runs" / "smoke" / RUN / "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=True)
    name = next(k for k in saved["model"] if k.startswith("encoder_q.backbone.") and k.endswith("weight"))
    saved["model"][name] = saved["model"][name] + 0.01
    torch.save(saved, ckpt)
    other = (out / "mobilenetv3_small_baseline_s0" / "knn.json").read_text()
    trained = (out / RUN / "output.log").read_text().count("steps/epoch")
    proc = study(tmp_path, SEEDS="2", JOBS="2")  # the jobs' threads as timed: no new timing of the network
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "study: timing" not in proc.stdout
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for result in ("knn.json", "linear.json"):
        assert json.load(open(out / RUN / result))["ckpt_sha256"] == digest, result
    assert (out / "mobilenetv3_small_baseline_s0" / "knn.json").read_text() == other
    assert (out / RUN / "output.log").read_text().count("steps/epoch") == trained  # the pretraining was complete


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failing_job_stops_the_study_and_builds_no_table(finished, tmp_path, jobs):
    copy_of(finished, tmp_path)
    cost = tmp_path / "runs" / "smoke" / "cost.json"  # timed for one thread per job; taken as it is for any JOBS:
    kept = json.loads(cost.read_text())  # the figures only order the jobs and the ETA, which this test does not read
    if jobs == "1":  # one job at a time gets the study's own OMP_NUM_THREADS
        kept["key"]["threads"] = os.environ.get("OMP_NUM_THREADS")
    cost.write_text(json.dumps(kept))
    table = (tmp_path / "results" / "smoke" / "RESULTS.md").read_text()
    (tmp_path / "results" / "smoke" / RUN / "knn.json").unlink()
    (tmp_path / "runs" / "smoke" / RUN / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = study(tmp_path, SEEDS="2", JOBS=jobs)
    seen = f"exit {proc.returncode}\n--- stdout:\n{proc.stdout[-2000:]}\n--- stderr:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 1 and "study: timing" not in proc.stdout, seen
    assert "is not a readable checkpoint" in proc.stderr, seen  # the end of the job's output.log
    assert "study: the job 'run:mobilenetv3_small:0:small' failed (knn_eval.py exit 1)" in proc.stderr, seen
    assert (tmp_path / "results" / "smoke" / "RESULTS.md").read_text() == table  # the last good table stays


def sleeper(ignore_ctrl_c=False, seconds=300):
    code = ("import signal, time\n" + ("signal.signal(signal.SIGINT, signal.SIG_IGN)\n" if ignore_ctrl_c else "")
            + f"time.sleep({seconds})")
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_stopping_outlives_a_job_that_has_already_ended():
    """A failing job stops the others; one of them may have ended a moment before: stopping it must not fail."""
    done = sleeper(seconds=0)
    done.wait()
    running = sleeper()
    pool.stop([done, running], grace=2)  # where Ctrl-C is ignored (a study started in the background) TERM ends it
    assert running.returncode is not None


def test_stopping_ends_a_job_that_ignores_ctrl_c():
    """Where SIGINT is ignored (a study started in the background by a non-interactive shell), TERM follows."""
    proc = sleeper(ignore_ctrl_c=True)
    time.sleep(1)  # its handler is set
    pool.stop([proc], grace=2)
    assert proc.returncode == -signal.SIGTERM


def test_the_presets_page_is_current_and_no_command_gives_a_flag_twice():
    """docs/presets.md is what tools/presets.py writes today (every preset's commands, as study.py's dry run prints
    them), and no command in it gives a flag twice (the references once got the pretraining's --subset and the
    evaluation's)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import presets as page_tool
    page = page_tool.page()
    assert page == open(os.path.join(ROOT, "docs", "presets.md")).read(), "run: .venv/bin/python tools/presets.py"
    sections = page.split("\n## ")[1:]
    assert [s.split("\n")[0] for s in sections] == presets.presets()
    for section in sections:
        commands = [line.split() for line in section.splitlines() if line.startswith(".venv/bin/python")]
        assert len(commands) == 2 * 3 + 2 + 1  # two runs of three stages, two references, raw pixels
        for argv in commands:
            flags = [w for w in argv if w.startswith("--")]
            assert len(flags) == len(set(flags)), argv


@pytest.mark.parametrize("batch, per_run, splits", [(128, 1, 2), (512, 1, 8), (512, 8, 1), (256, 1, 4), (256, 2, 2),
                                                    (512, 2, 4), (64, 1, 1), (48, 1, 1)])
def test_split_bn_keeps_groups_of_64_images_whatever_the_number_of_processes(batch, per_run, splits):
    # the presets' --bn-group 64: per-process batch / 64 groups, at least one
    assert run_state.bn_splits(batch, per_run, 64) == splits


def test_the_figure_has_a_legend_for_every_mark(finished):
    svg = (finished[0] / "results" / "smoke" / "results.svg").read_text()
    for mark in ("per network: random init (grey), baseline (light), small-model recipe (dark); a dot per seed",
                 "mean ± sd over seeds", "raw pixels (", "one seed: small minus the baseline of that seed",
                 "mean, 95% confidence interval (paired t)", "an interval across 0: within the seed spread",
                 "small-model recipe</text>", "baseline</text>",
                 "one line per run; seed 0 dark, the other seeds light", "mobilenetv3_small</text>"):
        assert mark in svg, mark
    assert 'rotate(-20)" text-anchor="end" font-size="10">mobilenetv3_small' in svg  # labels slanted: no collisions


def test_the_smoke_preset_results_are_not_tracked():
    proc = subprocess.run(["git", "check-ignore", "-q", "results/smoke/RESULTS.md"], cwd=ROOT)
    assert proc.returncode == 0, "results/smoke/ must be git-ignored: a smoke study claims nothing"


def test_a_clone_keeps_results_whose_commands_mean_todays_and_reruns_the_others(finished, tmp_path):
    """A clone holds a study's results without their checkpoints, recorded in another folder: runs whose recorded
    commands mean what the study runs now are kept (paths, interpreter and flag order aside) and said so; a run whose
    command differs is named and rerun, in .staging/ until it has finished, then takes the old one's place."""
    results = copy_of(finished, tmp_path, runs=False) / "results" / "smoke"
    changed = results / RUN / "command.txt"
    changed.write_text(changed.read_text().replace("--moco-t 0.1", "--moco-t 0.3", 1))
    old_summary = (results / RUN / "summary.json").read_text()
    seen_in_staging = []
    proc = subprocess.Popen(["bash", "run_all.sh", "smoke"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "ARCHS": "mobilenetv3_small", "SEEDS": "2",
                                            "STUDY_DIR": str(tmp_path), "PYTHON": sys.executable,
                                            "CUDA_VISIBLE_DEVICES": ""})
    while proc.poll() is None:  # while it trains, the old results are in place
        if (tmp_path / "results" / "smoke" / ".staging" / RUN).exists():
            seen_in_staging.append((results / RUN / "summary.json").read_text() == old_summary)
        time.sleep(0.2)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert (f"study: made again, its recorded command differs from today's: {RUN} pretrain: --moco-t 0.3, not 0.1; "
            f"it trains again in .staging/") in out, out
    assert "study: 3 run(s) kept" in out and "no checkpoint" in out, out
    assert seen_in_staging and all(seen_in_staging)
    assert not (results / ".staging").exists() and (results / RUN / "summary.json").read_text() != old_summary
    assert "--moco-t 0.1" in (results / RUN / "command.txt").read_text().splitlines()[0]
    assert out.count(": done, skipped") == 6  # all but the changed run
    assert not (tmp_path / "runs" / "smoke" / "mobilenetv3_small_baseline_s1").exists()  # kept, never retrained


def test_the_cost_is_measured_once_a_time_box_starts_nothing_that_cannot_finish_and_more_seeds_add_runs(grown):
    """The first study times the network here (the figures kept for this machine and preset). SEEDS=2 in a box too
    short for any job says what the rest will cost, starts nothing and says how to continue (exit 3); the dry run
    says the cost too; the same command without the box runs seed 1's jobs and nothing else, with the figures kept;
    RESULTS.md records every slice."""
    tmp_path, steps = grown
    assert "timing each network's training step" in steps["first"].stdout, steps["first"].stdout
    boxed = steps["boxed"]
    assert boxed.returncode == 3, boxed.stderr[-3000:]
    assert "timing each network" not in boxed.stdout
    assert re.search(r"study smoke: 3 of 7 jobs to run \(2 pretraining\(s\)\) on a CPU of \d+ cores, 2 at once: "
                     r"about \d\d:\d\d:\d\d here", boxed.stdout), boxed.stdout
    assert "study: the time box ends; 4 of 7 jobs done (run:mobilenetv3_small:1:baseline, " \
           "run:mobilenetv3_small:1:small, refs:mobilenetv3_small:1 left): run the same command again to continue." \
           in boxed.stdout
    assert re.search(r"study smoke: 3 of 7 jobs left, about \d\d:\d\d:\d\d here with 2 at once", steps["dry"].stderr)
    proc = steps["grown"]
    assert proc.returncode == 0 and "timing each network" not in proc.stdout, proc.stdout
    assert proc.stdout.count(": done, skipped") == 4  # seed 0's runs, its references, raw pixels
    slices = json.load(open(tmp_path / "results" / "smoke" / "study.json"))["slices"]
    assert [len(s["finished"]) for s in slices] == [4, 0, 3]  # seed 0 (4 jobs); the box; seed 1
    assert all(s["closed"] for s in slices)  # each wrote its record as it went, and closed it
    assert sorted(slices[-1]["finished"]) == ["refs:mobilenetv3_small:1", "run:mobilenetv3_small:1:baseline",
                                              "run:mobilenetv3_small:1:small"] and slices[-1]["predicted_s"] > 0
    table = (tmp_path / "results" / "smoke" / "RESULTS.md").read_text()
    assert "## How the study ran" in table and 'HOURS=0.0001 bash run_all.sh smoke` |' in table


def sleeping_job(tmp_path, monkeypatch):
    """A job of one stage that sleeps, its prediction 0 (and its output.log showing how it was stopped)."""
    st = jobs.Study("smoke", ["mobilenetv3_small"], study_dir=str(tmp_path), jobs=1)
    job = jobs.Line(st, "pixels").jobs[0]
    stage = jobs.Stage(["-c", "import time; time.sleep(300)"], str(tmp_path / "never.json"), str(tmp_path / "res"))
    monkeypatch.setattr(job, "left", lambda: jobs.Left(str(tmp_path / "res"), None, None, [stage]))
    monkeypatch.setattr(pool.Estimate, "cost", lambda self, job: 0.0)
    return st, job


def test_the_time_box_stops_a_running_job_like_ctrl_c(tmp_path, monkeypatch):
    """At the box's end the running stage gets Ctrl-C (pretrain.py saves and stops), the study says so (exit 3)."""
    st, job = sleeping_job(tmp_path, monkeypatch)
    start = time.time()
    assert pool.Pool(st, [job], {}, dict(os.environ), deadline=time.time() + 3).run() == "time box"
    assert time.time() - start < 30
    assert "KeyboardInterrupt" in (tmp_path / "res" / "output.log").read_text()  # stopped by Ctrl-C, not killed


def test_the_eta_follows_a_running_pretraining_by_its_steps(tmp_path):
    """A pretraining that has logged 100 of its 400 steps in 60 s has 180 s left, whatever its prediction said;
    before its first logged step, the prediction less the time it has run."""
    st = jobs.Study("smoke", ["mobilenetv3_small"], study_dir=str(tmp_path), jobs=1)
    job = jobs.Line(st, "run", "mobilenetv3_small", 0).jobs[0]
    stage = job.left().stages[0]
    speeds = {"mobilenetv3_small": {r: {"step_s": 1.0, "start_s": 0.0, "steps": 400, "images": 64} for r in
                                    presets.RECIPES} | {"eval_image_s": 0.0, "eval_start_s": 0.0, "classes": 10}}
    p = pool.Pool(st, [], speeds, {})
    slot = {"job": job, "stages": [stage], "stage_start": time.time() - 60, "stage_step": 0,
            "stage_cost": cost.stage_cost(job, stage, speeds)}
    # nothing logged: the prediction, 400 s, less the 60 s it has run
    assert p.estimate.remaining(slot) == pytest.approx(400 - 60, abs=1)
    os.makedirs(stage.run)
    with open(os.path.join(stage.run, "log.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 0, "step": 100, "loss": 1.0}) + "\n")
    assert p.estimate.remaining(slot) == pytest.approx(180, abs=1)
    # a resumed run whose log held step 100 at launch: its own progress counts from there (150: 50 steps in 60 s)
    slot["stage_step"] = 100
    assert p.estimate.remaining(slot) == pytest.approx(400 - 60, abs=1)
    with open(os.path.join(stage.run, "log.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": 0, "step": 150, "loss": 1.0}) + "\n")
    assert p.estimate.remaining(slot) == pytest.approx(60 * 250 / 50, abs=1)


def test_a_run_finished_in_staging_but_not_moved_is_moved_by_the_next_study(finished, tmp_path):
    """A study stopped between a staged run's last stage and its move (Ctrl-C, the box, SIGKILL) leaves the new run
    complete in .staging/ and the old one in place: the next study moves it, and runs nothing."""
    copy_of(finished, tmp_path)
    st = jobs.Study("smoke", ["mobilenetv3_small"], seeds=2, study_dir=str(tmp_path), jobs=1)
    job = jobs.Line(st, "run", "mobilenetv3_small", 0).jobs[1]
    res, run = job.folders()
    staged = (jobs.staging_dir(res), jobs.staging_dir(run))
    for final, staging in zip((res, run), staged):
        shutil.copytree(final, staging)
    old = os.path.join(res, "summary.json")
    with open(old) as f:
        summary = json.load(f)
    with open(old, "w") as f:
        json.dump({**summary, "complete": False}, f)  # the old run, which the staged one replaces
    left = job.left()
    assert left.staged and not left.stages and not job.done()
    assert pool.Pool(st, [job], {}, dict(os.environ)).run() == "done"
    assert job.done() and not os.path.exists(staged[0]) and json.load(open(old))["complete"]


def test_the_newest_recorded_command_counts_even_where_todays_script_cannot_read_it(tmp_path):
    """command.txt keeps every command a stage ran: the last one decides, and one with a flag today's script does
    not know is not today's (and says so), not skipped for an older one."""
    st = jobs.Study("smoke", ["mobilenetv3_small"], study_dir=str(tmp_path), jobs=1)
    job = jobs.Line(st, "pixels").jobs[0]
    stage = job.left().stages[0]
    os.makedirs(stage.results)
    with open(stage.output, "w") as f:
        json.dump({"knn": []}, f)
    today = shlex.join(stage.argv)
    with open(os.path.join(stage.results, "command.txt"), "w") as f:
        f.write(f"python {today}\n")
    assert jobs.done(stage)
    with open(os.path.join(stage.results, "command.txt"), "a") as f:
        f.write(f"python {today} --flag-of-a-later-version\n")
    why = []
    assert not jobs.done(stage, why) and why == ["pixels knn.json: a command today's script cannot read"], why


def test_a_resumed_run_is_predicted_to_take_what_is_left_of_it(tmp_path):
    """The prediction of a pretraining with a checkpoint covers the steps after it: slice 2 of the demo resumed a run
    at step 850 of 936, counted its 2 min against a full run's 9 and corrected every later ETA by that pace."""
    st = jobs.Study("smoke", ["mobilenetv3_small"], study_dir=str(tmp_path), jobs=1)
    job = jobs.Line(st, "run", "mobilenetv3_small", 0).jobs[0]
    speeds = {"mobilenetv3_small": {recipe: {"step_s": 2.0, "start_s": 5.0, "steps": 100, "images": 64}
                                    for recipe in presets.RECIPES} | {"eval_image_s": 0.0, "eval_start_s": 0.0,
                                                                      "classes": 10}}
    pretraining = job.left().stages[0]
    assert pretraining.script == "pretrain.py"
    whole = cost.stage_cost(job, pretraining, speeds)
    os.makedirs(pretraining.run)
    torch.save({"step": 75}, os.path.join(pretraining.run, "checkpoint.pt"))
    assert cost.stage_cost(job, pretraining, speeds) == pytest.approx(5.0 + (whole - 5.0) / 4)


@pytest.mark.slow
def test_the_plan_runs_under_xargs_and_gives_the_same_table(finished, tmp_path):
    """PLAN=1 prints one self-contained line per job; run by xargs -P 2 in any order, then report.py, they give the
    runs and table of run_all.sh itself."""
    plan = study(tmp_path, PLAN="1")  # seed 0: the pair, its references, raw pixels
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.strip().splitlines()
    assert len(lines) == 3 and all("study.py smoke --job" in line for line in lines)
    proc = subprocess.run(["xargs", "-P", "2", "-I", "{}", "sh", "-c", "{}"], input="\n".join(reversed(lines)),
                          cwd="/", capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "report.py", str(tmp_path / "results" / "smoke")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    keys = ("arch", "recipe", "seed", "knn", "knn_random", "knn_random_bn", "knn_pixels", "linear_top1", "instance_acc")
    mine, theirs = (list(csv.DictReader(open(d / "results" / "smoke" / "results.csv")))
                    for d in (tmp_path, finished[0]))
    theirs = [r for r in theirs if r["seed"] == "0"]
    assert [[r[k] for k in keys[:3]] for r in mine] == [[r[k] for k in keys[:3]] for r in theirs]
    for a, b in zip(mine, theirs):  # the same commands on the same machine and threads: the same numbers
        assert [float(a[k]) for k in keys[3:]] == pytest.approx([float(b[k]) for k in keys[3:]], abs=1e-6)


def test_commands_mean_the_same_whatever_their_paths_order_and_split_bn_spelling():
    """jobs.meaning: what decides whether a recorded command is today's. Paths, run control and flag order do not
    count; --bn-group 64 and the --bn-splits it makes on that many processes are one setting; a drawn picture and
    every training flag do count; --reestimate-bn is --precise-bn's older name; a command today's script cannot
    read is not today's."""
    old = ["pretrain.py", "--arch", "resnet18", "--bn-splits", "2", "--batch-size", "128", "--out", "/a", "--lr",
           "0.03"]
    new = ["pretrain.py", "--lr", "0.03", "--batch-size", "128", "--arch", "resnet18", "--bn-group", "64", "--out",
           "/b/c", "--resume", "--workers", "0"]
    assert jobs.meaning(old) == jobs.meaning(new)
    assert jobs.meaning(old) != jobs.meaning(new, processes=2)  # 64 images per process: one group each
    assert jobs.difference(jobs.meaning(old + ["--moco-t", "0.1"]), jobs.meaning(new)) == "--moco-t 0.1, not 0.2"
    knn = ["knn_eval.py", "--arch", "resnet18", "--random-init", "--k", "20", "200", "--json", "/a/knn.json"]
    assert jobs.meaning(knn + ["--reestimate-bn"]) == jobs.meaning(knn + ["--precise-bn"])
    assert jobs.meaning(knn + ["--neighbours", "/a/n.png"]) == jobs.meaning(knn + ["--neighbours", "/b/n.png"])
    assert jobs.meaning(knn + ["--neighbours", "/a/n.png"]) != jobs.meaning(knn)
    assert jobs.meaning(knn + ["--chunk", "64", "--workers", "3"]) == jobs.meaning(knn)  # how fast, not what
    assert jobs.meaning(knn + ["--flag-of-a-later-version"]) is None


def test_a_preset_file_can_read_another_and_the_commands_are_resolved_by_the_scripts_parsers():
    """cifar10 is the fmnist preset on CIFAR-10: its files read fmnist's (@FILE) and its --data, given last, wins.
    The commands a study runs are the preset's flags as the scripts' own parsers read them, each flag once."""
    fmnist = jobs.Study("fmnist", ["resnet18"]).pretrain_command("resnet18", "small", 0, "OUT")
    cifar = jobs.Study("cifar10", ["resnet18"]).pretrain_command("resnet18", "small", 0, "OUT")
    assert cifar == [w if w != "fashionmnist" else "cifar10" for w in fmnist]
    demo = jobs.Study("demo", ["resnet18"]).pretrain_command("resnet18", "small", 0, "OUT")
    import pretrain
    args = pretrain.get_args(["@presets/demo/pretrain.args", "@recipes/small.args", "@presets/demo/small.args",
                              "--arch", "resnet18", "--seed", "0", "--out", "OUT", "--resume"])
    assert vars(pretrain.get_args(demo[1:])) == vars(args)  # the resolved command means the @FILE one
    assert len([w for w in demo if w.startswith("--")]) == len({w for w in demo if w.startswith("--")})
