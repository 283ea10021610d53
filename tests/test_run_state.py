"""run_state.py: what a pretraining run keeps around the method (its numbers, checks, processes and resuming),
tested piece by piece; tests/test_pretrain.py runs them end to end through pretrain.main."""
import argparse
import datetime
import json
import os
import re
import shlex
import time

import pytest
import torch
import torch.distributed as dist

import pretrain
import run_state
from test_pretrain import runs_as_printed, tiny_moco


def test_the_meter_sums_intervals_epochs_and_settled_steps():
    """Means over the logging interval, the epoch, and the interval's steps whose queue held only real keys (a queue
    of 4 keys, 2 per step: from step 3 on), against sums by hand."""
    meter = run_state.Meter(torch.device("cpu"), keys_per_step=2, queue_size=4)
    values = [torch.tensor([float(i), 10.0 * i, 100.0 * i]) for i in range(1, 6)]
    for step, v in enumerate(values[:4], 1):
        meter.add(step, tuple(v))
    means, settled, count = meter.interval()
    assert means == pytest.approx([2.5, 25.0, 250.0]) and count == 2 and settled == pytest.approx([3.5, 35.0, 350.0])
    meter.add(5, tuple(values[4]))
    means, settled, count = meter.interval()
    assert means == pytest.approx([5.0, 50.0, 500.0]) and settled == means and count == 1
    (loss, acc, spread), steps = meter.epoch()
    assert (loss, acc, spread, steps) == (pytest.approx(3.0), pytest.approx(30.0), pytest.approx(300.0), 5)
    assert meter.interval()[1] is None  # nothing settled yet in the new interval


def test_steps_of_the_lr_warm_up_are_not_settled():
    """A run still warming its lr up is not judged for collapse: with a queue full from step 3 and a warm-up of 4
    steps, the settled steps are 5 on."""
    meter = run_state.Meter(torch.device("cpu"), keys_per_step=2, queue_size=4, warmup_steps=4)
    for step in range(1, 5):
        meter.add(step, (torch.tensor(float(step)),) * 3)
    assert meter.interval()[1:] == (None, 0)
    for step in (5, 6):
        meter.add(step, (torch.tensor(float(step)),) * 3)
    means, settled, count = meter.interval()
    assert count == 2 and settled == pytest.approx([5.5] * 3) == means


def test_ddp_leaves_the_queue_out_of_its_buffer_broadcast(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = run_state.wrap_ddp(tiny_moco(bn_splits=2), torch.device("cpu"))
        assert model.parameters_to_ignore == {"queue", "queue_ptr"}
        broadcast = {id(b) for b in model.modules_buffers}
        assert id(model.module.queue) not in broadcast and id(model.module.queue_ptr) not in broadcast
        assert id(model.module.encoder_q.backbone.features[0][1].running_mean) in broadcast  # BN statistics are
    finally:
        dist.destroy_process_group()


def test_the_collapse_thresholds_against_measured_runs():
    """Values logged by real runs (docs/training-health.md): the demo's healthy mobilenetv3_small baseline at its
    early dip must not count as collapsed; the issue's 45-step run at m 0.999, and a far too high lr, must."""
    args = pretrain.get_args(["--moco-k", "1024"])
    assert not run_state.collapsed(6.755, 0.021, args, 53, 104)  # the demo's dip: 0.18 below ln(1025), spread 0.24
    assert run_state.collapsed(6.877, 0.022, args, 9, 45)  # 0.055 below ln(1025)
    assert run_state.collapsed(5.0, 0.0034, args, 5, 8)  # spread 0.038
    symmetric = pretrain.get_args(["--moco-k", "1024", "--symmetric"])
    assert not run_state.collapsed(6.877, 0.022, symmetric, 9, 45)  # the loss of two terms: 2 ln(1025) = 13.86
    teacher = pretrain.get_args(["--moco-k", "1024", "--teacher", "t.pt"])
    assert not run_state.collapsed(6.95, 0.022, teacher, 9, 45)  # the distillation terms are in the loss


def test_the_defaults_run_and_the_queue_advice_fits_the_data(tmp_path):
    defaults = pretrain.get_args([])
    assert defaults.moco_k == 4096 and defaults.workers <= (os.cpu_count() or 1)
    run_state.check_setup(defaults, 60_000, 1)  # Fashion-MNIST's training set
    assert run_state.queue_advice(60_000, 256) == "use e.g. --moco-k 4096 on 60000 images"
    assert run_state.queue_advice(20_000, 256) == "use e.g. --moco-k 2048 on 20000 images"
    assert run_state.queue_advice(2_000, 256).startswith("2000 images are too few for a queue that holds one step's "
                                                        "256 keys")
    with pytest.raises(SystemExit, match="the 2000 training images.*use e.g. --moco-k 128 on 2000 images"):
        run_state.check_setup(pretrain.get_args(["--batch-size", "64", "--moco-k", "2000"]), 2000, 1)


def test_ctrl_c_under_torchrun_says_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    hint = run_state.interrupted(str(tmp_path), ["--arch", "resnet18"], pretrain.__file__)
    python, *rest = shlex.split(re.search("rerun `(.*)` to start again.$", hint)[1])
    assert rest == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.relpath(pretrain.__file__), "--arch", "resnet18", "--resume"]
    runs_as_printed(python)
    monkeypatch.setenv("WORLD_SIZE", "8")  # four nodes of two processes: the other launcher flags are the user's
    assert "torch.distributed.run --nnodes=4 ... --nproc_per_node=2 pretrain.py" in run_state.interrupted(
        str(tmp_path), [], pretrain.__file__)


def test_duration_has_days_past_24_hours():
    assert run_state.duration(25 * 3600) == "1d 01:00:00"
    assert run_state.duration(3599.6) == "01:00:00"


def test_the_summary_records_where_the_run_ran(tmp_path):
    """summary.json's machine record (evaluation.machine): this session, from the run's folder being opened to the
    summary, with torchrun's world size; another rank writes nothing."""
    opened = time.time()
    files = run_state.RunFiles(str(tmp_path), master=True)
    open(files.log_path, "w").close()
    args = argparse.Namespace(arch="mobilenetv3_small", epochs=1)
    files.write_summary(args, tiny_moco(), torch.device("cpu"), 4, 64, 8, 8, 2.0, 256.0, 0)
    written = time.time()
    summary = json.load(open(files.summary_path))
    m = summary["machine"]
    assert (m["world_size"], summary["world_size"], m["torch"], m["threads"]) == (4, 4, torch.__version__,
                                                                               torch.get_num_threads())
    assert m["cpu"] and m["cores"] >= 1 and set(m["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16"}
    start, end = (datetime.datetime.fromisoformat(m[key]).timestamp() for key in ("start", "end"))
    assert int(opened) <= start <= end <= written and m["start"].endswith("+00:00")
    os.remove(files.summary_path)
    run_state.RunFiles(str(tmp_path), master=False).write_summary(args, tiny_moco(), torch.device("cpu"), 4, 64, 8,
                                                                  8, 2.0, 256.0, 0)
    assert not os.path.exists(files.summary_path)
