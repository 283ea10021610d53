import functools
import math

import pytest
import torch
import torchvision
from torch import nn

import models
from models import ARCHS, STUDY, InvertedResidual, MoCo, SmallMapConv2d, build_backbone, build_head, load_pretrained

# torchvision's models: backbone parameters (ImageNet stem, small stem), parameters with the 1000-class Linear, and d.
PARAMS = {
    "resnet18": (11_176_512, 11_168_832, 11_689_512, 512),
    "resnet34": (21_284_672, 21_276_992, 21_797_672, 512),
    "resnet50": (23_508_032, 23_500_352, 25_557_032, 2048),
    "mobilenetv3_large": (4_202_032, 4_202_032, 5_483_032, 1280),
    "mobilenetv3_small": (1_517_856, 1_517_856, 2_542_856, 1024),
    "efficientnet_b0": (4_007_548, 4_007_548, 5_288_548, 1280),
}
# torchvision's constructor and the name of its final classification Linear, which our backbones leave out.
TORCHVISION = {
    "resnet18": ("resnet18", "fc"),
    "resnet34": ("resnet34", "fc"),
    "resnet50": ("resnet50", "fc"),
    "mobilenetv3_large": ("mobilenet_v3_large", "classifier.3"),
    "mobilenetv3_small": ("mobilenet_v3_small", "classifier.3"),
    "efficientnet_b0": ("efficientnet_b0", "classifier.1"),
}


def count(module):
    return sum(p.numel() for p in module.parameters())


@functools.cache
def cached_backbone(name, small_stem):
    """For tests that only read the model (eval mode, no weight changes)."""
    torch.manual_seed(0)
    model, dim = build_backbone(name, small_stem)
    return model.eval(), dim


def reference(name, small_stem, size):
    """torchvision's model with its stem changed the way models.py changes it when small_stem, no dropout (ours has
    none; it sits in torchvision's classifier), random BN affine parameters and biases, and BN running statistics
    measured on random images, so that BN in eval mode is exercised and the features depend on the input. Returns the
    model with its class Linear replaced by Identity, and its state dict without that Linear."""
    constructor, last = TORCHVISION[name]
    tv = getattr(torchvision.models, constructor)(weights=None)
    if small_stem and name.startswith("resnet"):
        tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    elif small_stem:  # stem conv and the depthwise conv of the first stride-2 block
        tv.features[0][0].stride = (1, 1)
        next(m for m in tv.features[1:].modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)).stride = (1, 1)
    batch_norms = [m for m in tv.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for module in tv.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        momenta = [bn.momentum for bn in batch_norms]
        for bn in batch_norms:
            bn.momentum = None  # cumulative average: after one batch, exactly its statistics
        tv.train()(torch.randn(8, 3, size, size))
        for bn, momentum in zip(batch_norms, momenta):
            bn.momentum = momentum
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith(last + ".")}
    parent, _, child = last.rpartition(".")
    setattr(tv.get_submodule(parent), child, nn.Identity())
    return tv, state, last


@pytest.mark.parametrize("name", ARCHS)
def test_parameter_counts_match_spec(name):
    backbone, small, with_classes, dim = PARAMS[name]
    model, d = cached_backbone(name, False)
    assert d == dim
    assert count(model) == backbone
    assert count(cached_backbone(name, True)[0]) == small
    assert count(model) + count(nn.Linear(d, 1000)) == with_classes


@pytest.mark.parametrize("small_stem", [False, True], ids=["imagenet_stem", "small_stem"])
@pytest.mark.parametrize("name", ARCHS)
def test_weights_and_features_match_torchvision(name, small_stem):
    torch.manual_seed(0)
    size = 32 if small_stem else 64
    tv, state, last = reference(name, small_stem, size)
    ours, _ = build_backbone(name, small_stem)
    ours.load_state_dict(state)  # strict: same names, shapes and buffers
    if not small_stem:  # and back into torchvision: only its class Linear is missing
        tv_with_head = getattr(torchvision.models, TORCHVISION[name][0])(weights=None)
        missing, unexpected = tv_with_head.load_state_dict(ours.state_dict(), strict=False)
        assert sorted(missing) == [f"{last}.bias", f"{last}.weight"] and unexpected == []

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = tv.eval()(x)
        # input-dependent, so the match means something
        assert (expected[0] - expected[1]).abs().mean() > 0.05 * expected.abs().mean()
        torch.testing.assert_close(ours.eval()(x), expected, atol=1e-5, rtol=1e-5)
        # Training mode checks batch statistics, BN momentum (running stats) and stochastic depth (same draws).
        torch.manual_seed(1)
        ours_train = ours.train()(x)
        torch.manual_seed(1)
        torch.testing.assert_close(ours_train, tv.train()(x), atol=1e-5, rtol=1e-5)
    tv_state = tv.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, tv_state[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", ARCHS)
def test_initialisation_matches_torchvision(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, TORCHVISION[name][0])(weights=None).state_dict()
    for key, value in cached_backbone(name, False)[0].state_dict().items():
        reference_value = tv[key].float()
        if reference_value.numel() == 1 or reference_value.std() == 0:  # BN and bias constants, counters
            assert torch.equal(value, tv[key]), key
        else:  # random init: same spread (kaiming fan-out for convs, N(0, 0.01) for MobileNetV3's Linear)
            assert 0.8 < value.std() / reference_value.std() < 1.25, key
            assert value.mean().abs() < 4 * reference_value.std() / value.numel() ** 0.5, key  # zero mean


@pytest.mark.parametrize("name", ARCHS)
def test_feature_shape_total_stride_and_channels_last(name):
    for small_stem, stride in ((False, 32), (True, 8)):
        model, d = cached_backbone(name, small_stem)
        pooled_input = []
        hook = model.avgpool.register_forward_hook(lambda m, inputs, out: pooled_input.append(inputs[0].shape))
        try:
            with torch.no_grad():
                for size in (28, 32, 64, 224):
                    batch = 1 if small_stem and size == 224 else 2
                    x = torch.randn(batch, 3, size, size)
                    y = model(x.to(memory_format=torch.channels_last))
                    assert y.shape == (batch, d)
                    side = math.ceil(size / stride)  # 'same' padding: each stride-2 layer maps H to ceil(H / 2)
                    assert pooled_input[-1][-2:] == (side, side)
                    if size == 32:
                        # two kernel families by design: the tolerance scales with the output's size
                        torch.testing.assert_close(y, model(x), atol=1e-5 * y.abs().max().item(), rtol=1e-4)
        finally:
            hook.remove()


def test_stochastic_depth_only_in_training():
    torch.manual_seed(0)
    model, _ = build_backbone("efficientnet_b0", small_stem=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.train()
        torch.manual_seed(1)
        first = model(x)
        assert not torch.allclose(first, model(x))  # different blocks dropped
        model.eval()
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


def test_moco_pretrains_efficientnet_without_stochastic_depth():
    moco = MoCo("efficientnet_b0", queue_size=32)
    for encoder in (moco.encoder_q, moco.encoder_k):
        rates = [m.drop_prob for m in encoder.modules() if isinstance(m, InvertedResidual)]
        assert len(rates) == 16 and rates == [0.0] * 16
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # in training mode (batch BN statistics) the query encoder is deterministic: no drops
        torch.testing.assert_close(moco.encoder_q(x), moco.encoder_q(x), atol=0, rtol=0)



@functools.cache
def convolution_shapes():
    """Every padded convolution of the five study networks as it meets its input at 28, 32 and 224 px, ImageNet and
    small stem: {(in, out, kernel, stride, padding, groups, height, width)}, traced on the meta device (shapes only)."""
    shapes = set()

    def record(conv, inputs, output):
        shapes.add((conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                    conv.groups, *inputs[0].shape[2:]))

    for name in STUDY:
        for small_stem in (False, True):
            model = build_backbone(name, small_stem)[0].to("meta").eval()
            for conv in model.modules():
                if isinstance(conv, SmallMapConv2d):
                    conv.register_forward_hook(record)
            for size in (28, 32, 224):
                model(torch.empty(1, 3, size, size, device="meta"))
    return sorted(shapes)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_small_map_conv_equals_conv2d_on_every_shape_of_the_networks(isa, monkeypatch):
    """The oneDNN workaround computes what nn.Conv2d computes, output and both gradients, for every padded
    convolution the study networks run (each shape it changes at batch 2, channels_last as the runs use it), under
    the rules of both kinds of x86 CPU; the taps it drops get an exact zero gradient either way. The shapes it leaves
    alone are shown to reach F.conv2d with the module's own weight and padding."""
    monkeypatch.setattr(models, "x86_isa", lambda: isa)
    changed = {"live taps": 0, "explicit zeros": 0}
    # and three maps that are not square, where the two axes keep different taps
    odd = [(16, 32, 3, 1, 1, 1, 1, 3), (16, 16, 5, 1, 2, 16, 2, 5), (16, 16, 5, 2, 2, 16, 4, 1)]
    for cin, cout, kernel, stride, padding, groups, height, width in convolution_shapes() + odd:
        first, stop, lead, trail = models.live_taps(min(height, width), kernel, stride, padding)
        explicit = isa == "avx2" and 1 < groups == cin and 2 * lead >= min(height, width)
        changed["live taps"] += stop - first < kernel
        changed["explicit zeros"] += explicit
        if not explicit and stop - first == kernel:  # neither step: F.conv2d with the module's own weight and padding
            assert (first, lead, trail) == (0, padding, None)
            continue
        torch.manual_seed(0)
        conv = SmallMapConv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        x = torch.randn(2, cin, height, width).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = conv(x)
        grad = torch.randn_like(out)
        weight_grad, input_grad = torch.autograd.grad(out, (conv.weight, x), grad)
        expected = torch.nn.functional.conv2d(x, conv.weight, None, stride, padding, 1, groups)
        expected_weight_grad, expected_input_grad = torch.autograd.grad(expected, (conv.weight, x), grad)
        shape = f"in {cin} out {cout} kernel {kernel} stride {stride} groups {groups} on {height}x{width}"
        scale = expected.abs().max().item()
        torch.testing.assert_close(out, expected, atol=1e-5 * scale, rtol=1e-5, msg=shape)
        torch.testing.assert_close(input_grad, expected_input_grad, rtol=1e-5,
                                   atol=1e-5 * expected_input_grad.abs().max().item(), msg=shape)
        torch.testing.assert_close(weight_grad, expected_weight_grad, rtol=1e-5,
                                   atol=1e-5 * expected_weight_grad.abs().max().item(), msg=shape)
        dead = torch.ones(kernel, kernel, dtype=torch.bool)
        rows, columns = (models.live_taps(size, kernel, stride, padding)[:2] for size in (height, width))
        dead[slice(*rows), slice(*columns)] = False
        assert torch.equal(weight_grad[:, :, dead], torch.zeros_like(weight_grad[:, :, dead])), shape
        assert torch.equal(expected_weight_grad[:, :, dead], weight_grad[:, :, dead]), shape
    # the test means something: both steps met real shapes of the networks (layer4 on 1x1 maps, 5x5 depthwise on 2x2)
    assert changed["live taps"] >= 10 and (changed["explicit zeros"] >= 10) == (isa == "avx2"), changed


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("name", STUDY)
def test_the_workaround_leaves_a_training_step_as_it_was(name, isa, monkeypatch):
    """A whole backbone at the demo's 28 px, in training mode (batch BN statistics), with and without the workaround:
    the same features and the same gradient for every parameter, within fp32 rounding."""
    monkeypatch.setattr(models, "x86_isa", lambda: isa)
    torch.manual_seed(0)
    model = build_backbone(name)[0].to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    results = []
    for workaround in (False, True):
        monkeypatch.setattr(models, "ONEDNN_WORKAROUND", workaround)
        torch.manual_seed(1)  # the same stochastic-depth draws (EfficientNet) in both
        features = model(x)
        grads = torch.autograd.grad(features.square().mean(), list(model.parameters()))
        results.append((features, grads))
    (features, grads), (features_w, grads_w) = results
    torch.testing.assert_close(features_w, features, atol=1e-5 * features.abs().max().item(), rtol=1e-5)
    # BN biases followed by another BN have a gradient of 0 up to rounding: the scale is the largest gradient's
    largest = max(g.abs().max().item() for g in grads)
    for (key, _), g, g_w in zip(model.named_parameters(), grads, grads_w):
        torch.testing.assert_close(g_w, g, atol=1e-5 * largest, rtol=1e-4, msg=key)


def test_a_convolution_whose_every_output_sees_padding_alone_is_left_as_it_is():
    """Padding wider than the kernel (no backbone has it, nn.Conv2d allows it): no tap touches a pixel at some
    outputs of every row, none at all here; SmallMapConv2d then computes as nn.Conv2d does."""
    assert models.live_taps(1, 3, 4, 3) == (0, 3, 3, None)
    conv = SmallMapConv2d(4, 4, 1, 2, 1, bias=False)
    x = torch.randn(2, 4, 1, 1)
    assert torch.equal(conv(x), torch.nn.functional.conv2d(x, conv.weight, None, 2, 1))


def test_the_workaround_follows_onednns_isa_cap(monkeypatch):
    """The rules follow the kernels oneDNN runs: ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) below AVX-512 means AVX2
    rules on an AVX-512 CPU; CPUs other than x86 keep nn.Conv2d; a GPU never takes the workaround."""
    for capability, cap, expected in (("AVX512", None, "avx512"), ("AVX512", "AVX2", "avx2"),
                                      ("AVX512", "avx512_core_bf16", "avx512"), ("AVX2", None, "avx2"),
                                      ("AVX512", "SSE41", "avx2"), ("DEFAULT", None, None), ("SVE256", None, None)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        models.x86_isa.cache_clear()
        assert models.x86_isa() == expected, (capability, cap)
    models.x86_isa.cache_clear()
    monkeypatch.undo()
    models.x86_isa.cache_clear()
    conv = SmallMapConv2d(8, 8, 3, padding=1, bias=False)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: calls.append(a))
    meta = conv.to("meta")(torch.empty(2, 8, 1, 1, device="meta"))  # not a CPU: nn.Conv2d's forward, 3x3 weight
    assert meta.shape == (2, 8, 1, 1) and calls == []


def test_unknown_architecture_lists_the_valid_names():
    with pytest.raises(SystemExit, match="unknown architecture 'resnet101'; choose one of: " + ", ".join(ARCHS)):
        build_backbone("resnet101")


def test_head_is_linear_relu_linear():
    head = build_head(512, 2048, 64)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (512, 2048, 64)
    assert head(torch.randn(2, 512)).shape == (2, 64)


def pretrain_checkpoint(arch="mobilenetv3_small", small_stem=True, mlp_hidden=0):
    """A checkpoint laid out as pretrain.py writes it (INTERFACES.md), with different query and key weights."""
    torch.manual_seed(0)
    encoders, model_state = {}, {}
    for prefix in ("encoder_q", "encoder_k"):
        backbone, d = build_backbone(arch, small_stem)
        head = build_head(d, mlp_hidden or d)
        encoders[prefix] = (backbone, head)
        model_state.update({f"{prefix}.backbone.{k}": v for k, v in backbone.state_dict().items()})
        model_state.update({f"{prefix}.head.{k}": v for k, v in head.state_dict().items()})
    model_state.update(queue=torch.randn(128, 64), queue_ptr=torch.zeros(1, dtype=torch.long))
    args = {"arch": arch, "small_stem": small_stem, "data": "synthetic", "img_size": 32, "mlp_hidden": mlp_hidden,
            "moco_dim": 128, "bn_splits": 8}
    ckpt = {"args": args, "model": model_state, "optimizer": {}, "epoch": 1, "step": 10,
            "rng": {"torch": torch.get_rng_state()}, "version": 1}
    return ckpt, encoders


def assert_same_weights(a, b):
    b_state = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b_state[key]), key


@pytest.mark.parametrize("encoder, prefix, mlp_hidden", [("query", "encoder_q", 0), ("key", "encoder_k", 256)])
def test_load_pretrained_round_trip(tmp_path, encoder, prefix, mlp_hidden):
    ckpt, encoders = pretrain_checkpoint(mlp_hidden=mlp_hidden)
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    backbone, head, feat_dim, args = load_pretrained(tmp_path / "checkpoint.pt", encoder)
    assert feat_dim == 1024 and args == ckpt["args"]
    assert not backbone.training and not head.training
    assert head[0].out_features == (mlp_hidden or 1024)  # mlp_hidden 0 means hidden = d
    assert_same_weights(backbone, encoders[prefix][0])
    assert_same_weights(head, encoders[prefix][1])
    other = encoders["encoder_k" if prefix == "encoder_q" else "encoder_q"][0]
    assert not torch.equal(backbone.features[0][0].weight, other.features[0][0].weight)


def test_load_pretrained_rejects_bad_checkpoints(tmp_path):
    ckpt, _ = pretrain_checkpoint()
    with pytest.raises(SystemExit, match="missing.pt does not exist"):
        load_pretrained(tmp_path / "missing.pt")

    good = tmp_path / "checkpoint.pt"
    torch.save(ckpt, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SystemExit, match=r"not a readable checkpoint \(corrupt or truncated\?\)"):
        load_pretrained(truncated)

    no_model = tmp_path / "no_model.pt"
    torch.save({"args": ckpt["args"]}, no_model)
    with pytest.raises(SystemExit, match="not a pretrain.py checkpoint"):
        load_pretrained(no_model)

    wrong_arch = tmp_path / "wrong_arch.pt"
    torch.save({**ckpt, "args": {**ckpt["args"], "arch": "resnet18"}}, wrong_arch)
    with pytest.raises(SystemExit, match="do not fit architecture 'resnet18'"):
        load_pretrained(wrong_arch)
