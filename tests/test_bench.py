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
                      "--steps", "1", "--workers", "0", "--primitives", "1000", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    for key in ("images_per_s", "step_ms", "augment_ms", "query_fwd_bwd_ms", "torchvision_images_per_s",
                "batched_over_torchvision", "channels_last_speedup", "peak_memory_mb", "forward_mmacs",
                "fp32_images_per_s", "bf16_images_per_s", "bf16_over_fp32", "fp16_images_per_s", "fp16_over_fp32",
                "plain_conv_images_per_s", "plain_conv_query_fwd_bwd_ms", "workaround_images_per_s",
                "workaround_query_fwd_bwd_ms", "workaround_speedup", "workaround_query_speedup"):
        assert row[key] > 0, key
    plain_query_ms, query_ms = row["plain_conv_query_fwd_bwd_ms"], row["workaround_query_fwd_bwd_ms"]
    assert row["workaround_query_speedup"] == pytest.approx(plain_query_ms / query_ms)
    assert row["workaround_speedup"] == pytest.approx(row["workaround_images_per_s"] / row["plain_conv_images_per_s"])
    # --primitives: where a step's oneDNN time goes, without the workaround and with it, read from oneDNN itself
    assert [p["workaround"] for p in row["primitives"]] == [False, True]
    for profile in row["primitives"]:  # every implementation (1000 asked): which ran does not depend on timing
        assert 0 < profile["onednn_ms"] < profile["step_ms"] and 6 <= len(profile["rows"]) < 1000
        assert [r["ms"] for r in profile["rows"]] == sorted((r["ms"] for r in profile["rows"]), reverse=True)
        # oneDNN's verbose timer has about a microsecond's resolution: a tiny reorder can read 0.0 ms (share 0)
        assert all(r["calls"] >= 1 and 0 <= r["share"] < 1 for r in profile["rows"])
        assert sum(r["share"] for r in profile["rows"]) == pytest.approx(profile["onednn_ms"] / profile["step_ms"])
        assert {"forward_training", "backward_data", "backward_weights"} <= {
            r["pass"] for r in profile["rows"] if r["primitive"] == "convolution"}
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


def test_the_primitive_table_sums_onednns_own_lines_per_step():
    """Two steps of verbose lines (oneDNN v3's layout) against a hand count: times summed per implementation, pass
    and shape, divided by the steps; other lines (info, creation, a graph, Python's prints) left out."""
    conv = "onednn_verbose,v1,primitive,exec,cpu,convolution,{},{},src:f32 dst:f32,,alg:convolution_direct,{},{}"
    lines = ["onednn_verbose,v1,info,oneDNN v3.12.0", "a line printed by Python",
             "onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,jit:avx2,forward_training,,,,mb2,0.5"]
    for _ in range(2):
        lines += [conv.format("x64:gemm:jit", "backward_weights", "mb128_ic512oc512_ih1kh3ph1", 30.0),
                  conv.format("x64:gemm:jit", "backward_weights", "mb128_ic512oc512_ih1kh3ph1", 20.0),
                  conv.format("jit:avx2", "forward_training", "mb128_ic512oc512_ih1kh3ph1", 4.0),
                  "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32 dst:f32,,,512x512x3x3,1.0"]
    rows, onednn_ms = bench.primitive_table(lines, steps=2, step_s=0.1, top=2)
    assert onednn_ms == pytest.approx(55.0)
    assert [(r["implementation"], r["pass"], r["calls"], r["ms"], r["share"]) for r in rows] == [
        ("x64:gemm:jit", "backward_weights", 2, pytest.approx(50.0), pytest.approx(0.5)),
        ("jit:avx2", "forward_training", 1, pytest.approx(4.0), pytest.approx(0.04))]


def test_workaround_only_times_the_default_against_plain_convolutions_alone(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(CPU + ["--arch", "mobilenetv3_small", "--batch-size", "16", "--moco-k", "64", "--warmup", "1",
                      "--steps", "1", "--workers", "0", "--workaround-only", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["workaround_speedup"] > 0 and row["plain_conv_images_per_s"] > 0
    assert "torchvision_images_per_s" not in row and "bf16_over_fp32" not in row
