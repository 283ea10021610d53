"""Run by test_pretrain under torchrun: trains with pretrain.main on every rank, then checks that all ranks hold
the same weights (both encoders) and queue, and writes the verdict to the JSON file named first. With
NAN_LOSS_ON_RANK=r, rank r reports a NaN loss at every step (its weights stay finite). With KILL_RANK_AT_STEP=r:s,
rank r kills itself (SIGKILL, as a crash or an OOM killer would) before its step s of torchrun's first attempt. With
INF_GRADIENT_ON_RANK=r:s, rank r's loss sends inf gradients back at its step s (an fp16 overflow on one rank
alone); AMP_INIT_SCALE=x starts the fp16 gradient scaler at x instead of 2**16.
BN running statistics are not compared: DDP broadcasts rank 0's buffers at the start of each forward, so after the
last step each rank still holds the statistics of its own last batch."""
import functools
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pretrain  # noqa: E402


class InfGradient(torch.autograd.Function):
    """The identity forward; backward turns every gradient into inf, as an fp16 overflow in the backward would."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def overflow_at(step, calls_per_step=1):
    """A stand-in for pretrain.soft_info_nce whose loss sends inf gradients back at training step `step` (from 1);
    the symmetric loss calls it twice a step."""
    real, calls = pretrain.soft_info_nce, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return InfGradient.apply(value) if (len(calls) - 1) // calls_per_step + 1 == step else value
    return loss


def main():
    result_path, argv = sys.argv[1], sys.argv[2:]
    real = pretrain.train_step
    if os.environ.get("NAN_LOSS_ON_RANK") == os.environ["RANK"]:  # this rank alone logs a NaN loss

        def nan_loss_step(*args, **kwargs):
            loss, acc, spread = real(*args, **kwargs)
            return loss * float("nan"), acc, spread
        pretrain.train_step = nan_loss_step
    kill_rank, _, kill_step = os.environ.get("KILL_RANK_AT_STEP", "::").partition(":")
    if kill_rank == os.environ["RANK"] and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        steps = []

        def killed_step(*args, **kwargs):
            steps.append(1)
            if len(steps) == int(kill_step):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        pretrain.train_step = killed_step
    inf_rank, _, inf_step = os.environ.get("INF_GRADIENT_ON_RANK", "::").partition(":")
    if inf_rank == os.environ["RANK"]:
        pretrain.soft_info_nce = overflow_at(int(inf_step))
    if "AMP_INIT_SCALE" in os.environ:
        pretrain.torch.amp.GradScaler = functools.partial(torch.amp.GradScaler,
                                                          init_scale=float(os.environ["AMP_INIT_SCALE"]))
    model = pretrain.main(argv)
    state = {k: v.detach().cpu() for k, v in model.named_parameters()}
    state.update(queue=model.queue.cpu(), queue_ptr=model.queue_ptr.cpu())
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    if dist.get_rank() == 0:
        different = [k for k in state if not all(torch.equal(s[k], state[k]) for s in states)]
        with open(result_path, "w") as f:
            json.dump({"identical": not different, "different": different[:10],
                       "queue_ptr": state["queue_ptr"].item()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
