"""The paths only a GPU runs: `pytest -m cuda`, skipped without a CUDA device torch can use (conftest.py), and the
first step of `bash run_all.sh gpucheck`. Each test is small: the whole file takes about a minute on one GPU."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import knn_eval
import linear_eval
import models
import pretrain

pytestmark = pytest.mark.cuda
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the fmnist preset's small-model recipe, shrunk: 512 synthetic images, batch 128 (4 steps per epoch, 2 epochs)
GPU_RUN = ["--arch", "mobilenetv3_small", "--small-stem", "--data", "synthetic", "--subset", "512", "--img-size", "32",
           "--batch-size", "128", "--moco-k", "256", "--moco-m", "0.99", "--moco-t", "0.1", "--mlp-hidden", "256",
           "--head-bn", "--bn-splits", "2", "--symmetric", "--smooth", "0.1", "--aug", "mocov2",
           "--aug-backend", "batched", "--channels-last", "--epochs", "2", "--log-every", "2", "--workers", "0",
           "--device", "cuda"]


def test_batched_augment_on_cuda_draws_the_cpu_distribution():
    aug = data.BatchedAugment("mocov2", 32, (0.5,) * 3, (0.5,) * 3)
    n = 8192
    cpu = aug.sample_params(n, 32, 32, torch.Generator().manual_seed(0))
    gpu = aug.sample_params(n, 32, 32, torch.Generator(device="cuda").manual_seed(0), "cuda")
    def columns(t):
        t = t.cpu().double()
        return t.flatten(1) if t.dim() > 1 else t[:, None]

    for key in cpu:  # two streams, one distribution: every parameter's means within 5 standard errors
        a, b = columns(cpu[key]), columns(gpu[key])
        error = 5 * ((a.var(0) + b.var(0)) / n).sqrt() + 1e-9
        assert ((a.mean(0) - b.mean(0)).abs() <= error).all(), key
    images = data.synthetic_data("train", 64)[0]
    params = aug.sample_params(64, 32, 32, torch.Generator().manual_seed(1))
    on_gpu = aug.apply(images.cuda(), {k: v.cuda() for k, v in params.items()})
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), aug.apply(images, params), atol=1e-4)
    again = aug(images.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(again, aug(images.cuda(), torch.Generator(device="cuda").manual_seed(0)))


def test_a_step_makes_the_host_wait_for_nothing():
    """After warm-up, augmentation and the training step queue their kernels without one host synchronisation
    (torch raises on any with sync debug mode "error"): bf16 autocast, symmetric softened InfoNCE, split BN."""
    args = pretrain.get_args(GPU_RUN)
    args.img_size = 32
    device = torch.device("cuda")
    raw, optimizer, scaler, autocast = pretrain.build(args, device)
    raw.to(device, memory_format=torch.channels_last)
    train = data.load_data("synthetic", "pretrain", subset="512")
    order = torch.randperm(512).view(4, 128)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = data.view_batches(train, "mocov2", 32, list(order) * 2, device, gen=gen)
    try:
        for i, (x1, x2, _) in enumerate(batches):  # from i = 3 on, the views too are drawn in "error" mode
            if i == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            x1, x2 = x1.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
            loss, _, _ = pretrain.train_step(raw, x1, x2, optimizer, scaler, autocast, args, 0.99, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(loss.item())


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpu") / "bf16")
    pretrain.main(GPU_RUN + ["--amp", "bf16", "--max-steps", "4", "--out", out])
    return out


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_are_finite_and_resume_on_the_gpu(bf16_run, tmp_path, amp):
    out = bf16_run if amp == "bf16" else str(tmp_path / "fp16")
    if amp == "fp16":
        pretrain.main(GPU_RUN + ["--amp", "fp16", "--max-steps", "4", "--out", out])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["args"]["amp"] == amp and "cuda" in ckpt["rng"][0]
    if amp == "fp16":
        assert ckpt["scaler"]["scale"] > 0  # GradScaler at work
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copy(os.path.join(out, "checkpoint.pt"), resumed)  # the fixture's own checkpoint stays at step 4
    pretrain.main(["--out", resumed, "--resume"])  # to the end of the schedule, every flag from the checkpoint
    summary = json.load(open(os.path.join(resumed, "summary.json")))
    assert summary["complete"] and summary["steps"] == 8 and summary["device"].startswith("cuda")
    losses = [json.loads(line)["loss"] for line in open(os.path.join(resumed, "log.jsonl")) if '"loss"' in line]
    assert losses and all(math.isfinite(v) for v in losses)


def test_compile_does_not_recompile_after_warm_up():
    import torch._dynamo
    args = pretrain.get_args(GPU_RUN + ["--compile"])
    args.img_size = 32
    device = torch.device("cuda")
    raw, optimizer, scaler, autocast = pretrain.build(args, device)
    raw.to(device, memory_format=torch.channels_last)
    raw.encoder_q.compile()
    raw.encoder_k.compile()
    train = data.load_data("synthetic", "pretrain", subset="512")
    gen = torch.Generator(device=device).manual_seed(0)
    batches = data.view_batches(train, "mocov2", 32, list(torch.randperm(512).view(4, 128)) * 2, device, gen=gen)
    torch._dynamo.reset()
    try:
        for i, (x1, x2, _) in enumerate(batches):
            torch._dynamo.config.error_on_recompile = i >= 3  # the warm-up may compile each encoder's graphs
            x1, x2 = x1.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
            loss, _, _ = pretrain.train_step(raw, x1, x2, optimizer, scaler, autocast, args, 0.99, 0.1)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert math.isfinite(loss.item())


def test_knn_and_linear_evaluation_on_cuda(bf16_run, tmp_path):
    ckpt = os.path.join(bf16_run, "checkpoint.pt")
    flags = ["--ckpt", ckpt, "--test-subset", "200", "--channels-last"]
    gpu = knn_eval.main(flags + ["--device", "cuda", "--k", "20", "200", "--sweep", "--diagnostics",
                                 "--diag-per-class", "10"])
    cpu = knn_eval.main(flags + ["--device", "cpu", "--k", "20", "200", "--diag-per-class", "10", "--diagnostics"])
    assert gpu["device"].startswith("cuda")
    for a, b in zip(gpu["knn"], cpu["knn"]):  # the same features up to rounding: a neighbour or two may swap
        assert abs(a["top1"] - b["top1"]) <= 2.0
    assert abs(gpu["diagnostics"]["instance_accuracy"] - cpu["diagnostics"]["instance_accuracy"]) <= 2.0
    for protocol in ([], ["--cached"]):  # crops and flips drawn on the GPU; cached features
        res = linear_eval.main(flags + ["--device", "cuda", "--epochs", "2", "--schedule", "1", *protocol,
                                        "--json", str(tmp_path / f"linear{len(protocol)}.json")])
        assert res["device"].startswith("cuda") and 0 <= res["top1"] <= 100


def torchrun(processes, *argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_torchrun_one_process_with_nccl(tmp_path):
    proc = torchrun(1, "pretrain.py", *GPU_RUN, "--max-steps", "4", "--out", str(tmp_path / "ddp1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 1 x cuda:0" in proc.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_keep_ranks_identical(tmp_path):
    result = tmp_path / "ranks.json"
    proc = torchrun(2, os.path.join("tests", "ddp_worker.py"), str(result), *GPU_RUN, "--max-steps", "4",
                    "--out", str(tmp_path / "ddp2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(result.read_text())
    assert ranks["identical"], ranks


def test_split_bn_takes_the_folded_path_on_cuda_and_equals_the_loop():
    torch.manual_seed(0)
    bn = models.split_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(6)), 4)[0].cuda()
    x = (torch.randn(16, 6, 5, 5, device="cuda") * 3 + 1).contiguous(memory_format=torch.channels_last)
    loop, folded = bn.per_group(x), bn.folded(x)
    for a, b in zip(loop, folded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    calls = []
    real = bn.folded
    bn.folded = lambda t: calls.append(t.shape) or real(t)
    bn(x)
    assert calls == [x.shape]  # the training forward on CUDA went through the fold
