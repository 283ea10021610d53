"""Contrastive losses: InfoNCE, the softened InfoNCE, its eps schedules, and the DisCo distillation term.

Every loss is a pure function of tensors. q and k are L2-normalised embeddings [B, D]; queue holds K normalised
negatives as columns [D, K]; logits are [B, 1 + K] with the positive at index 0 (MoCo, He et al. 2020;
the softened InfoNCE of the ICME'23 paper; DisCo, Gao et al. 2022).
"""
import math

import torch
import torch.nn.functional as F

SMOOTH_MODES = ("topk", "tiered", "uniform")
SMOOTH_SCHEDULES = ("constant", "warmup", "cosine")


def moco_logits(q, k, queue, tau):
    """s_0 = q.k / tau (the positive), s_j = q.queue_j / tau (the K negatives)."""
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue
    return torch.cat([pos, neg], dim=1) / tau


def info_nce(q, k, queue, tau):
    """Cross-entropy of softmax(s) against the positive at index 0, averaged over the batch."""
    logits = moco_logits(q, k, queue, tau)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def tier_bounds(num_neighbors):
    """Rank boundaries (b1, b2) of the three tiers, ranks 1..b1, b1+1..b2 and b2+1..k. light-moco's (ICME'23) are
    k 5: 1, 3; k 10: 1, 4; k 20: 2, 8; k 30: 3, 12. The rule that gives exactly those, and holds for any k >= 3:
    b1 = ceil(k / 10), b2 = max(ceil(2k / 5), b1 + 2), with b2 at most k - 1 so that no tier is empty."""
    if num_neighbors < 3:
        raise ValueError(f"the tiered target needs at least 3 neighbours, got {num_neighbors}")
    b1 = math.ceil(num_neighbors / 10)
    return b1, min(max(math.ceil(2 * num_neighbors / 5), b1 + 2), num_neighbors - 1)


@torch.no_grad()
def soft_target(neg_sim, eps, num_neighbors, mode):
    """The soft target y over [positive, K queue entries] (the ICME'23 paper's softened InfoNCE); rows sum to 1, no
    gradient.

    neg_sim: q.queue_j before the temperature [B, K]; neighbours are the queue entries most similar to q.
    """
    batch, num_neg = neg_sim.shape
    target = torch.zeros(batch, 1 + num_neg, dtype=neg_sim.dtype, device=neg_sim.device)
    target[:, 0] = 1 - eps
    if mode == "uniform":  # plain label smoothing over the queue: a control
        target[:, 1:] = eps / num_neg
        return target
    k = min(num_neighbors, num_neg)
    nbr = neg_sim.topk(k, dim=1).indices + 1  # +1: column 0 is the positive
    if mode == "topk":
        mass = torch.full((k,), eps / k, dtype=neg_sim.dtype, device=neg_sim.device)
    elif mode == "tiered":  # eps/2, eps/4, eps/4 in total over the three rank tiers
        b1, b2 = tier_bounds(k)
        mass = torch.empty(k, dtype=neg_sim.dtype, device=neg_sim.device)
        mass[:b1] = eps / 2 / b1
        mass[b1:b2] = eps / 4 / (b2 - b1)
        mass[b2:] = eps / 4 / (k - b2)
    else:
        raise ValueError(f"unknown smoothing mode {mode!r}; choose one of {SMOOTH_MODES}")
    target.scatter_(1, nbr, mass.expand(batch, k))
    return target


def soft_info_nce(q, k, queue, tau, eps, num_neighbors=10, mode="topk"):
    """Softened InfoNCE: L = -sum_i y_i log p_i with p = softmax(s) and the soft target y of `soft_target`.

    For mode "topk" this is (1 - eps) * InfoNCE + eps * mean_{j in top-k} (-log p_j): the nearest queue entries,
    likely false negatives, count as partial positives. eps = 0 is plain InfoNCE, bit for bit.
    """
    if eps == 0:
        return info_nce(q, k, queue, tau)
    neg_sim = q @ queue
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), neg_sim], dim=1) / tau
    return F.cross_entropy(logits, soft_target(neg_sim, eps, num_neighbors, mode))


def smooth_eps(eps, schedule, step, total_steps, warmup_steps):
    """eps at an optimizer step: constant; 0 during the lr warm-up, then eps; or a cosine ramp from 0 to eps."""
    if schedule == "constant":
        return eps
    if schedule == "warmup":
        return 0.0 if step < warmup_steps else eps
    if schedule == "cosine":
        return eps * (1 - math.cos(math.pi * step / max(1, total_steps))) / 2
    raise ValueError(f"unknown eps schedule {schedule!r}; choose one of {SMOOTH_SCHEDULES}")


def distill_loss(student, teacher):
    """DisCo: squared distance between the L2-normalised student and (frozen) teacher embeddings, summed over
    batch and dimensions (DisCo, Gao et al. 2022). A sum over the process's batch, as DisCo reduces it: against
    InfoNCE, a batch mean, the term weighs in proportion to the per-process batch (docs/fidelity.md)."""
    return (F.normalize(student, dim=1) - F.normalize(teacher.detach(), dim=1)).pow(2).sum()


@torch.no_grad()
def contrastive_accuracy(q, k, queue):
    """How often the positive key is the most similar of the 1 + K candidates (instance discrimination, %), as a
    0-dim tensor on q's device (no host synchronisation: the training loop averages it over a logging interval)."""
    return (moco_logits(q, k, queue, 1.0).argmax(dim=1) == 0).float().mean() * 100
