"""run_all.sh and study.py, end to end on the `smoke` preset (synthetic images, a few steps, one network): the jobs
chain, the table is written, a finished study is skipped on rerun and grows by what is new, an evaluation is redone
when its checkpoint changes, a run whose recorded command differs is rerun without losing the old one first, a
failing job stops the study, a time box stops it with the runs kept, and the plan runs under xargs. Also report.py's
statistics and every preset's commands."""
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import signal
import sys
import time

import pytest
import torch

import report
import run_state
import study as engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "mobilenetv3_small_small_s0"


def study(tmp_path, preset="smoke", **env):
    env = {**os.environ, "ARCHS": "mobilenetv3_small", "STUDY_DIR": str(tmp_path), "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": "", "COST": "0", **env}  # a test meant for the CPU, GPU or not; dry runs untimed
    return subprocess.run(["bash", "run_all.sh", preset], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    return tmp_path, study(tmp_path, SEEDS="2", JOBS="2")


def test_the_study_writes_one_row_per_recipe_and_seed(finished):
    tmp_path, proc = finished
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
        first = report.spread([a[0] for a in acc], 1)
        assert f"| mobilenetv3_small | {recipe} | 2 | 1 | {first} -> " in table  # seeds 2, epochs 1
    assert "| mobilenetv3_small | 1.52M |" in table  # the references' table
    assert table.strip().splitlines()[-1] in proc.stdout  # the table is printed at the end
    assert (out / "results.svg").read_text().startswith("<svg")
    invocation = json.load(open(out / "study.json"))["invocation"]  # the command that reruns it, subset included
    assert invocation == 'JOBS=2 SEEDS=2 ARCHS="mobilenetv3_small" bash run_all.sh smoke', invocation


def test_every_command_is_recorded_beside_its_results(finished):
    tmp_path, _ = finished
    out = tmp_path / "results" / "smoke"
    dry = study(tmp_path, SEEDS="2", DRY_RUN="1")
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


def test_a_rerun_skips_finished_stages(finished):
    tmp_path, first = finished
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


def test_every_tracked_table_is_what_report_py_makes_of_its_files(tmp_path):
    """Each tracked study folder (results/**/study.json) rebuilds, from its JSON and logs alone, to the tables, the
    CSV and the figure that are tracked beside them: no table in the repository holds a number its files do not (the
    line naming the code is left out: it compares the results' commits with whatever checkout runs the test)."""
    listed = subprocess.run(["git", "ls-files", "results/*/study.json", "results/**/study.json"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    folders = sorted({os.path.dirname(path) for path in listed})
    assert {"results/demo", "results/probes/mnv3s_6seeds"} <= set(folders), folders

    def without_code_line(text):
        return [line for line in text.splitlines() if not (line.startswith("`") and " Code: " in line)]

    for folder in folders:
        copy = tmp_path / folder
        shutil.copytree(os.path.join(ROOT, folder), copy)
        for name in ("RESULTS.md", "results.csv", "results.svg"):
            (copy / name).unlink()
        proc = subprocess.run([sys.executable, "report.py", str(copy)], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, (folder, proc.stderr[-2000:])
        tracked = open(os.path.join(ROOT, folder, "RESULTS.md")).read()
        assert without_code_line((copy / "RESULTS.md").read_text()) == without_code_line(tracked), (
            f"{folder}/RESULTS.md: rebuild it with report.py {folder}")
        for name in ("results.csv", "results.svg"):
            assert (copy / name).read_text() == open(os.path.join(ROOT, folder, name)).read(), f"{folder}/{name}"


def test_the_readme_table_is_the_demo_study_summary():
    """The README's results table is results/demo/RESULTS.md's summary, row for row: a rebuilt study that changes a
    number fails here until the README says it too."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    summary = open(os.path.join(ROOT, "results", "demo", "RESULTS.md")).read().split("\n## Summary\n", 1)[1]
    summary_rows = [line for line in summary.split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    assert len(rows) == 7 and rows == summary_rows, "copy results/demo/RESULTS.md's summary table into the README"


def test_mistakes_are_refused_before_any_folder_is_made(tmp_path):
    """Dry runs and real runs alike check the networks and the data first; a GPU preset on a CPU says what it would
    cost and stops. Nothing is written under STUDY_DIR."""
    for env, preset, sentence in (({"ARCHS": "resnet19"}, "smoke", "ARCHS names resnet19, not a network of models.py"),
                                  ({"DATA_DIR": "/nonexistent"}, "cifar10", "--data-dir /nonexistent is not a "
                                                                            "directory"),
                                  ({}, "fmnist", "run_all.sh fmnist is sized for GPUs")):
        for dry in ("1", ""):
            proc = study(tmp_path, preset, DRY_RUN=dry, **env)
            if dry and preset == "fmnist":  # a dry run prints the commands: it costs nothing
                assert proc.returncode == 0, proc.stderr
                continue
            assert proc.returncode == 2 and sentence in proc.stderr, (env, dry, proc.stderr)
    assert "CPU_OK=1 bash run_all.sh fmnist" in proc.stderr
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "results")


def test_seeds_archs_and_study_dir_mistakes_are_one_sentence(tmp_path):
    """The issue's SEEDS_ARCHS typo ran one seed under a "3 seed(s)" banner: a network models.py lacks, or one this
    study's ARCHS leaves out, is refused like ARCHS; so is a STUDY_DIR that cannot be a folder. Nothing is made."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    folder = tmp_path / "study"
    for env, sentence, dry_runs in (
            ({"SEEDS": "3", "SEEDS_ARCHS": "mobilenet_v3_small"}, "SEEDS_ARCHS names mobilenet_v3_small, not a "
                                                                   "network of models.py: choose from", ("1", "")),
            ({"SEEDS": "3", "SEEDS_ARCHS": "resnet18"}, "SEEDS_ARCHS names resnet18, not a network of this study "
                                                        "(ARCHS: mobilenetv3_small): name networks of ARCHS", ("1",)),
            ({"STUDY_DIR": str(blocker)}, f"STUDY_DIR={blocker} cannot hold the study's runs/ and results/, as "
                                          f"{blocker} is not a folder: choose another STUDY_DIR.", ("1", "")),
            ({"STUDY_DIR": str(blocker / "sub")}, f"as {blocker} is not a folder", ("1",))):
        for dry in dry_runs:
            proc = study(folder, DRY_RUN=dry, **env)
            assert proc.returncode == 2 and sentence in proc.stderr, (env, dry, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1 and "seed(s)" not in proc.stdout, proc.stderr
    assert not folder.exists() and blocker.read_text() == "not a folder"
    proc = study(folder, DRY_RUN="1", SEEDS="3", SEEDS_ARCHS="mobilenetv3_small")  # the networks of ARCHS: fine
    assert proc.returncode == 0 and "x 3 seed(s) (seeds past 0: mobilenetv3_small)" in proc.stdout, proc.stderr


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


def test_the_machine_line_counts_the_runs_each_machine_made():
    """From hand-made results: a CPU and a GPU machine and files from before the record, counted per machine;
    nothing of the machine that builds the report."""
    record = {"cpu": "AMD EPYC 7B13", "cpu_flags": ["avx2", "avx512f"], "cores": 2, "threads": 1, "gpu": None,
              "gpus": 0, "world_size": 1, "torch": "2.5.1", "commit": "c3662e8", "modified": False,
              "start": "2026-12-04T10:00:00+00:00", "end": "2026-12-04T10:05:00+00:00"}
    cpu = json.loads(json.dumps({"device": "cpu", "machine": record}))
    gpu = json.loads(json.dumps({"device": "cuda", "machine": {**record, "gpu": "NVIDIA H100", "gpus": 8,
                                                               "world_size": 8, "torch": "2.6.0"}}))
    old = {"device": "cpu"}
    line = report.machine_line({"pretraining": [gpu, cpu, old, cpu], "evaluation": [cpu, old]})
    assert line == ("Machine: pretraining, 2 runs on AMD EPYC 7B13 (avx2 avx512f, 2 cores / 1 thread); 1 run on "
                    "NVIDIA H100 x 8; 1 run not recorded. Evaluations, 1 file on AMD EPYC 7B13 (avx2 avx512f, 2 "
                    "cores / 1 thread); 1 file not recorded. Torch 2.5.1, 2.6.0.")
    assert report.machine_line({"pretraining": [old], "evaluation": [old, old]}) == (
        "Machine: pretraining, 1 run not recorded. Evaluations, 2 files not recorded. Torch not recorded.")


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
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    out, ckpt = tmp_path / "results" / "smoke", tmp_path / "runs" / "smoke" / RUN / "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=True)
    name = next(k for k in saved["model"] if k.startswith("encoder_q.backbone.") and k.endswith("weight"))
    saved["model"][name] = saved["model"][name] + 0.01
    torch.save(saved, ckpt)
    other = (out / "mobilenetv3_small_baseline_s0" / "knn.json").read_text()
    trained = (out / RUN / "output.log").read_text().count("steps/epoch")
    proc = study(tmp_path, SEEDS="2", JOBS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for result in ("knn.json", "linear.json"):
        assert json.load(open(out / RUN / result))["ckpt_sha256"] == digest, result
    assert (out / "mobilenetv3_small_baseline_s0" / "knn.json").read_text() == other
    assert (out / RUN / "output.log").read_text().count("steps/epoch") == trained  # the pretraining was complete


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failing_job_stops_the_study_and_builds_no_table(finished, tmp_path, jobs):
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    table = (tmp_path / "results" / "smoke" / "RESULTS.md").read_text()
    (tmp_path / "results" / "smoke" / RUN / "knn.json").unlink()
    (tmp_path / "runs" / "smoke" / RUN / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = study(tmp_path, SEEDS="2", JOBS=jobs)
    seen = f"exit {proc.returncode}\n--- stdout:\n{proc.stdout[-2000:]}\n--- stderr:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 1, seen
    assert "is not a readable checkpoint" in proc.stderr, seen  # the end of the job's output.log
    assert "study: the job 'run:mobilenetv3_small:0:small' failed (knn_eval.py exit 1)" in proc.stderr, seen
    assert (tmp_path / "results" / "smoke" / "RESULTS.md").read_text() == table  # the last good table stays


def sleeper(ignore_ctrl_c=False, seconds=300):
    code = ("import signal, time\n" + ("signal.signal(signal.SIGINT, signal.SIG_IGN)\n" if ignore_ctrl_c else "")
            + f"time.sleep({seconds})")
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_stop_all_outlives_a_job_that_has_already_ended():
    """A failing job stops the others; one of them may have ended a moment before: stopping it must not fail."""
    runner = engine.Runner.__new__(engine.Runner)
    done = sleeper(seconds=0)
    done.wait()
    runner.slots = [{"proc": done}, {"proc": sleeper()}]
    runner.stop_all(grace=2)  # where Ctrl-C is ignored (a study started in the background) TERM ends the sleeper
    assert runner.slots == [None, None]


def test_stop_all_ends_a_job_that_ignores_ctrl_c(monkeypatch):
    """Where SIGINT is ignored (a study started in the background by a non-interactive shell), TERM follows."""
    runner = engine.Runner.__new__(engine.Runner)
    proc = sleeper(ignore_ctrl_c=True)
    time.sleep(1)  # its handler is set
    runner.slots = [{"proc": proc}]
    runner.stop_all(grace=2)
    assert proc.returncode == -signal.SIGTERM


def test_an_unknown_preset_and_bad_numbers_are_refused(tmp_path):
    proc = study(tmp_path, "tiny")
    assert proc.returncode == 2 and "unknown preset 'tiny'" in proc.stderr
    for var, value in (("SEEDS", "0"), ("JOBS", "two"), ("HOURS", "0"), ("HOURS", "1h")):
        proc = study(tmp_path, **{var: value})
        assert proc.returncode == 2 and f"{var}={value} is not a number" in proc.stderr


def test_the_presets_page_is_current_and_no_command_gives_a_flag_twice():
    """docs/presets.md is what tools/presets.sh prints today (every preset's commands, by run_all.sh's DRY_RUN), and
    no command in it gives a flag twice (the references once got the pretraining's --subset and the evaluation's)."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "tools/presets.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    page = proc.stdout.replace(sys.executable, ".venv/bin/python")
    assert page == open(os.path.join(ROOT, "docs", "presets.md")).read(), "run: bash tools/presets.sh > docs/presets.md"
    sections = page.split("\n## ")[1:]
    assert [s.split("\n")[0] for s in sections] == ["demo", "demo24", "fmnist", "cifar10", "imagenet", "smoke"]
    for section in sections:
        commands = [shlex.split(line) for line in section.splitlines() if line.startswith(".venv/bin/python")]
        assert len(commands) == 2 * 3 + 2 + 1  # two runs of three stages, two references, raw pixels
        for command in commands:
            flags = [word for word in command if word.startswith("--")]
            assert len(flags) == len(set(flags)), command


def test_paired_statistics_against_a_hand_computation():
    assert report.spread([1.0]) == "1.00" and report.spread([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    t, beyond = report.paired([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: t = 2 / (1 / sqrt 3) = 3.46 < 4.303
    assert t == pytest.approx(2 * 3 ** 0.5) and beyond is False
    t, beyond = report.paired([1.0, 1.2, 0.8, 1.1])  # mean 1.025, sd 0.171: t = 12.0 > 3.182
    assert t == pytest.approx(1.025 / (0.17078251 / 2), rel=1e-6) and beyond is True
    assert report.paired([0.5]) == (None, None) and report.paired([0.0, 0.0]) == (0.0, False)


def test_t_critical_values_beyond_the_table_follow_the_t_distribution():
    # scipy.stats.t.ppf(0.975, df) for df 31, 40, 60, 120: 2.0395, 2.0211, 2.0003, 1.9799
    for n, value in ((32, 2.0395), (41, 2.0211), (61, 2.0003), (121, 1.9799)):
        assert report.critical(n) == pytest.approx(value, abs=2e-4)
    assert report.critical(31) == 2.042 and report.critical(2) == 12.706


def test_the_confidence_interval_excludes_0_exactly_when_the_difference_is_beyond_the_spread():
    # mean 1.025, sd 0.171, n 4: half-width 3.182 * 0.171 / 2 = 0.272 (hand computation)
    assert report.confidence([1.0, 1.2, 0.8, 1.1]) == pytest.approx(3.182 * 0.17078251 / 2, rel=1e-6)
    assert report.confidence([0.5]) is None
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 8):
        for _ in range(50):
            diffs = (torch.randn(n, generator=generator) + 1).tolist()
            mean, half = sum(diffs) / n, report.confidence(diffs)
            assert report.paired(diffs)[1] == (abs(mean) > half), diffs


def synthetic_rows(effects, gains, pixels_minus):
    """Rows as report.collect makes them: per network, per seed, the baseline and the small recipe, the small one
    `effects[arch][seed]` kNN points above the baseline; the baseline `gains[arch][seed]` above its random init."""
    rows = []
    for arch, per_seed in effects.items():
        for seed, (effect, gain) in enumerate(zip(per_seed, gains[arch])):
            base = 70.0 + seed
            for recipe, knn in (("baseline", base), ("small", base + effect)):
                rows.append({"arch": arch, "recipe": recipe, "seed": seed, "knn": knn,
                             "knn_gain": knn - (base - gain), "linear_top1": knn + 5})
    return rows, {"pixels": 70.0 + pixels_minus}


def test_the_tables_in_words_follow_the_numbers():
    rows, refs = synthetic_rows({"resnet18": [2.0, 2.2, 1.8], "mobilenetv3_small": [3.0, -2.0, 0.5],
                                 "efficientnet_b0": [-1.0]},
                                {"resnet18": [5.0, 5.1, 4.9], "mobilenetv3_small": [-4.0, -4.2, -3.9],
                                 "efficientnet_b0": [1.0]}, pixels_minus=-50.0)
    words = "\n".join(report.findings(rows, refs, ["resnet18", "mobilenetv3_small", "efficientnet_b0"]))
    kNN = words.splitlines()[0]
    assert kNN.startswith("- **Small-model recipe minus baseline, kNN**: beyond the seed spread and in the recipe's "
                          "favour for resnet18 (+2.00, 95% interval +1.50 to +2.50, t +17.3)"), kNN
    assert "within the seed spread for mobilenetv3_small (+0.50, 95% interval -5.71 to +6.71, t +0.3)" in kNN
    assert "one seed, so not measured, for efficientnet_b0 (-1.00)" in kNN
    assert "below it beyond the seed spread: mobilenetv3_small baseline (-4.03" in words
    assert "above it beyond the seed spread: resnet18 baseline (+5.00" in words
    assert ("Learned against raw pixels (20.00; one-sample t against that constant)**: above them beyond the seed "
            "spread: resnet18 baseline") in words
    assert "The tables make 4 recipe comparisons" in words and "with probability at most 19%" in words
    assert "kNN, 5 of 7 pairs favour the small-model recipe (two-sided p 0.45)" in words  # 2 x 29 / 128


def test_the_sign_test_against_a_hand_computation():
    assert report.sign_test(14, 15) == pytest.approx(2 * 16 / 2 ** 15)  # 15 + 1 splits as uneven, both ways
    assert report.sign_test(1, 15) == report.sign_test(14, 15)
    assert report.sign_test(12, 15) == pytest.approx(2 * (1 + 15 + 105 + 455) / 2 ** 15)
    assert report.sign_test(5, 10) == 1.0 and report.sign_test(0, 0) == 1.0


@pytest.mark.parametrize("batch, per_run, splits", [(128, 1, 2), (512, 1, 8), (512, 8, 1), (256, 1, 4), (256, 2, 2),
                                                    (512, 2, 4), (64, 1, 1), (48, 1, 1)])
def test_split_bn_keeps_groups_of_64_images_whatever_the_number_of_processes(batch, per_run, splits):
    # the presets' --bn-group 64: per-process batch / 64 groups, at least one
    assert run_state.bn_splits(batch, per_run, 64) == splits


def test_figure_ticks_are_round_numbers():
    assert report.nice_ticks(52.7, 80.4) == [55, 60, 65, 70, 75, 80]
    assert report.nice_ticks(1.4, 14.6) == [2.5, 5, 7.5, 10, 12.5]
    assert report.nice_ticks(54.3, 76.1) == [55, 60, 65, 70, 75]


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
    results = tmp_path / "results" / "smoke"
    shutil.copytree(finished[0] / "results" / "smoke", results)
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
    assert f"study: rerun, its recorded command differs from today's: {RUN} pretrain: --moco-t 0.3, not 0.1" in out
    assert "study: 3 run(s) kept" in out and "no checkpoint" in out, out
    assert seen_in_staging and all(seen_in_staging)
    assert not (results / ".staging").exists() and (results / RUN / "summary.json").read_text() != old_summary
    assert "--moco-t 0.1" in (results / RUN / "command.txt").read_text().splitlines()[0]
    assert out.count(": done, skipped") == 6  # all but the changed run
    assert not (tmp_path / "runs" / "smoke" / "mobilenetv3_small_baseline_s1").exists()  # kept, never retrained


def test_the_cost_is_measured_once_a_time_box_starts_nothing_that_cannot_finish_and_more_seeds_add_runs(finished,
                                                                                                      tmp_path):
    """A study of seed 0 is there; SEEDS=2 is asked for in a box too short for any job. The study times the network
    here first (the figures kept for this machine and preset), says what the rest will cost, starts nothing and says
    how to continue (exit 3). The same command without the box then runs seed 1's jobs and nothing else, with the
    figures it kept; the dry run says the cost too; RESULTS.md records both slices."""
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    for folder in ("results", "runs"):
        for run in (tmp_path / folder / "smoke").glob("*_s1"):
            shutil.rmtree(run)
    (tmp_path / "runs" / "smoke" / "cost.json").unlink(missing_ok=True)
    proc = study(tmp_path, SEEDS="2", HOURS="0.0001")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "timing each network's training step" in proc.stdout
    assert re.search(r"study smoke: 3 of 7 jobs to run \(2 pretraining\(s\)\) on a CPU of \d+ cores, 2 at once: "
                     r"about \d\d:\d\d:\d\d here", proc.stdout), proc.stdout
    assert "study: the time box ends; 4 of 7 jobs done (run:mobilenetv3_small:1:baseline, " \
           "run:mobilenetv3_small:1:small, refs:mobilenetv3_small:1 left): run the same command again to continue." \
           in proc.stdout
    assert not (tmp_path / "results" / "smoke" / "mobilenetv3_small_small_s1").exists()
    dry = study(tmp_path, SEEDS="2", DRY_RUN="1", COST="1")
    assert re.search(r"study smoke: 3 of 7 jobs left, about \d\d:\d\d:\d\d here with 2 at once", dry.stderr)
    proc = study(tmp_path, SEEDS="2")
    assert proc.returncode == 0 and "timing each network" not in proc.stdout, proc.stdout
    assert proc.stdout.count(": done, skipped") == 4  # seed 0's runs, its references, raw pixels
    rows = list(csv.DictReader(open(tmp_path / "results" / "smoke" / "results.csv")))
    assert sorted({r["seed"] for r in rows}) == ["0", "1"]
    slices = json.load(open(tmp_path / "results" / "smoke" / "study.json"))["slices"]
    assert sorted(slices[-1]["finished"]) == ["refs:mobilenetv3_small:1", "run:mobilenetv3_small:1:baseline",
                                              "run:mobilenetv3_small:1:small"] and slices[-1]["predicted_s"] > 0
    table = (tmp_path / "results" / "smoke" / "RESULTS.md").read_text()
    assert "## How the study ran" in table and 'HOURS=0.0001 bash run_all.sh smoke` |' in table


def test_the_time_box_stops_a_running_job_like_ctrl_c(tmp_path, monkeypatch):
    """At the box's end the running stage gets Ctrl-C (pretrain.py saves and stops), the study says so (exit 3)."""
    st = engine.Study("smoke", ["mobilenetv3_small"], study_dir=str(tmp_path), jobs=1)
    job = engine.Job(st, "pixels")
    stage = engine.Stage(["-c", "import time; time.sleep(300)"], str(tmp_path / "never.json"), str(tmp_path / "res"))
    monkeypatch.setattr(job, "parts", lambda: [("pixels", str(tmp_path / "res"), None, None, [stage])])
    monkeypatch.setattr(engine, "job_cost", lambda job, costs: 0.0)
    runner = engine.Runner(st, [engine.Unit(job)], {}, dict(os.environ), deadline=time.time() + 3)
    start = time.time()
    assert runner.run() == "time box" and time.time() - start < 30
    assert "KeyboardInterrupt" in (tmp_path / "res" / "output.log").read_text()  # stopped by Ctrl-C, not killed


def test_a_resumed_run_is_predicted_to_take_what_is_left_of_it(tmp_path):
    """The prediction of a pretraining with a checkpoint covers the steps after it: slice 2 of the demo resumed a run
    at step 850 of 936, counted its 2 min against a full run's 9 and corrected every later ETA by that pace."""
    st = engine.Study("smoke", ["mobilenetv3_small"], study_dir=str(tmp_path), jobs=1)
    job = engine.Job(st, "run", "mobilenetv3_small", 0)
    costs = {"mobilenetv3_small": {recipe: {"step_s": 2.0, "start_s": 5.0, "steps": 100, "images": 0}
                                   for recipe in engine.RECIPES} | {"eval_image_s": 0.0, "eval_start_s": 0.0}}
    (label, res, run, staged, todo), *_ = job.parts()
    pretraining = todo[0]
    assert pretraining.script == "pretrain.py"
    whole = engine.stage_cost(job, label, pretraining, costs)
    os.makedirs(pretraining.run)
    torch.save({"step": 75}, os.path.join(pretraining.run, "checkpoint.pt"))
    assert engine.stage_cost(job, label, pretraining, costs) == pytest.approx(5.0 + (whole - 5.0) / 4)


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
    """study.meaning: what decides whether a recorded command is today's. Paths, run control and flag order do not
    count; --bn-group 64 and the --bn-splits it makes on that many processes are one setting; a drawn picture and
    every training flag do count; --reestimate-bn is --precise-bn's older name."""
    old = ["pretrain.py", "--arch", "resnet18", "--bn-splits", "2", "--batch-size", "128", "--out", "/a", "--lr",
           "0.03"]
    new = ["pretrain.py", "--lr", "0.03", "--batch-size", "128", "--arch", "resnet18", "--bn-group", "64", "--out",
           "/b/c", "--resume", "--workers", "0"]
    assert engine.meaning(old) == engine.meaning(new)
    assert engine.meaning(old) != engine.meaning(new, processes=2)  # 64 images per process: one group each
    assert engine.difference(engine.meaning(old + ["--moco-t", "0.1"]), engine.meaning(new)) == "--moco-t 0.1, not 0.2"
    knn = ["knn_eval.py", "--arch", "resnet18", "--random-init", "--k", "20", "200", "--json", "/a/knn.json"]
    assert engine.meaning(knn + ["--reestimate-bn"]) == engine.meaning(knn + ["--precise-bn"])
    assert engine.meaning(knn + ["--neighbours", "/a/n.png"]) == engine.meaning(knn + ["--neighbours", "/b/n.png"])
    assert engine.meaning(knn + ["--neighbours", "/a/n.png"]) != engine.meaning(knn)


def test_a_preset_file_can_read_another():
    """cifar10 is the fmnist preset on CIFAR-10: its files read fmnist's (@FILE), and the last --data wins."""
    fmnist, cifar = engine.load_preset("fmnist"), engine.load_preset("cifar10")
    assert cifar["pretrain"] == fmnist["pretrain"] + ["--data", "cifar10"]
    assert all(cifar[f] == fmnist[f] for f in ("baseline", "small", "eval", "linear"))


def test_the_report_says_when_results_came_from_other_training_code():
    """Results kept from an earlier commit are named with the files of training or evaluation code that differ."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    old = "1a2f2f2d0c1ecf2ac4bd52e31b7c0ba91a0d1e35"[:7]  # before fp16 on the CPU changed pretrain.py
    full = subprocess.run(["git", "rev-parse", "--verify", "-q", old + "^{commit}"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    if not head or not full:
        pytest.skip("needs the project's git history")
    record = {"commit": head, "modified": False}
    made = {"pretraining": [{"machine": record}, {"machine": {**record, "commit": full}}, {}], "evaluation": []}
    line = report.code_line(made)
    assert line.startswith(f"Code: 1 file from commit {head[:7]}; 1 file from commit {old}, whose training or "
                           f"evaluation code differs from this checkout's (") and "pretrain.py" in line, line
    assert line.endswith("; 1 file without a recorded commit."), line
