import json
import math

import pytest
import torch

import bench
from models import build_backbone

CPU = ["--device", "cpu"]  # these tests are meant for the CPU, GPU or not


@pytest.mark.parametrize("arch, macs", [("resnet18", 1.8136e9), ("mobilenetv3_large", 0.2166e9)])
def test_forward_macs_match_the_published_counts(arch, macs):
    # torchvision's tables: 1.81 / 0.22 GFLOPS (multiply-adds) at 224 px; minus the dropped 1000-class Linear
    assert bench.count_macs(build_backbone(arch)[0], 224) == pytest.approx(macs, rel=0.01)


def test_the_benchmark_times_a_real_step_and_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(CPU + ["--arch", "mobilenetv3_small", "--batch-size", "16", "--moco-k", "64", "--warmup", "1",
                      "--steps", "1", "--workers", "0", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    for key in ("images_per_s", "step_ms", "augment_ms", "query_fwd_bwd_ms", "torchvision_images_per_s",
                "batched_over_torchvision", "channels_last_speedup", "peak_memory_mb", "forward_mmacs",
                "fp32_images_per_s", "bf16_images_per_s", "bf16_over_fp32", "fp16_images_per_s", "fp16_over_fp32"):
        assert row[key] > 0, key
    # on a CPU the default (--amp auto) is fp32; bf16 and fp16 autocast are timed beside it
    assert row["fp32_images_per_s"] == row["images_per_s"]
    assert row["bf16_over_fp32"] == pytest.approx(row["bf16_images_per_s"] / row["images_per_s"])
    assert row["fp16_over_fp32"] == pytest.approx(row["fp16_images_per_s"] / row["images_per_s"])
    assert math.isfinite(row["rest_ms"]) and math.isfinite(row["moco_overhead"])  # differences of timings
    assert row["backbone_params"] == 1_517_856


def test_augmentation_only_mode(tmp_path, capsys):
    out = tmp_path / "aug.json"
    bench.main(CPU + ["--aug-only", "--img-size", "32", "--batch-size", "8", "--batches", "1", "--workers", "0",
                      "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {r["backend"] for r in rows} == {"torchvision", "batched"}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_no_compare_times_the_default_configuration_alone(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(CPU + ["--arch", "mobilenetv3_small", "--batch-size", "16", "--moco-k", "64", "--warmup", "1",
                      "--steps", "1", "--workers", "0", "--no-compare", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["images_per_s"] > 0
    assert not [key for key in row if key.endswith("_images_per_s") or key.endswith("_speedup")
                or "_over_" in key]  # no other backend, format or precision was timed


def test_every_network_is_timed_in_a_fresh_process_on_every_device(monkeypatch):
    """In one process torch.compile passes its recompile limit (8) by the fifth network, which then silently runs
    eager: each network gets a process of its own, on a GPU as on a CPU."""
    timed = []
    monkeypatch.setattr(bench, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(bench, "device_name", lambda device: "a GPU")
    monkeypatch.setattr(bench, "bench_arch", lambda *a: pytest.fail("a network was timed in this process"))
    monkeypatch.setattr(bench, "in_fresh_process", lambda args, arch, size, device: timed.append(arch) or
                        {"arch": arch, "images_per_s": 1.0})
    bench.main(["--arch", "resnet18", "mobilenetv3_small", "efficientnet_b0"])
    assert timed == ["resnet18", "mobilenetv3_small", "efficientnet_b0"]


def test_fp32_means_fp32_and_the_settings_come_back():
    before = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    with bench.true_fp32():
        assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
