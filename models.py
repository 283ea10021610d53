"""The MoCo module, its projection head and the backbones (He et al. 2020; Chen et al. 2020 for MoCo-v2's MLP head).

In reading order: MoCo (query encoder, momentum key encoder, queue, shuffle BN) and split BN; the projection head and
reading a checkpoint's encoders; the backbones. Every architecture is written out as a table of stages or blocks that
can be read against its paper. A backbone maps images [B, 3, H, W] to pooled features [B, d]. Its parameter and
buffer names equal those of torchvision's reference model minus the final classification Linear, so weights move
both ways. small_stem=True removes the first two downsamplings (total stride 8 instead of 32) for 28-32 px images;
ResNet loses the 7x7 conv and the max-pool, MobileNetV3 / EfficientNet only change strides. Last, SmallMapConv2d: a
workaround for a slow path of oneDNN, the CPU's convolution library, that every backbone's padded convolutions use.
"""
import copy
import os
from collections import OrderedDict
from functools import cache, partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------------------
# MoCo: query encoder, momentum key encoder, queue of negatives (He et al. 2020, MoCo)
# ---------------------------------------------------------------------------------------------------------------

class MoCo(nn.Module):
    """The two encoders (each backbone + projection head), the queue of K negatives and its pointer. forward() is one
    step's embeddings; the loss is the caller's (losses.py), so that one module serves every recipe."""

    def __init__(self, arch, small_stem=False, dim=128, mlp_hidden=0, queue_size=65536, bn_splits=1,
                 symmetric=False, head_bn=False):
        super().__init__()
        backbone, feat_dim = build_backbone(arch, small_stem)
        # EfficientNet-B0 is pretrained without stochastic depth, as light-moco does (docs/fidelity.md has the
        # measurement)
        for block in backbone.modules():
            if isinstance(block, InvertedResidual):
                block.drop_prob = 0.0
        self.symmetric = symmetric
        self.encoder_q = nn.Sequential(OrderedDict(backbone=backbone,
                                                   head=build_head(feat_dim, mlp_hidden or feat_dim, dim, head_bn)))
        if bn_splits > 1:
            split_batchnorm(self.encoder_q, bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, m):
        """theta_k <- m theta_k + (1 - m) theta_q (parameters only; each encoder keeps its own BN statistics)."""
        k_params = list(self.encoder_k.parameters())
        torch._foreach_mul_(k_params, m)
        torch._foreach_add_(k_params, [p.detach() for p in self.encoder_q.parameters()], alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys):
        """Replace the oldest queue entries by `keys` [N, dim] (already gathered from all ranks), wrapping around."""
        size = self.queue.shape[1]
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (self.queue_ptr[0] + len(keys)) % size

    @torch.no_grad()
    def key_embed(self, x):
        """Key embeddings of x with shuffle BN: the batch is permuted (across all ranks under DDP) before the key
        encoder and restored after, so BN statistics can't reveal which key belongs to which query."""
        x_all = concat_all_gather(x)
        perm = torch.randperm(len(x_all), device=x.device)
        if is_distributed():
            dist.broadcast(perm, src=0)  # every rank must use rank 0's permutation
            rank = dist.get_rank()
        else:
            rank = 0
        mine = perm.view(-1, len(x))[rank]  # the samples this rank encodes
        k = F.normalize(self.encoder_k(x_all[mine]), dim=1)
        k_all = torch.empty(len(x_all), k.shape[1], dtype=k.dtype, device=k.device)
        k_all[perm] = concat_all_gather(k)  # undo the shuffle
        return k_all.view(-1, len(x), k.shape[1])[rank]

    def forward(self, x1, x2, m, both_queries=False):
        """One MoCo step's embeddings: queries of x1 (and of x2 when symmetric or asked), keys of x2 (and of x1 when
        symmetric) from the key encoder after one momentum step, and the queue of negatives as this step's loss must
        see it. The new keys (from every rank, in rank order) then replace the oldest entries of self.queue, as in
        MoCo's builder: the returned queue is a copy, so they are not among this step's negatives."""
        # x1, x2: [N, 3, H, W], two views of this process's N images
        q1 = F.normalize(self.encoder_q(x1), dim=1)  # queries: [N, dim], unit length
        q2 = F.normalize(self.encoder_q(x2), dim=1) if self.symmetric or both_queries else None
        with torch.no_grad():  # no gradient to the keys
            self.momentum_update(m)
            k2 = self.key_embed(x2)  # keys: [N, dim], unit length, this process's share after shuffle BN
            k1 = self.key_embed(x1) if self.symmetric else None
            queue = self.queue.clone()  # negatives: [dim, K], as they were before this step
            self.enqueue(concat_all_gather(torch.cat([k2, k1]) if self.symmetric else k2))  # keys of all ranks
        return q1, q2, k1, k2, queue


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over `num_splits` equal consecutive groups of the batch in training: emulates the per-GPU BN of a
    multi-GPU run on one device, so shuffled keys can't share statistics with their queries. Takes [N, C] (the
    head) or [N, C, H, W] (the backbone). The running statistics move by the mean of the groups' updates. State-dict
    keys are BatchNorm's, so weights trained with split BN load into plain BN and back."""

    def __init__(self, num_features, num_splits, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2D or 4D input, got {x.dim()}D")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        if x.shape[0] % self.num_splits:
            raise ValueError(f"batch of {x.shape[0]} does not split into {self.num_splits} BN groups")
        # A GPU would launch each kernel once per group and layer, so off the CPU the groups fold into one
        # batch_norm. The CPU keeps one per group (consecutive groups are views in either memory format), at the
        # demo's 2 groups the faster of the two there (docs/performance.md).
        out, means, variances = self.per_group(x) if x.device.type == "cpu" else self.folded(x)
        self.running_mean.copy_(means.mean(0))
        self.running_var.copy_(variances.mean(0))
        self.num_batches_tracked.add_(1)
        return out

    def per_group(self, x):
        """(output, every group's updated running mean and variance [S, C]): one plain batch_norm per group."""
        outs, means, variances = [], [], []
        for group in x.chunk(self.num_splits):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(F.batch_norm(group, mean, var, self.weight, self.bias, True, self.momentum, self.eps))
            means.append(mean)
            variances.append(var)
        return torch.cat(outs), torch.stack(means), torch.stack(variances)

    def folded(self, x):
        """per_group's result from one batch_norm: the groups side by side in the channel dimension (group g's
        channel c becomes channel g * C + c of a batch of N / S samples), running statistics and affine parameters
        repeated S times. torch.cat copies in x's memory format (channels_last stays channels_last)."""
        s = self.num_splits
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(torch.cat(x.chunk(s), 1), mean, var, self.weight.repeat(s), self.bias.repeat(s), True,
                           self.momentum, self.eps)
        return torch.cat(out.chunk(s, 1)), mean.view(s, -1), var.view(s, -1)


def split_batchnorm(module, num_splits):
    """Replace every BatchNorm1d / BatchNorm2d in `module` by a SplitBatchNorm with the same settings and state."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, num_splits)
    return module


def is_distributed():
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def concat_all_gather(x):
    """Concatenate x from all ranks along the batch (rank order); x itself on one process."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------------------
# The projection head, and reading a checkpoint's encoders
# ---------------------------------------------------------------------------------------------------------------

def build_head(feat_dim, hidden, out_dim=128, bn=False):
    """MoCo-v2 projection MLP: Linear(d, h) -> ReLU -> Linear(h, out_dim); with bn, a BatchNorm on the hidden
    layer (Linear -> BN -> ReLU -> Linear, as SimCLR and MoCo v3 heads)."""
    layers = [nn.Linear(feat_dim, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else [])
    return nn.Sequential(*layers, nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def read_checkpoint(path, advice="pass the checkpoint.pt that pretrain.py wrote"):
    """The dict pretrain.py saved at path, on the CPU; a missing, unreadable or foreign file is one sentence ending
    with `advice`."""
    if os.path.isdir(path):
        inside = " (it holds one)" if os.path.isfile(os.path.join(path, "checkpoint.pt")) else ""
        raise SystemExit(f"checkpoint {path} is a directory: pass the checkpoint.pt in it{inside}.")
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} does not exist: {advice}.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged files raise many types: RuntimeError, EOFError, KeyError, UnpicklingError
        said = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        raise SystemExit(f"{path} is not a readable checkpoint (corrupt or truncated?); torch.load said "
                         f"{type(err).__name__} {said}: {advice}.") from err
    if not isinstance(ckpt, dict) or not {"model", "args", "step"} <= ckpt.keys() or "arch" not in ckpt["args"]:
        raise SystemExit(f"{path} is not a pretrain.py checkpoint (it needs 'model', 'args' and 'step' entries): "
                         f"{advice}.")
    return ckpt


def load_pretrained(path, encoder="query"):
    """(backbone, head, feat_dim, args) of the query ("query") or momentum ("key") encoder in a pretrain.py
    checkpoint, on the CPU in eval mode."""
    ckpt = read_checkpoint(path)
    args = ckpt["args"]
    backbone, feat_dim = build_backbone(args["arch"], args.get("small_stem", False))
    head = build_head(feat_dim, args.get("mlp_hidden") or feat_dim, args.get("moco_dim", 128),
                      args.get("head_bn", False))
    prefix = {"query": "encoder_q", "key": "encoder_k"}[encoder]
    for part, module in (("backbone", backbone), ("head", head)):
        start = f"{prefix}.{part}."
        weights = {k[len(start):]: v for k, v in ckpt["model"].items() if k.startswith(start)}
        try:
            module.load_state_dict(weights)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:200]
            raise SystemExit(f"{path}: the {part} weights under '{start}' do not fit architecture '{args['arch']}' "
                             f"(small_stem={args.get('small_stem', False)}) named in its args: {detail}") from err
        if not all(t.isfinite().all() for t in weights.values() if t.is_floating_point()):
            raise SystemExit(f"{path} holds NaN or inf {part} weights (its run diverged): evaluate an earlier "
                             f"checkpoint, or pretrain again with a lower --lr.")
    return backbone.eval(), head.eval(), feat_dim, args


def load_teacher(path, moco_dim):
    """DisCo's frozen teacher: the query encoder (backbone and head) of a pretrain.py checkpoint, in eval mode, its
    embeddings as wide as the student's (moco_dim)."""
    backbone, head, _, saved = load_pretrained(path)
    if saved.get("moco_dim", 128) != moco_dim:
        raise SystemExit(f"the teacher {path} embeds in {saved['moco_dim']} dimensions, the student in {moco_dim}: "
                         f"pass --moco-dim {saved['moco_dim']}.")
    return nn.Sequential(backbone, head).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Backbones: each architecture as a table of its paper, read by one builder
# ---------------------------------------------------------------------------------------------------------------

# ResNet (He et al. 2016, Table 1): block expansion (1 = basic block, 4 = bottleneck), blocks in conv2_x..conv5_x.
# The four stages have widths 64, 128, 256, 512 and strides 1, 2, 2, 2.
RESNETS = {
    "resnet18": (1, (2, 2, 2, 2)),
    "resnet34": (1, (3, 4, 6, 3)),
    "resnet50": (4, (3, 4, 6, 3)),
}

# MobileNetV3 (Howard et al. 2019, Tables 1 and 2), one row per bottleneck after the 16-channel stem conv:
# kernel, expanded channels, out channels, squeeze-excite, activation (RE = ReLU, HS = hard-swish), stride.
MOBILENETV3_LARGE = [
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
]
MOBILENETV3_SMALL = [
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
]
# blocks, channels of the last 1x1 conv, width of the Linear after pooling (= feature size d)
MOBILENETV3 = {"mobilenetv3_large": (MOBILENETV3_LARGE, 960, 1280), "mobilenetv3_small": (MOBILENETV3_SMALL, 576, 1024)}
ACTIVATIONS = {"RE": nn.ReLU, "HS": nn.Hardswish}

# EfficientNet-B0 (Tan & Le 2019, Table 1), one row per stage between the 32-channel stem conv and the 1x1 conv to
# 1280: expansion ratio, kernel, stride of the stage's first block, out channels, blocks.
EFFICIENTNET_B0 = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]


def make_divisible(value, divisor=8):
    """Round to the nearest multiple of divisor, at least divisor and never more than 10% below value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(cin, cout, kernel, stride=1, groups=1, act=None, bn=nn.BatchNorm2d):
    """Conv (no bias, 'same' padding) -> BN -> optional activation, keyed 0, 1, 2 like torchvision's."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), bn(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Basic block (two 3x3 convs, expansion 1) or bottleneck (1x1, 3x3, 1x1, expansion 4) with the stride on the
    3x3 conv (torchvision's ResNet v1.5). A strided 1x1 conv + BN projects the shortcut when the shape changes."""

    def __init__(self, cin, width, stride, expansion):
        super().__init__()
        cout = width * expansion
        if expansion == 1:
            convs = [(cin, width, 3, stride), (width, cout, 3, 1)]
        else:
            convs = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
        self.depth = len(convs)
        for i, (a, b, kernel, s) in enumerate(convs, 1):
            setattr(self, f"conv{i}", nn.Conv2d(a, b, kernel, s, kernel // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(b))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = x
        for i in range(1, self.depth + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.depth:
                out = self.relu(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet-18/34/50 as torchvision builds them, up to the global average pool."""

    def __init__(self, expansion, blocks_per_stage, small_stem=False):
        super().__init__()
        if small_stem:  # CIFAR stem: 3x3 stride-1 conv, no max-pool
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        cin = 64
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage), 1):
            layer = []
            for i in range(blocks):
                layer.append(ResidualBlock(cin, width, 2 if stage > 1 and i == 0 else 1, expansion))
                cin = width * expansion
            setattr(self, f"layer{stage}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class SqueezeExcite(nn.Module):
    """Channel gate (Hu et al. 2018): x * gate(fc2(act(fc1(mean over H, W of x)))), fc1/fc2 being 1x1 convs."""

    def __init__(self, channels, squeeze, act, gate):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * self.scale_activation(scale)


class InvertedResidual(nn.Module):
    """MobileNetV3 bottleneck / EfficientNet MBConv: 1x1 expand (skipped when expanded == cin) -> depthwise kxk ->
    optional squeeze-excite -> linear 1x1 projection, plus the input when the shape is unchanged. drop_prob is the
    stochastic-depth rate: in training the residual branch of each sample is dropped with that probability and the
    survivors are scaled by 1 / (1 - drop_prob)."""

    def __init__(self, cin, kernel, expanded, cout, stride, act, bn, se=None, drop_prob=0.0):
        super().__init__()
        layers = [conv_bn(cin, expanded, 1, act=act, bn=bn)] if expanded != cin else []
        layers.append(conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=act, bn=bn))
        if se is not None:
            layers.append(se)
        layers.append(conv_bn(expanded, cout, 1, bn=bn))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout
        self.drop_prob = drop_prob

    def forward(self, x):
        out = self.block(x)
        if not self.use_residual:
            return out
        if self.training and self.drop_prob > 0:
            keep = 1.0 - self.drop_prob
            mask = out.new_empty(out.shape[0], 1, 1, 1).bernoulli_(keep)
            out = out * (mask / keep)
        return out + x


class PooledFeatures(nn.Module):
    """MobileNetV3 / EfficientNet layout: features -> global average pool -> classifier (MobileNetV3: the Linear +
    hard-swish before the dropped class Linear; EfficientNet: nothing)."""

    def __init__(self, features, classifier=None):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Identity() if classifier is None else classifier

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def remove_first_two_downsamplings(features):
    """Small stem for MobileNetV3 / EfficientNet: stride 1 in the stem conv and in the first stride-2 block's
    depthwise conv. Strides only: parameters and the blocks' shortcuts stay as in the paper's table."""
    strided = [m for m in features.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    for conv in strided[:2]:
        conv.stride = (1, 1)


def mobilenetv3(name, small_stem=False):
    rows, last_conv, dim = MOBILENETV3[name]
    bn = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)  # TensorFlow's BN settings, as in the paper's code
    layers = [conv_bn(3, 16, 3, 2, act=nn.Hardswish, bn=bn)]
    cin = 16
    for kernel, expanded, cout, use_se, act, stride in rows:
        se = SqueezeExcite(expanded, make_divisible(expanded / 4), nn.ReLU, nn.Hardsigmoid) if use_se else None
        layers.append(InvertedResidual(cin, kernel, expanded, cout, stride, ACTIVATIONS[act], bn, se))
        cin = cout
    layers.append(conv_bn(cin, last_conv, 1, act=nn.Hardswish, bn=bn))
    features = nn.Sequential(*layers)
    if small_stem:
        remove_first_two_downsamplings(features)
    classifier = nn.Sequential(nn.Linear(last_conv, dim), nn.Hardswish(inplace=True))
    return PooledFeatures(features, classifier), dim


def efficientnet_b0(small_stem=False, drop_prob=0.2):
    # BN keeps PyTorch's defaults (eps 1e-5, momentum 0.1) like torchvision's B0, whose weights were trained with them
    total_blocks = sum(row[-1] for row in EFFICIENTNET_B0)
    layers = [conv_bn(3, 32, 3, 2, act=nn.SiLU)]
    cin, index = 32, 0
    for expansion, kernel, stride, cout, blocks in EFFICIENTNET_B0:
        stage = []
        for j in range(blocks):
            se = SqueezeExcite(cin * expansion, max(1, cin // 4), nn.SiLU, nn.Sigmoid)
            # stochastic depth grows linearly with the block's index: 0 for the first block, < drop_prob for the last
            stage.append(InvertedResidual(cin, kernel, cin * expansion, cout, stride if j == 0 else 1, nn.SiLU,
                                          nn.BatchNorm2d, se, drop_prob * index / total_blocks))
            cin, index = cout, index + 1
        layers.append(nn.Sequential(*stage))
    layers.append(conv_bn(cin, 1280, 1, act=nn.SiLU))
    features = nn.Sequential(*layers)
    if small_stem:
        remove_first_two_downsamplings(features)
    return PooledFeatures(features), 1280


def resnet(name, small_stem=False):
    expansion, blocks = RESNETS[name]
    return ResNet(expansion, blocks, small_stem), 512 * expansion


# The registry: every network by name, as a builder(small_stem) -> (module, feature size d). Adding a network is its
# table above, a builder if no existing one reads the table, and one line here (README, "Add a network").
BACKBONES = {
    "resnet18": partial(resnet, "resnet18"),
    "resnet34": partial(resnet, "resnet34"),
    "resnet50": partial(resnet, "resnet50"),
    "mobilenetv3_large": partial(mobilenetv3, "mobilenetv3_large"),
    "mobilenetv3_small": partial(mobilenetv3, "mobilenetv3_small"),
    "efficientnet_b0": efficientnet_b0,
}
ARCHS = tuple(BACKBONES)
# The networks of the study (run_all.sh's ARCHS, bench.py's default); resnet50 is the big reference and teacher.
STUDY = ("resnet18", "resnet34", "mobilenetv3_large", "mobilenetv3_small", "efficientnet_b0")


def build_backbone(name, small_stem=False):
    """(module mapping [B, 3, H, W] to pooled features [B, d], d), initialised as torchvision initialises it, its
    padded convolutions SmallMapConv2d (the same parameters; faster on a CPU, see there)."""
    if name not in BACKBONES:
        raise SystemExit(f"unknown architecture '{name}'; choose one of: {', '.join(ARCHS)}")
    model, dim = BACKBONES[name](small_stem=small_stem)
    for m in model.modules():
        if type(m) is nn.Conv2d and isinstance(m.padding, tuple) and m.padding != (0, 0):
            m.__class__ = SmallMapConv2d  # in place: no new parameters, no random numbers drawn
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model, dim


# ---------------------------------------------------------------------------------------------------------------
# A workaround for one library path: oneDNN's im2col fallback for padded convolutions on small maps (CPU only)
# ---------------------------------------------------------------------------------------------------------------

# On a CPU, PyTorch's convolutions run in oneDNN. Its direct kernels refuse padding wider than they can unroll (oneDNN
# issue 742), which is what the last stages of every network here meet at small inputs: a 3x3 kernel on a 1x1 map, a
# 5x5 depthwise kernel on a 2x2 map. Those convolutions, and above all their weight gradients, then fall back to an
# im2col gemm that runs at a few GFLOPS: half of an AVX2 machine's training step at the demo's 28 px, and the
# depthwise ones on 1x1 maps even with AVX-512 (docs/performance.md has the tables, `bench.py --primitives` shows it
# on any machine). SmallMapConv2d gives oneDNN the same convolution in a form its direct kernels take.
ONEDNN_WORKAROUND = True  # False: every convolution as nn.Conv2d runs it (bench.py times both)


@cache
def x86_isa():
    """'avx512' or 'avx2' as oneDNN's kernels see this x86 CPU (ONEDNN_MAX_CPU_ISA or DNNL_MAX_CPU_ISA, which cap
    oneDNN, are honoured), None on other CPUs: the workaround was measured on x86 alone."""
    capability = torch.backends.cpu.get_cpu_capability()  # ATen's: DEFAULT, AVX2, AVX512, or another family's
    if capability not in ("AVX2", "AVX512"):
        return None
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    below_avx512 = cap.startswith(("SSE", "AVX2", "AVX_")) or cap == "AVX"
    return "avx512" if capability == "AVX512" and not below_avx512 else "avx2"


@cache
def live_taps(size, kernel, stride, padding):
    """(first, stop, lead, trail) along one spatial axis: kernel taps first..stop-1 are those that touch a real pixel
    at some output position (the others only ever multiply padding); with those taps alone, the same outputs need
    `lead` zeros before the input and `trail` after it (trail None: `lead` on both sides gives them, as F.conv2d
    pads)."""
    out = (size + 2 * padding - kernel) // stride + 1
    live = [i for i in range(kernel) if any(0 <= o * stride - padding + i < size for o in range(out))]
    if not live:  # every output sees padding alone (padding wider than the kernel): nothing to leave out
        return 0, kernel, padding, None
    first, stop = live[0], live[-1] + 1
    lead = padding - first
    if (size + 2 * lead - (stop - first)) // stride + 1 == out:
        return first, stop, lead, None
    return first, stop, lead, (out - 1) * stride - lead + stop - first - size


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d with the same parameters, state dict and result, computed on a CPU in a form that keeps oneDNN off
    its slow fallback. Both steps are exact: they leave out only multiplications by padding zeros.
    1. Live taps (x86): the weight is sliced to the taps that can touch a real pixel, the padding reduced to match
       (a 3x3 kernel on a 1x1 map becomes its centre tap, a 1x1 convolution). The dropped taps received zero
       gradient before as well.
    2. Explicit zeros (x86 without AVX-512): a depthwise convolution whose padding is at least half its map gets
       its padding as zeros in the input (F.pad) and runs unpadded, which oneDNN's AVX2 kernels accept. AVX-512's
       depthwise kernels are faster with the padding left to them.
    Off x86 CPUs, on GPUs and with ONEDNN_WORKAROUND False it is nn.Conv2d."""

    def forward(self, x):
        isa = x86_isa() if x.device.type == "cpu" and ONEDNN_WORKAROUND else None
        if isa is None or self.padding_mode != "zeros" or self.dilation != (1, 1) or x.dim() != 4:
            return super().forward(x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        h0, h1, top, bottom = live_taps(x.shape[2], kh, sh, ph)
        w0, w1, left, right = live_taps(x.shape[3], kw, sw, pw)
        weight = self.weight if (h1 - h0, w1 - w0) == (kh, kw) else self.weight[:, :, h0:h1, w0:w1]
        depthwise = self.groups == self.in_channels > 1
        explicit = isa == "avx2" and depthwise and 2 * max(top, left) >= min(x.shape[2:])
        if explicit or bottom is not None or right is not None:  # the zeros in the input, each side its own
            bottom, right = (top if bottom is None else bottom), (left if right is None else right)
            x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
        return F.conv2d(x, weight, self.bias, self.stride, (top, left), 1, self.groups)
