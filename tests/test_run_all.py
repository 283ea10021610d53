"""run_all.sh, end to end on its `smoke` preset (synthetic images, a few steps, one network): the stages chain, the
table is written, a finished study is skipped on rerun, and a failing stage stops the study without a table."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study(tmp_path, preset="smoke"):
    env = {**os.environ, "ARCHS": "mobilenetv3_small", "STUDY_DIR": str(tmp_path), "PYTHON": sys.executable}
    return subprocess.run(["bash", "run_all.sh", preset], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    return tmp_path, study(tmp_path)


def test_the_study_writes_one_row_per_recipe(finished):
    tmp_path, proc = finished
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "results" / "smoke"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["arch"], r["recipe"]) for r in rows] == [("mobilenetv3_small", "baseline"),
                                                        ("mobilenetv3_small", "small")]
    for r in rows:
        assert float(r["knn200_gain"]) == pytest.approx(float(r["knn200"]) - float(r["knn200_random"]), abs=1e-6)
        assert 0 <= float(r["linear_top1"]) <= 100 and float(r["images_per_s"]) > 0
        ref_bn = json.load(open(out / "mobilenetv3_small_random_bn_knn.json"))
        assert ref_bn["reestimate_bn"] and float(r["knn200_random_bn"]) == ref_bn["knn"][1]["top1"]
    table = (out / "RESULTS.md").read_text()
    assert "| mobilenetv3_small | small | 1.52M |" in table
    for recipe in ("baseline", "small"):  # pretext accuracy, first -> last epoch, from the run's log
        log = [json.loads(line) for line in open(tmp_path / "runs" / "smoke" / f"mobilenetv3_small_{recipe}" /
                                                  "log.jsonl")]
        acc = [r["epoch_acc"] for r in log if "epoch_acc" in r]
        assert f"| {recipe} | 1.52M | 1 | {acc[0]:.1f} -> {acc[-1]:.1f} |" in table
    assert table.strip().splitlines()[-1] in proc.stdout  # the table is printed at the end


def test_the_two_recipes_differ_as_the_script_says(finished):
    tmp_path, _ = finished
    runs = tmp_path / "runs" / "smoke"
    base = pretrain.read_checkpoint(str(runs / "mobilenetv3_small_baseline" / "checkpoint.pt"))["args"]
    small = pretrain.read_checkpoint(str(runs / "mobilenetv3_small_small" / "checkpoint.pt"))["args"]
    assert (base["smooth"], base["moco_t"], base["mlp_hidden"]) == (0.0, 0.2, 0)
    assert (small["smooth"], small["moco_t"], small["mlp_hidden"], small["smooth_k"]) == (0.1, 0.1, 2048, 10)


def test_a_rerun_skips_finished_stages(finished):
    tmp_path, first = finished
    ckpt = tmp_path / "runs" / "smoke" / "mobilenetv3_small_small" / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns
    proc = study(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps/epoch" not in proc.stdout and "kNN top-1" not in proc.stdout  # nothing trained or evaluated
    assert ckpt.stat().st_mtime_ns == before
    assert (tmp_path / "results" / "smoke" / "RESULTS.md").exists()


def test_a_failing_stage_stops_the_study_without_a_table(finished, tmp_path):
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    run = tmp_path / "runs" / "smoke" / "mobilenetv3_small_small"
    (run / "knn.json").unlink()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = study(tmp_path)
    assert proc.returncode != 0
    assert "checkpoint" in proc.stderr
    assert not (tmp_path / "results" / "smoke" / "RESULTS.md").exists()


def test_an_unknown_preset_is_refused(tmp_path):
    proc = study(tmp_path, "tiny")
    assert proc.returncode == 2 and "unknown preset 'tiny'" in proc.stderr


@pytest.mark.parametrize("batch, gpus, splits", [(128, 0, 2), (512, 1, 8), (512, 8, 1), (256, 1, 4), (256, 2, 2),
                                                 (512, 2, 4), (64, 0, 1), (48, 0, 1)])
def test_split_bn_keeps_groups_of_64_images_whatever_the_number_of_processes(batch, gpus, splits):
    # run_all.sh's own bn_splits function, read from the script: per-process batch / 64, at least one group
    function = next(line for line in open(os.path.join(ROOT, "run_all.sh")) if line.startswith("bn_splits()"))
    proc = subprocess.run(["bash", "-c", f"{function}\nGPUS={gpus}; BN_GROUP=64; bn_splits {batch}"],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == str(splits), proc.stderr
