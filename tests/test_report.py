"""The tables, their statistics and the figure (engine/report.py, engine/stats.py, engine/figure.py, the command
report.py): every statistic against a hand computation, the words against the numbers, every tracked table rebuilt
from its files, the README's table against the demo's."""
import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess

import pytest
import torch

from engine import figure, report, stats

report_py = importlib.import_module("report")  # the script at the root, beside engine/report.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_tracked_table_is_what_report_py_makes_of_its_files(tmp_path):
    """Each tracked study folder (results/**/study.json) rebuilds, from its JSON and logs alone, to the tables, the
    CSV and the figure that are tracked beside them: no table in the repository holds a number its files do not. The
    line naming the code is compared too (it names the training and evaluation files that differ between the
    results' commits and this checkout's): a commit that changes such a file must rebuild the tables. A clone
    without the history leaves that line out."""
    listed = subprocess.run(["git", "ls-files", "results/*/study.json", "results/**/study.json"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    folders = sorted({os.path.dirname(path) for path in listed})
    assert {"results/demo", "results/probes/mnv3s_6seeds"} <= set(folders), folders

    def lines(text):
        return [line for line in text.splitlines()
                if not (line.startswith("`") and " Code: " in line and "this checkout does not have" in line)]

    for folder in folders:
        copy = tmp_path / folder
        shutil.copytree(os.path.join(ROOT, folder), copy)
        for name in ("RESULTS.md", "results.csv", "results.svg"):
            (copy / name).unlink()
        with contextlib.redirect_stdout(io.StringIO()):  # in-process: what `report.py FOLDER` runs
            report_py.main([str(copy)])
        tracked = open(os.path.join(ROOT, folder, "RESULTS.md")).read()
        assert lines((copy / "RESULTS.md").read_text()) == lines(tracked), (
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


def test_paired_statistics_against_a_hand_computation():
    assert stats.spread([1.0]) == "1.00" and stats.spread([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    t, beyond = stats.paired([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: t = 2 / (1 / sqrt 3) = 3.46 < 4.303
    assert t == pytest.approx(2 * 3 ** 0.5) and beyond is False
    t, beyond = stats.paired([1.0, 1.2, 0.8, 1.1])  # mean 1.025, sd 0.171: t = 12.0 > 3.182
    assert t == pytest.approx(1.025 / (0.17078251 / 2), rel=1e-6) and beyond is True
    assert stats.paired([0.5]) == (None, None) and stats.paired([0.0, 0.0]) == (0.0, False)


def test_t_critical_values_beyond_the_table_follow_the_t_distribution():
    # scipy.stats.t.ppf(0.975, df) for df 31, 40, 60, 120: 2.0395, 2.0211, 2.0003, 1.9799
    for n, value in ((32, 2.0395), (41, 2.0211), (61, 2.0003), (121, 1.9799)):
        assert stats.critical(n) == pytest.approx(value, abs=2e-4)
    assert stats.critical(31) == 2.042 and stats.critical(2) == 12.706


def test_the_confidence_interval_excludes_0_exactly_when_the_difference_is_beyond_the_spread():
    # mean 1.025, sd 0.171, n 4: half-width 3.182 * 0.171 / 2 = 0.272 (hand computation)
    assert stats.confidence([1.0, 1.2, 0.8, 1.1]) == pytest.approx(3.182 * 0.17078251 / 2, rel=1e-6)
    assert stats.confidence([0.5]) is None
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 8):
        for _ in range(50):
            diffs = (torch.randn(n, generator=generator) + 1).tolist()
            mean, half = sum(diffs) / n, stats.confidence(diffs)
            assert stats.paired(diffs)[1] == (abs(mean) > half), diffs


def synthetic_rows(effects, gains, pixels_minus):
    """Rows as report.Results makes them: per network, per seed, the baseline and the small recipe, the small one
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
    assert stats.sign_test(14, 15) == pytest.approx(2 * 16 / 2 ** 15)  # 15 + 1 splits as uneven, both ways
    assert stats.sign_test(1, 15) == stats.sign_test(14, 15)
    assert stats.sign_test(12, 15) == pytest.approx(2 * (1 + 15 + 105 + 455) / 2 ** 15)
    assert stats.sign_test(5, 10) == 1.0 and stats.sign_test(0, 0) == 1.0


def test_figure_ticks_are_round_numbers():
    assert figure.nice_ticks(52.7, 80.4) == [55, 60, 65, 70, 75, 80]
    assert figure.nice_ticks(1.4, 14.6) == [2.5, 5, 7.5, 10, 12.5]
    assert figure.nice_ticks(54.3, 76.1) == [55, 60, 65, 70, 75]


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



def test_a_longer_study_is_set_beside_the_same_runs_at_the_shorter_budget(tmp_path):
    """notes.json's "shorter" names the same runs at a smaller budget: RESULTS.md pairs each run with its own seed
    there (this study minus that one), says which differences are beyond the seed spread, shows the networks'
    neighbours pictures at both budgets where both have them, and budget.svg draws both. Here the demo against a
    copy of itself whose resnet18 baseline kNN is 1, 2 and 3 points lower per seed."""
    longer, shorter = tmp_path / "longer", tmp_path / "shorter"
    for folder in (longer, shorter):
        shutil.copytree(os.path.join(ROOT, "results", "demo"), folder)
    lowered = []
    for seed in range(3):
        path = shorter / f"resnet18_baseline_s{seed}" / "knn.json"
        results = json.load(open(path))
        results["knn"][-1]["top1"] -= seed + 1
        lowered.append(results["knn"][-1]["top1"])
        json.dump(results, open(path, "w"))
    (shorter / "mobilenetv3_small_small_s0" / "neighbours.png").unlink()
    notes = json.load(open(longer / "notes.json"))
    json.dump({**notes, "shorter": "../shorter"}, open(longer / "notes.json", "w"))
    with contextlib.redirect_stdout(io.StringIO()):
        report_py.main([str(longer)])
    table = (longer / "RESULTS.md").read_text()
    assert "## 6 and 6 epochs, the same seeds" in table and "[../shorter](../shorter/RESULTS.md)" in table
    row = next(line for line in table.splitlines()
               if line.startswith(f"| resnet18 | baseline | 3 | {stats.spread(lowered)} |"))
    assert "| +1.00 / +2.00 / +3.00 | 2.00 ± 1.00 | -0.48 to +4.48 | +3.5 | no |" in row, row  # t = 2 / (1 / sqrt 3)
    assert "| resnet18 | small | 3 | 76.48 ± 0.14 | 76.48 ± 0.14 | +0.00 / +0.00 / +0.00 |" in table
    assert "- **6 epochs minus 6, the same seeds, kNN**: within the seed spread for resnet18 baseline (+2.00" in table
    pictures = table.split("### What the features find after 6 and 6 epochs")[1]
    assert "| ![baseline, 6 epochs](../shorter/resnet18_baseline_s0/neighbours.png) | ![baseline, 6 epochs](" \
           "resnet18_baseline_s0/neighbours.png) |" in pictures, pictures
    assert "**efficientnet_b0, seed 0**" in pictures and "**mobilenetv3_small, seed 0**" not in pictures  # removed
    svg = (longer / "budget.svg").read_text()
    assert svg.startswith("<svg") and "raw pixels on the same (77.35)" in svg and ">efficientnet_b0</text>" in svg


def test_a_slice_records_itself_as_it_goes_and_a_killed_one_is_said_so(tmp_path):
    """A slice writes its record when it starts and as each job ends, in the same place (its "started"); one that
    never closed it (killed) reads as "at least" its time so far, beside a closed one's plain time."""
    from engine import jobs
    st = jobs.Study("smoke", ["mobilenetv3_small"], study_dir=str(tmp_path), jobs=1)
    first = {"invocation": "a", "started": 1.0, "closed": True, "machine": {}, "jobs": 1, "predicted_s": 60,
             "seconds": 120, "finished": ["pixels"]}
    jobs.write_record(st, "a", first)
    for finished in ([], ["run:x"], ["run:x", "run:y"]):
        jobs.write_record(st, "b", {**first, "invocation": "b", "started": 2.0, "closed": False, "seconds": 600,
                                    "finished": finished})
    study = json.load(open(tmp_path / "results" / "smoke" / "study.json"))
    assert [(s["invocation"], len(s["finished"])) for s in study["slices"]] == [("a", 1), ("b", 2)]
    assert study["seconds"] == 720
    rows = [line for line in report.slices_section(study) if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert rows[0].endswith("| 1.0 min | 2.0 min |") and "| 1.0 min | at least 10.0 min" in rows[1]
    assert "its record was not closed" in rows[1]
