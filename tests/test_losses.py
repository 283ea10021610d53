import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import (contrastive_accuracy, distill_loss, info_nce, smooth_eps, soft_info_nce, soft_target,
                    tier_bounds)


def embeddings(batch=6, dim=16, num_neg=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(batch, dim, generator=g), dim=1)
    queue = F.normalize(torch.randn(dim, num_neg, generator=g), dim=0)
    return q, k, queue


def numpy_log_softmax(q, k, queue, tau):
    q, k, queue = (t.double().numpy() for t in (q, k, queue))
    logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue], axis=1) / tau
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True)), q @ queue


def test_info_nce_matches_numpy_cross_entropy():
    q, k, queue = embeddings()
    logp, _ = numpy_log_softmax(q, k, queue, 0.2)
    assert info_nce(q, k, queue, 0.2).item() == pytest.approx(-logp[:, 0].mean(), rel=1e-5)


def test_eps_zero_is_plain_info_nce_bit_for_bit():
    q, k, queue = embeddings()
    labels = torch.zeros(len(q), dtype=torch.long)
    logits = torch.cat([torch.einsum("bd,bd->b", q, k)[:, None], torch.einsum("bd,dk->bk", q, queue)], 1) / 0.1
    for mode in ("topk", "tiered", "uniform"):
        assert torch.equal(soft_info_nce(q, k, queue, 0.1, 0.0, 10, mode), info_nce(q, k, queue, 0.1))
    assert torch.allclose(info_nce(q, k, queue, 0.1), F.cross_entropy(logits, labels), rtol=1e-5, atol=0)


@pytest.mark.parametrize("eps,num_neighbors", [(0.1, 1), (0.05, 5), (0.2, 10), (0.1, 20)])
def test_topk_equals_its_decomposition(eps, num_neighbors):
    q, k, queue = embeddings()
    tau = 0.1
    logp, sim = numpy_log_softmax(q, k, queue, tau)
    expected = []
    for i in range(len(q)):
        top = np.argsort(-sim[i])[:num_neighbors]  # neighbours ranked by similarity before the temperature
        expected.append((1 - eps) * -logp[i, 0] + eps * np.mean(-logp[i, 1 + top]))
    got = soft_info_nce(q, k, queue, tau, eps, num_neighbors, "topk").item()
    assert got == pytest.approx(np.mean(expected), rel=1e-5)


def test_topk_gradients_match_autograd_of_the_independent_formula():
    q, k, queue = embeddings(seed=3)
    eps, num_neighbors, tau = 0.2, 5, 0.1
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    soft_info_nce(q1, k1, queue, tau, eps, num_neighbors, "topk").backward()

    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    logits = torch.cat([(q2 * k2).sum(1, keepdim=True), q2 @ queue], 1) / tau
    logp = logits.log_softmax(1)
    top = (q @ queue).topk(num_neighbors, dim=1).indices + 1  # fixed indices: the target carries no gradient
    loss = ((1 - eps) * -logp[:, 0] + eps * -logp.gather(1, top).mean(1)).mean()
    loss.backward()
    assert torch.allclose(q1.grad, q2.grad, atol=1e-6)
    assert torch.allclose(k1.grad, k2.grad, atol=1e-6)


def test_tiered_target_puts_half_quarter_quarter_on_rank_tiers():
    _, _, queue = embeddings(num_neg=50)
    q, _, _ = embeddings(num_neg=50, seed=1)
    sim = q @ queue
    eps = 0.2
    target = soft_target(sim, eps, 20, "tiered")
    assert torch.allclose(target.sum(1), torch.ones(len(q)), atol=1e-6)
    assert torch.allclose(target[:, 0], torch.full((len(q),), 1 - eps))
    order = sim.argsort(dim=1, descending=True) + 1
    ranked = target.gather(1, order)  # mass by rank of similarity
    assert torch.allclose(ranked[:, :2], torch.full((len(q), 2), eps / 2 / 2))
    assert torch.allclose(ranked[:, 2:8], torch.full((len(q), 6), eps / 4 / 6))
    assert torch.allclose(ranked[:, 8:20], torch.full((len(q), 12), eps / 4 / 12))
    assert (ranked[:, 20:] == 0).all()
    assert tier_bounds(20) == (2, 8)


def test_tier_bounds_match_light_moco_and_never_leave_a_tier_empty():
    # light-moco's rank boundaries [0, b1, b2, k] for these k (ICME'23 code, read for the fidelity review)
    assert {k: tier_bounds(k) for k in (5, 10, 20, 30)} == {5: (1, 3), 10: (1, 4), 20: (2, 8), 30: (3, 12)}
    for k in range(3, 200):
        b1, b2 = tier_bounds(k)
        assert 0 < b1 < b2 < k, k


def test_uniform_target_is_label_smoothing_over_the_queue():
    q, k, queue = embeddings(num_neg=30)
    eps, tau = 0.1, 0.2
    target = soft_target(q @ queue, eps, 10, "uniform")
    assert torch.allclose(target.sum(1), torch.ones(len(q)))
    assert torch.allclose(target[:, 1:], torch.full((len(q), 30), eps / 30))
    logp, _ = numpy_log_softmax(q, k, queue, tau)
    expected = ((1 - eps) * -logp[:, 0] + eps * -logp[:, 1:].mean(1)).mean()
    assert soft_info_nce(q, k, queue, tau, eps, 10, "uniform").item() == pytest.approx(expected, rel=1e-5)


def test_topk_target_sums_to_one_on_the_nearest_entries():
    q, _, queue = embeddings()
    sim = q @ queue
    target = soft_target(sim, 0.1, 5, "topk")
    assert torch.allclose(target.sum(1), torch.ones(len(q)))
    nearest = set(map(tuple, (sim.argsort(1, descending=True)[:, :5] + 1).sort(1).values.tolist()))
    placed = set(map(tuple, target[:, 1:].nonzero()[:, 1].view(len(q), 5).add(1).sort(1).values.tolist()))
    assert placed == nearest


def test_eps_schedules():
    assert smooth_eps(0.1, "constant", 0, 100, 10) == 0.1
    assert smooth_eps(0.1, "warmup", 9, 100, 10) == 0.0
    assert smooth_eps(0.1, "warmup", 10, 100, 10) == 0.1
    assert smooth_eps(0.1, "cosine", 0, 100, 10) == 0.0
    assert smooth_eps(0.1, "cosine", 50, 100, 10) == pytest.approx(0.05)
    assert smooth_eps(0.1, "cosine", 100, 100, 10) == pytest.approx(0.1)


def test_distill_loss_is_summed_squared_distance_of_normalised_embeddings():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    sn = s.numpy() / np.linalg.norm(s.numpy(), axis=1, keepdims=True)
    tn = t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)
    assert distill_loss(s, t).item() == pytest.approx(((sn - tn) ** 2).sum(), rel=1e-5)
    disco = torch.nn.MSELoss(reduction="sum")  # DisCo-pytorch's criterion, on each process's batch
    assert distill_loss(s, t).item() == pytest.approx(disco(F.normalize(t, dim=1), F.normalize(s, dim=1)).item(),
                                                      rel=1e-5)
    s.requires_grad_()
    t.requires_grad_()
    distill_loss(s, t).backward()
    assert t.grad is None  # the teacher is frozen


def test_contrastive_accuracy():
    q, _, queue = embeddings()
    assert contrastive_accuracy(q, q, queue).item() == 100.0  # a key identical to its query always wins
    assert contrastive_accuracy(q, -q, queue).item() == 0.0
    assert math.isclose(contrastive_accuracy(q[:2], torch.stack([q[0], -q[1]]), queue).item(), 50.0)
