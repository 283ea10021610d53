"""run_all.sh, end to end on its `smoke` preset (synthetic images, a few steps, one network): the jobs chain, the
table is written, a finished study is skipped on rerun, an evaluation is redone when its checkpoint changes, and a
failing job stops the study without a table. Also report.py's statistics and every preset's commands."""
import csv
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import report
import run_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "mobilenetv3_small_small_s0"


def study(tmp_path, preset="smoke", **env):
    env = {**os.environ, "ARCHS": "mobilenetv3_small", "STUDY_DIR": str(tmp_path), "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": "", **env}  # a test meant for the CPU, GPU or not
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
    proc = study(tmp_path, SEEDS="2", JOBS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps/epoch" not in proc.stdout and "kNN top-1" not in proc.stdout  # nothing trained or evaluated
    assert proc.stdout.count(": done, skipped") == 7  # and it says so, job by job
    assert ckpt.stat().st_mtime_ns == before
    assert (tmp_path / "results" / "smoke" / "RESULTS.md").exists()


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
    proc = study(tmp_path, SEEDS="2", JOBS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for result in ("knn.json", "linear.json"):
        assert json.load(open(out / RUN / result))["ckpt_sha256"] == digest, result
    assert (out / "mobilenetv3_small_baseline_s0" / "knn.json").read_text() == other
    assert "steps/epoch" not in proc.stdout  # the pretraining itself was complete


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failing_job_stops_the_study_without_a_table(finished, tmp_path, jobs):
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / "results" / "smoke" / RUN / "knn.json").unlink()
    (tmp_path / "runs" / "smoke" / RUN / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = study(tmp_path, SEEDS="2", JOBS=jobs)
    seen = f"exit {proc.returncode}\n--- stdout:\n{proc.stdout[-2000:]}\n--- stderr:\n{proc.stderr[-2000:]}"
    assert proc.returncode != 0, seen
    assert "is not a readable checkpoint" in (proc.stderr if jobs == "2" else proc.stdout), seen  # JOBS=1: terminal
    assert "run_all.sh: the job 'run mobilenetv3_small small 0' failed" in proc.stderr, seen
    assert not (tmp_path / "results" / "smoke" / "RESULTS.md").exists()


def stop_all_script(*jobs):
    """A bash script: run_all.sh's stop_all (as the script holds it) over these background jobs, under set -e."""
    text = open(os.path.join(ROOT, "run_all.sh")).read()
    start = text.index("  stop_all() {")
    body = text[start:text.index("\n  }\n", start) + 5]
    launch = "".join(f"( {job} ) & PIDS+=($!)\n" for job in jobs)
    return f"set -euo pipefail\nset -m\nPIDS=()\n{launch}{body}sleep 1\nstop_all\necho stopped >&2\n"


def test_stop_all_outlives_a_job_that_has_already_ended():
    """A failing job stops the others; one of them may have ended a moment before (its kill then fails): the study
    still says which job failed instead of exiting silently under set -e."""
    proc = subprocess.run(["bash", "-c", stop_all_script("exit 0", "exec sleep 20")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "stopped" in proc.stderr, (proc.returncode, proc.stderr)


def test_stop_all_ends_a_job_that_ignores_ctrl_c():
    """Where SIGINT is ignored (a study started in the background by a non-interactive shell), TERM follows."""
    script = stop_all_script("trap '' INT; exec sleep 300")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0 and "stopped" in proc.stderr, (proc.returncode, proc.stderr)


def test_an_unknown_preset_and_bad_numbers_are_refused(tmp_path):
    proc = study(tmp_path, "tiny")
    assert proc.returncode == 2 and "unknown preset 'tiny'" in proc.stderr
    for var, value in (("SEEDS", "0"), ("JOBS", "two")):
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
    assert [s.split("\n")[0] for s in sections] == ["demo", "fmnist", "cifar10", "imagenet", "smoke"]
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


@pytest.mark.parametrize("batch, per_run, splits", [(128, 1, 2), (512, 1, 8), (512, 8, 1), (256, 1, 4), (256, 2, 2),
                                                    (512, 2, 4), (64, 1, 1), (48, 1, 1)])
def test_split_bn_keeps_groups_of_64_images_whatever_the_number_of_processes(batch, per_run, splits):
    # run_all.sh's own bn_splits function, read from the script: per-process batch / 64, at least one group
    function = next(line for line in open(os.path.join(ROOT, "run_all.sh")) if line.startswith("bn_splits()"))
    proc = subprocess.run(["bash", "-c", f"{function}\nPER_RUN={per_run}; BN_GROUP=64; bn_splits {batch}"],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == str(splits), proc.stderr


def test_figure_ticks_are_round_numbers():
    assert report.nice_ticks(52.7, 80.4) == [55, 60, 65, 70, 75, 80]
    assert report.nice_ticks(1.4, 14.6) == [2.5, 5, 7.5, 10, 12.5]
    assert report.nice_ticks(54.3, 76.1) == [55, 60, 65, 70, 75]


def test_the_figure_has_a_legend_for_every_mark(finished):
    svg = (finished[0] / "results" / "smoke" / "results.svg").read_text()
    for mark in ("bars: baseline (light), small-model recipe (dark)", "one seed's run", "random init",
                 "raw pixels (", "small-model recipe</text>", "baseline</text>",
                 "one line per run; seed 0 dark, the other seeds light", "mobilenetv3_small</text>"):
        assert mark in svg, mark
    assert 'rotate(-20)" text-anchor="end" font-size="10">mobilenetv3_small' in svg  # labels slanted: no collisions


def test_the_smoke_preset_results_are_not_tracked():
    proc = subprocess.run(["git", "check-ignore", "-q", "results/smoke/RESULTS.md"], cwd=ROOT)
    assert proc.returncode == 0, "results/smoke/ must be git-ignored: a smoke study claims nothing"


def test_results_without_their_checkpoints_are_never_mixed_with_a_new_study(finished, tmp_path):
    """A fresh clone holds the tracked study but not its checkpoints: a new study replaces it (git restores it)
    instead of skipping its references and appending to its logs; results git cannot restore are left alone."""
    results = tmp_path / "results" / "smoke"
    shutil.copytree(finished[0] / "results" / "smoke", results)
    before = sorted(p.name for p in results.iterdir())
    proc = study(tmp_path, SEEDS="2")  # no runs/: untracked results, not this study's to resume
    assert proc.returncode == 2 and "cannot be resumed: move them away" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in results.iterdir()) == before and not (tmp_path / "runs").exists()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "results"], check=True)
    subprocess.run(git + ["commit", "-qm", "a tracked study"], check=True)
    proc = study(tmp_path, JOBS="2")  # seed 0 alone: a new study of its own
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "holds the tracked smoke study, whose checkpoints are not in" in proc.stdout
    for run in (RUN, "mobilenetv3_small_random_s0", "pixels"):  # redone, not skipped, and not appended to
        command = (results / run / "command.txt").read_text()
        assert str(tmp_path) in command and str(finished[0]) not in command, run
    assert not (results / "mobilenetv3_small_small_s1").exists()  # the tracked seed-1 runs went with the old study
