"""The training loop's hot path never makes a CUDA host wait for the GPU: an operator whose output size or value the
host must read (a mask's count, a scalar) stalls the CPU until the device's queue has drained. The operators are
counted at the dispatcher on the CPU, so the test needs no GPU."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import pretrain
from models import SplitBatchNorm

aten = torch.ops.aten
READ_BY_THE_HOST = {aten.nonzero, aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.masked_select,
                    aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive}


class HostSyncs(TorchDispatchMode):
    """Records the operators that synchronise a CUDA host: READ_BY_THE_HOST (.item(), bool(), nonzero, ...),
    indexing with a boolean mask (a nonzero inside), and torch.tensor of Python data (a blocking copy from the host).
    A 0-dim lift_fresh is not counted: on the CPU it is also how `t[i] = 0.5` wraps the number, which CUDA fills on
    the device."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        masked = op in (aten.index, aten.index_put, aten.index_put_) and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if op in READ_BY_THE_HOST or masked or (op is aten.lift_fresh and args[0].dim() > 0):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_each_kind_of_synchronisation():
    x = torch.randn(6, 3)
    with HostSyncs() as syncs:
        x[x[:, 0] > 0] = 0
        x.sum().item()
        x[:, 0].nonzero()
        torch.tensor([0.5, 0.25])
        x[:, 1] = 0.5  # a number assigned: filled on the device, no sync
    assert syncs.found == ["aten.index_put_.default", "aten._local_scalar_dense.default", "aten.nonzero.default",
                           "aten.lift_fresh.default"]


def test_batched_augment_does_not_synchronise():
    images = data.synthetic_data("train", 32)[0]
    augment = data.BatchedAugment("mocov2", 32, (0.5,) * 3, (0.5,) * 3)  # every step, blur included
    with HostSyncs() as syncs:
        augment(images, torch.Generator().manual_seed(0))
    assert syncs.found == []


@pytest.mark.parametrize("split_bn, amp", [("per_group", "off"), ("folded", "off"), ("folded", "fp16")])
def test_a_training_step_does_not_synchronise(split_bn, amp, monkeypatch):
    """Symmetric softened InfoNCE with split BN, through the CPU's per-group BN and the folded one CUDA runs. Under
    fp16 a step reads the host once, and only there: GradScaler.step must know whether any gradient overflowed
    before it runs or skips SGD (one scalar per step, which every fp16 recipe pays)."""
    if split_bn == "folded":
        monkeypatch.setattr(SplitBatchNorm, "per_group", SplitBatchNorm.folded)
    args = pretrain.get_args(["--arch", "mobilenetv3_small", "--img-size", "32", "--batch-size", "8", "--moco-k", "32",
                              "--mlp-hidden", "64", "--head-bn", "--symmetric", "--bn-splits", "2", "--smooth", "0.1",
                              "--smooth-k", "3", "--smooth-mode", "topk", "--amp", amp])
    torch.manual_seed(0)
    model, optimizer, scaler, autocast = pretrain.build(args, torch.device("cpu"))
    images = data.synthetic_data("train", 8)[0]
    augment = data.BatchedAugment(args.aug, 32, (0.5,) * 3, (0.5,) * 3)
    views = [augment(images, torch.Generator().manual_seed(i)) for i in range(4)]
    with HostSyncs() as syncs:  # the first step (SGD makes its momentum buffers) and one after it
        for x1, x2 in (views[:2], views[2:]):
            loss, _, _ = pretrain.train_step(model, x1, x2, optimizer, scaler, autocast, args, args.moco_m,
                                             args.smooth)
    assert syncs.found == ([] if amp == "off" else ["aten._local_scalar_dense.default"] * 2) and loss.isfinite()
