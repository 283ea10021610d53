import datetime
import hashlib
import json
import math
import os
import re
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import data
import evaluation
import knn_eval
import linear_eval
import models
from data import eval_loader, load_data
from evaluation import knn_predict, topk_accuracy
from knn_eval import alignment, best_nn_accuracies, instance_accuracy, intra_class_alignment, uniformity
from linear_eval import check_backbone_unchanged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
# 200 synthetic training images (the bank / linear-eval training set), 100 test images, at 32 px
SMALL = ["--data", "synthetic", "--subset", "200", "--test-subset", "100", "--batch-size", "64"]
CPU = ["--device", "cpu"]  # these tests are meant for the CPU, GPU or not


# ----- independent references: plain loops over numpy float64 ------------------------------------------------------

def ranked(values, largest):
    """Indices sorted by value (largest or smallest first), equal values by the lower index: the documented rule."""
    return sorted(range(len(values)), key=lambda j: (-values[j] if largest else values[j], j))


def knn_loop(query, bank, labels, num_classes, k, t):
    query, bank = query.double().numpy(), bank.double().numpy()
    scores = np.zeros((len(query), num_classes))
    for i, q in enumerate(query):
        sims = [float(np.dot(q, b)) for b in bank]
        for j in ranked(sims, largest=True)[:k]:
            scores[i, labels[j]] += math.exp(sims[j] / t)
    return scores


def majority_loop(query, bank, labels, k):
    """Predicted class of each query: most votes among the k nearest (Euclidean); a tie goes to the tied class whose
    first member in distance order comes first."""
    preds = []
    for q in query.double().numpy():
        order = ranked([float(np.sum((q - b) ** 2)) for b in bank.double().numpy()], largest=False)[:k]
        votes = [int(labels[j]) for j in order]
        top = max(votes.count(c) for c in votes)
        preds.append(next(c for c in votes if votes.count(c) == top))
    return np.array(preds)


def random_unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ----- weighted kNN ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 12, 30, 50])
def test_knn_matches_brute_force_loop(k):
    """Class sizes 4, 10 and 16, so k = 5 and 12 exceed a class and k = 50 exceeds the bank (clamped to 30)."""
    query, bank = random_unit(40, 8, 0), random_unit(30, 8, 1)
    labels = torch.tensor([0] * 4 + [1] * 10 + [2] * 16)[torch.randperm(30, generator=torch.Generator().manual_seed(2))]
    scores = knn_predict(query, bank, labels, 3, k=k, t=0.07, chunk=7)
    assert np.allclose(scores.numpy(), knn_loop(query, bank, labels, 3, min(k, 30), 0.07), rtol=1e-5, atol=0)


def test_knn_ties_rank_the_lower_bank_index_first():
    """Entries in {-1/2, 0, 1/2} make every similarity exact and many equal, also across the k-th place, where
    torch.topk alone would choose among equal entries in an unspecified order."""
    g = torch.Generator().manual_seed(0)
    query = torch.randint(-1, 2, (60, 3), generator=g) / 2
    bank = torch.randint(-1, 2, (80, 3), generator=g) / 2
    labels = torch.randint(0, 6, (80,), generator=g)
    for k in (1, 4, 9, 25):
        scores = knn_predict(query, bank, labels, 6, k=k, t=0.5, chunk=16)
        # each score sums up to 25 float32 exp terms (about 1.5e-6 relative); a wrong neighbour moves it 1e-3
        assert np.allclose(scores.numpy(), knn_loop(query, bank, labels, 6, k, 0.5), rtol=1e-5, atol=0), k


def test_topk_accuracy_ties_and_top5():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert topk_accuracy(scores, torch.tensor([0, 1])) == (100.0, None)  # equal scores: the lower class first
    assert topk_accuracy(scores, torch.tensor([1, 2])) == (0.0, None)  # top-5 only with more than 5 classes
    scores = torch.arange(7.0).repeat(4, 1)  # class 6 ranks first, class 1 sixth
    assert topk_accuracy(scores, torch.tensor([6, 2, 1, 0])) == (25.0, 50.0)


# ----- best-NN sweep ----------------------------------------------------------------------------------------------

def test_best_nn_matches_majority_loop_with_ties():
    """Small integer features: exact, often equal distances and often tied votes among 5 classes."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(-3, 4, (60, 2), generator=g).float()
    query = torch.randint(-3, 4, (25, 2), generator=g).float()
    bank_labels, labels = torch.randint(0, 5, (60,), generator=g), torch.randint(0, 5, (25,), generator=g)
    by_k = best_nn_accuracies(query, labels, bank, bank_labels, 5, chunk=10)
    assert list(by_k) == list(range(1, 60, 2))  # k up to the bank size
    for k, acc in by_k.items():
        assert acc == pytest.approx(100 * np.mean(majority_loop(query, bank, bank_labels, k) == labels.numpy())), k


def test_best_nn_picks_the_right_k():
    """Three queries of class 0, far apart, each with its own neighbourhood on a line (distances 1, 2, 3, ...):
    A: 1, 1, 0, 0, 0, 1, 1, 1, ... right only at k = 5; B: 0, 0, 0, 0, 1, 1, 1, 1, 1, ... right for k <= 7;
    C: 1, 0, 0, 1, 0, 1, 1, 1, ... right for k = 3 and 5. So 100% at k = 5 and at most 67% elsewhere."""
    neighbourhoods = {0: [1, 1, 0, 0, 0] + [1] * 10, 1000: [0] * 4 + [1] * 11, 2000: [1, 0, 0, 1, 0] + [1] * 10}
    bank, bank_labels = [], []
    for offset, classes in neighbourhoods.items():
        bank += [[offset + distance, 0.0] for distance in range(1, len(classes) + 1)]
        bank_labels += classes
    query = torch.tensor([[0.0, 0.0], [1000.0, 0.0], [2000.0, 0.0]])
    by_k = best_nn_accuracies(query, torch.zeros(3, dtype=torch.long), torch.tensor(bank),
                              torch.tensor(bank_labels), 2)
    assert max(by_k, key=by_k.get) == 5 and by_k[5] == 100
    assert by_k[1] == by_k[7] == pytest.approx(100 / 3) and by_k[3] == pytest.approx(200 / 3) and by_k[9] == 0


# ----- over-clustering diagnostics --------------------------------------------------------------------------------

@pytest.fixture
def views():
    """30 images of 3 classes (sizes 5, 10, 15), two views each: the second view a noisy copy of the first."""
    z1 = random_unit(30, 5, 0)
    z2 = F.normalize(z1 + 0.6 * torch.randn(30, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.tensor([0] * 5 + [1] * 10 + [2] * 15)[torch.randperm(30, generator=torch.Generator().manual_seed(3))]
    return z1, z2, labels


def test_alignment_against_numpy(views):
    z1, z2, _ = (v.double().numpy() for v in views)
    assert alignment(*views[:2]) == pytest.approx(np.mean([np.sum((a - b) ** 2) for a, b in zip(z1, z2)]), rel=1e-6)


def test_uniformity_against_numpy(views):
    z = views[0].double().numpy()
    pairs = [math.exp(-2 * np.sum((z[i] - z[j]) ** 2)) for i in range(30) for j in range(30) if i != j]
    assert uniformity(views[0], chunk=7) == pytest.approx(math.log(np.mean(pairs)), rel=1e-6)


def test_intra_class_alignment_against_numpy(views):
    # classes of 5, 10 and 15 images: the mean over classes differs from the mean over all same-class pairs
    z, labels = views[0].double().numpy(), views[2].numpy()
    per_class = [np.mean([np.sum((z[i] - z[j]) ** 2) for i in range(30) for j in range(30)
                          if i != j and labels[i] == labels[j] == c]) for c in range(3)]
    assert intra_class_alignment(views[0], views[2], 4) == pytest.approx(np.mean(per_class), rel=1e-6)  # class 3 empty


def test_instance_accuracy_against_numpy(views):
    originals, own_views = views[0].double().numpy(), views[1].double().numpy()
    hits = []
    for i in range(30):
        others = max(np.dot(originals[i], originals[j]) for j in range(30) if j != i)
        hits.append(np.dot(originals[i], own_views[i]) > others)
    expected = 100 * np.mean(hits)
    assert 0 < expected < 100  # both outcomes occur, so a wrong partner or a missed self-exclusion shows
    assert instance_accuracy(views[0], views[1], chunk=7) == pytest.approx(expected)
    assert instance_accuracy(views[0], views[0]) == 100  # each original is its own view: nothing beats cosine 1


def test_diagnostics_see_the_same_images_and_views_for_every_checkpoint():
    torch.manual_seed(0)
    backbone, _ = models.build_backbone("mobilenetv3_small")
    first = knn_eval.diagnostics(backbone, "synthetic", None, 5, 32, 64, "cpu")
    again = knn_eval.diagnostics(backbone, "synthetic", None, 5, 32, 16, "cpu")  # another batch size
    numbers = [k for k, v in first.items() if isinstance(v, float)]
    assert {k: first[k] for k in numbers} == pytest.approx({k: again[k] for k in numbers}, rel=1e-4)
    assert {k: v for k, v in first.items() if k not in numbers} == {k: v for k, v in again.items() if k not in numbers}
    assert first["aug"] == "mocov2" and first["n_images"] == 50 and "instance_accuracy" in numbers
    assert first["alignment_original_view"] != first["alignment_view_view"]
    assert first["uniformity_original"] != first["uniformity_view"]


# ----- the linear-evaluation sanity check ---------------------------------------------------------------------------

def test_sanity_check_catches_moved_bn_statistics():
    torch.manual_seed(0)
    backbone, _ = models.build_backbone("mobilenetv3_small")
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    check_backbone_unchanged(backbone.eval(), reference)
    bn = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for buffer in (bn.running_mean, bn.running_var, bn.num_batches_tracked):
        buffer += 1
        with pytest.raises(RuntimeError, match="changed 1 backbone tensors"):
            check_backbone_unchanged(backbone, reference)
        buffer -= 1
    check_backbone_unchanged(backbone, reference)
    with torch.no_grad():
        backbone.train()(torch.randn(4, 3, 32, 32))  # the classic mistake: a forward pass in train mode
    with pytest.raises(RuntimeError, match="running_mean"):
        check_backbone_unchanged(backbone, reference)


def test_knn_monitor_restores_the_mode_and_leaves_the_weights():
    torch.manual_seed(0)
    backbone, _ = models.build_backbone("mobilenetv3_small")
    backbone.train()
    backbone.features[1].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    modes = [m.training for m in backbone.modules()]
    train, test = (knn_eval.load_data("synthetic", s, subset="100") for s in ("train", "test"))
    top1 = evaluation.knn_monitor(backbone, train, test, 32, "cpu", k=20)
    assert [m.training for m in backbone.modules()] == modes
    check_backbone_unchanged(backbone, before)
    bank, bank_labels = evaluation.extract_features(backbone.eval(), train, 32)
    query, labels = evaluation.extract_features(backbone, test, 32)
    # the same float32 computation as the monitor (knn_predict is checked against a loop on tie-free data above): a
    # float64 reference could break a near-tie at the 20th neighbour differently on another CPU
    scores = knn_predict(F.normalize(query, dim=1), F.normalize(bank, dim=1), bank_labels, 10, 20, 0.1)
    assert top1 == pytest.approx(100 * (scores.argmax(1) == labels).float().mean().item())


# ----- end to end on generated data -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as pretrain.py writes it, with trained-looking weights: non-default BN statistics everywhere and
    different query and key encoders."""
    args = {"arch": "mobilenetv3_small", "small_stem": False, "data": "synthetic", "data_dir": None,
            "subset": "200", "img_size": 32, "mlp_hidden": 64, "moco_dim": 16, "aug": "small", "seed": 0}
    model = {}
    for seed, prefix in ((1, "encoder_q"), (2, "encoder_k")):
        torch.manual_seed(seed)
        backbone, dim = models.build_backbone("mobilenetv3_small")
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked += 1000  # statistics as after 1000 updates: 0.99^1000 of the initial left
        head = models.build_head(dim, 64, 16)
        for part, module in (("backbone", backbone), ("head", head)):
            model.update({f"{prefix}.{part}.{k}": v for k, v in module.state_dict().items()})
    model["queue"] = F.normalize(torch.randn(16, 32), dim=0)
    model["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    torch.save({"args": args, "model": model, "optimizer": {}, "scaler": {}, "epoch": 3, "step": 30, "rng": [],
                "version": 1}, path)
    return str(path)


def test_knn_eval_random_init_end_to_end(tmp_path):
    out = tmp_path / "knn.json"
    knn_eval.main(CPU + ["--arch", "mobilenetv3_small", "--random-init", *SMALL, "--k", "20", "200", "--sweep",
                   "--diagnostics", "--diag-per-class", "5", "--channels-last", "--json", str(out)])
    res = json.loads(out.read_text())
    assert (res["n_bank"], res["n_query"], res["feat_dim"], res["ckpt"], res["img_size"]) == (200, 100, 1024, None, 32)
    assert [r["k"] for r in res["knn"]] == [20, 200] and all(0 <= r["top1"] <= r["top5"] <= 100 for r in res["knn"])
    assert res["best_nn"]["top1"] == max(res["best_nn"]["by_k"].values())
    diag = res["diagnostics"]
    assert diag["n_images"] == 50 and diag["aug"] == "mocov2" and diag["seed"] == 0
    assert all(0 <= diag[k] <= 4 for k in ("alignment_original_view", "alignment_view_view", "intra_class_original",
                                            "intra_class_view"))
    assert all(-4 <= diag[k] <= 0 for k in ("uniformity_original", "uniformity_view"))
    assert 0 <= diag["instance_accuracy"] <= 100


def test_precise_bn_sets_the_statistics_of_the_data_and_nothing_else():
    torch.manual_seed(0)
    backbone, _ = models.build_backbone("resnet18")
    data = load_data("synthetic", "train", subset="48")
    weights = {k: v.clone() for k, v in backbone.state_dict().items() if "running" not in k and "batches" not in k}
    evaluation.precise_bn(backbone, data, 32, batch_size=64)  # one batch: the statistics of all 48 images
    x = torch.cat([x for x, _ in eval_loader(data, 32, 64)])
    stem = backbone.conv1(x)  # the first BN layer's input, computed independently
    assert torch.allclose(backbone.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(backbone.bn1.running_var, stem.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert not backbone.training and backbone.bn1.momentum == 0.1  # eval mode, the layer's momentum restored
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in weights.items())


def test_precise_bn_runs_without_stochastic_depth():
    # EfficientNet-B0's stochastic depth would drop random blocks while the statistics are gathered: twice the same
    # images must give the same statistics
    data = load_data("synthetic", "train", subset="32")
    stats = []
    for seed in (1, 2):
        torch.manual_seed(0)
        backbone, _ = models.build_backbone("efficientnet_b0")
        torch.manual_seed(seed)  # another random stream: it would drop other blocks
        evaluation.precise_bn(backbone, data, 32, batch_size=16)
        stats.append(torch.cat([m.running_var for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]))
    torch.testing.assert_close(stats[0], stats[1], atol=0, rtol=0)


def test_knn_eval_pixels_reference_is_the_normalised_images():
    res = knn_eval.main(CPU + ["--pixels", *SMALL, "--k", "20", "--diagnostics", "--diag-per-class", "5"])
    train, test = load_data("synthetic", "train", subset="200"), load_data("synthetic", "test", subset="100")
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in (train.mean, train.std))
    bank, query = ((d.images.double() / 255 - mean) / std for d in (train, test))  # independent of eval_loader
    scores = knn_predict(F.normalize(query.flatten(1), dim=1), F.normalize(bank.flatten(1), dim=1), train.labels,
                         10, 20)
    assert res["knn"][0]["top1"] == pytest.approx(topk_accuracy(scores, test.labels)[0], abs=1.0 + 1e-9)  # <= 1 tie
    assert (res["arch"], res["pixels"], res["feat_dim"], res["ckpt"]) == ("pixels", True, 3 * 32 * 32, None)
    assert 0 < res["diagnostics"]["instance_accuracy"] < 100
    with pytest.raises(SystemExit, match="--pixels evaluates the images themselves"):
        knn_eval.main(CPU + ["--pixels", "--arch", "resnet18", *SMALL])
    with pytest.raises(SystemExit, match="pass either --ckpt"):
        knn_eval.main(CPU + ["--pixels", "--random-init", "--arch", "resnet18", *SMALL])


def test_knn_eval_reference_with_the_data_bn_statistics(tmp_path):
    plain = knn_eval.main(CPU + ["--arch", "mobilenetv3_small", "--random-init", *SMALL, "--k", "20"])
    bn = knn_eval.main(CPU + ["--arch", "mobilenetv3_small", "--random-init", "--precise-bn", *SMALL, "--k", "20"])
    assert bn["precise_bn"] and not plain["precise_bn"] and bn["knn"] != plain["knn"]
    assert plain["bn_initial_fraction"] == 1.0  # untrained: the statistics are their initial values
    again = knn_eval.main(CPU + ["--arch", "mobilenetv3_small", "--random-init", "--reestimate-bn", *SMALL,
                                 "--k", "20"])
    assert again["knn"] == bn["knn"]  # the flag's earlier name
    with pytest.raises(SystemExit, match="drop --arch, --small-stem and --precise-bn"):
        knn_eval.main(CPU + ["--pixels", "--precise-bn", *SMALL])


def stale_checkpoint(checkpoint, tmp_path, updates):
    """The fixture's checkpoint with every BN layer updated `updates` times (mobilenetv3_small: momentum 0.01)."""
    saved = torch.load(checkpoint, weights_only=True)
    for name in saved["model"]:
        if name.endswith("num_batches_tracked"):
            saved["model"][name] = torch.tensor(updates)
    path = tmp_path / f"after_{updates}.pt"
    torch.save(saved, path)
    return str(path)


def test_stale_bn_statistics_are_said_and_precise_bn_replaces_them(checkpoint, tmp_path, capsys):
    """15 updates at momentum 0.01 leave 0.99^15 = 86% of the initial statistics: both evaluations say so in one
    line and record it; --precise-bn evaluates with the training images' statistics instead, and says nothing."""
    stale = stale_checkpoint(checkpoint, tmp_path, 15)
    for script, extra in ((knn_eval, ["--k", "20"]), (linear_eval, ["--epochs", "1", "--cached", "--json",
                                                                      str(tmp_path / "linear.json")])):
        res = script.main(CPU + ["--ckpt", stale, "--test-subset", "100", *extra])
        err = capsys.readouterr().err
        assert res["bn_initial_fraction"] == pytest.approx(0.99 ** 15) and not res["precise_bn"]
        assert err.count("warning:") == 1 and "still hold 86% of their initial values" in err
        assert "after 15 updates at momentum 0.01" in err and "add --precise-bn" in err
    precise = knn_eval.main(CPU + ["--ckpt", stale, "--test-subset", "100", "--k", "20", "--precise-bn"])
    assert precise["precise_bn"] and precise["bn_initial_fraction"] == pytest.approx(0.99 ** 15)
    assert "warning" not in capsys.readouterr().err
    knn_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--k", "20"])  # 1000 updates: 4e-5 left
    assert "warning" not in capsys.readouterr().err


def test_precise_bn_on_a_checkpoint_uses_the_bank_images_statistics(checkpoint):
    """The evaluated network's first BN layer holds the statistics of its input over the bank's images."""
    backbone, _, _, _ = models.load_pretrained(checkpoint)
    train = load_data("synthetic", "train", subset="200")
    evaluation.precise_bn(backbone, train, 32, batch_size=256)
    x = torch.cat([x for x, _ in eval_loader(train, 32, 256)])
    stem = backbone.features[0][0](x)
    assert torch.allclose(backbone.features[0][1].running_mean, stem.mean((0, 2, 3)), atol=1e-5)


def test_bn_initial_fraction_against_the_momentum():
    resnet, _ = models.build_backbone("resnet18")  # momentum 0.1
    mobilenet, _ = models.build_backbone("mobilenetv3_small")  # momentum 0.01
    for m in resnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked += 20
    resnet.bn1.num_batches_tracked.fill_(3)  # the stalest layer decides
    assert evaluation.bn_initial_fraction(resnet) == (pytest.approx(0.9 ** 3), 3, 0.1)
    assert evaluation.bn_initial_fraction(mobilenet) == (1.0, 0, 0.01)
    assert evaluation.bn_initial_fraction(torch.nn.Flatten()) is None


def test_knn_eval_checkpoint_end_to_end(checkpoint, tmp_path):
    res = knn_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--k", "20", "--diagnostics",
                         "--diag-per-class", "5", "--json", str(tmp_path / "q.json")])
    assert (res["subset"], res["n_bank"], res["img_size"], res["data"]) == ("200", 200, 32, "synthetic")  # stored
    assert res["diagnostics"]["aug"] == "mocov2"  # not the checkpoint's pretraining views ("small"): fixed views
    key = knn_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--k", "20", "--encoder", "key"])
    head = knn_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--k", "20", "--features", "head"])
    assert head["feat_dim"] == 16 and key["encoder"] == "key"
    assert key["knn"] != res["knn"] or head["knn"] != res["knn"]  # other weights, other features


@pytest.mark.parametrize("flags, sentence", [
    (["--arch", "resnet18"], "trained with --arch mobilenetv3_small"),
    (["--small-stem"], "trained with the standard stem"),
    (["--img-size", "28"], "trained with --img-size 32"),
    (["--random-init", "--arch", "resnet18"], "either --ckpt"),
])
def test_knn_eval_rejects_flags_contradicting_the_checkpoint(checkpoint, flags, sentence):
    with pytest.raises(SystemExit, match=sentence):
        knn_eval.main(CPU + ["--ckpt", checkpoint, *flags])


@pytest.mark.parametrize("flags, sentence", [
    ([], "needs --arch"), (["--arch", "resnet18", "--features", "head"], "no trained projection head"),
    (["--arch", "resnet18", "--encoder", "key"], "single encoder"),
])
def test_knn_eval_random_init_flag_errors(flags, sentence):
    with pytest.raises(SystemExit, match=sentence):
        knn_eval.main(CPU + ["--random-init", *flags])


@pytest.mark.skipif(not os.path.exists(FMNIST), reason="Fashion-MNIST is not installed")
def test_knn_eval_transfer_to_another_data_set(checkpoint, capsys):
    res = knn_eval.main(CPU + ["--ckpt", checkpoint, "--data", "fashionmnist", "--subset", "100", "--test-subset",
                               "50"])
    assert (res["data"], res["pretrain_data"], res["img_size"], res["n_bank"]) == ("fashionmnist", "synthetic", 32, 100)
    assert "transfer evaluation" in capsys.readouterr().out


def test_linear_eval_checkpoint_end_to_end(checkpoint, tmp_path):
    """Two epochs (lr 30, then 3); main() runs the sanity check against the loaded weights and would raise if the
    backbone moved. The saved classifier reproduces the last test accuracy."""
    out = tmp_path / "linear.json"
    res = linear_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--epochs", "2", "--schedule", "1",
                            "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["protocol"] == "moco-linear" and res["n_train"] == 200 and [h["lr"] for h in res["history"]] == [30, 3]
    # the result is the last epoch, never the epoch picked on the test set; that one is kept under its own name
    assert (res["top1"], res["top5"]) == (res["history"][-1]["test_top1"], res["history"][-1]["test_top5"])
    assert res["best_on_test_top1"] == max(h["test_top1"] for h in res["history"]) and "best_top1" not in res
    assert res["classifier"] == str(tmp_path / "linear_classifier.pt")
    again = linear_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--evaluate", res["classifier"]])
    assert (again["top1"], again["top5"]) == (res["top1"], res["top5"])
    with pytest.raises(SystemExit, match="was trained on features without --precise-bn"):
        linear_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--evaluate", res["classifier"],
                                "--precise-bn"])


def test_results_name_the_checkpoint_they_measured(checkpoint, tmp_path):
    """Its step and the SHA-256 of its bytes: run_all.sh redoes a result whose checkpoint has changed."""
    digest = hashlib.sha256(open(checkpoint, "rb").read()).hexdigest()
    knn = knn_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--k", "20"])
    linear = linear_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--epochs", "1", "--cached",
                                     "--json", str(tmp_path / "linear.json")])
    for res in knn, linear:
        assert (res["ckpt_step"], res["ckpt_sha256"]) == (30, digest)
    reference = knn_eval.main(CPU + ["--arch", "mobilenetv3_small", "--random-init", *SMALL, "--k", "20"])
    assert reference["ckpt_step"] is None and reference["ckpt_sha256"] is None


def test_linear_eval_saves_the_classifier_before_its_results(checkpoint, tmp_path, monkeypatch):
    """run_all.sh takes an existing linear.json as a finished stage: a kill while the classifier is saved must
    leave no linear.json behind."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        linear_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--epochs", "1", "--cached",
                                "--json", str(tmp_path / "linear.json")])
    assert not os.path.exists(tmp_path / "linear.json")


def test_linear_eval_random_init_cached_end_to_end(tmp_path):
    res = linear_eval.main(CPU + ["--arch", "mobilenetv3_small", "--random-init", *SMALL, "--epochs", "2", "--cached",
                            "--json", str(tmp_path / "cached.json")])
    assert res["protocol"] == "cached-features" and len(res["history"]) == 2 and res["ckpt"] is None
    assert os.path.exists(tmp_path / "cached_classifier.pt")


def test_linear_eval_rejects_a_classifier_that_does_not_fit(checkpoint, tmp_path):
    path = tmp_path / "other_classifier.pt"
    torch.save({"classifier": torch.nn.Linear(1024, 7).state_dict(), "arch": "mobilenetv3_small",
                "data": "synthetic", "num_classes": 7, "feat_dim": 1024}, path)
    with pytest.raises(SystemExit, match="number of classes 7"):
        linear_eval.main(CPU + ["--ckpt", checkpoint, "--test-subset", "100", "--evaluate", str(path)])
    with pytest.raises(SystemExit, match="pass --json OUT"):
        linear_eval.main(CPU + ["--ckpt", checkpoint])


# ----- outputs: checked before any work, never replacing another kind of file ---------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Any data loading fails the test: the output checks must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("data was loaded before the output was checked")
    monkeypatch.setattr(knn_eval, "load_data", fail)
    monkeypatch.setattr(linear_eval.data, "load_data", fail)


@pytest.mark.parametrize("script", [knn_eval, linear_eval])
def test_json_never_replaces_the_checkpoint_or_another_file(checkpoint, tmp_path, no_work, script):
    original = open(checkpoint, "rb").read()
    with pytest.raises(SystemExit, match="is the checkpoint being evaluated: choose another --json"):
        script.main(["--ckpt", checkpoint, "--json", checkpoint])
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(SystemExit, match="exists and is not a JSON results file, so it is not replaced"):
        script.main(["--ckpt", checkpoint, "--json", str(notes)])
    assert open(checkpoint, "rb").read() == original and notes.read_text() == "my notes"


def test_linear_eval_never_replaces_a_file_where_the_classifier_goes(checkpoint, tmp_path, no_work):
    other = tmp_path / "out_classifier.pt"
    other.write_bytes(b"not a classifier")
    with pytest.raises(SystemExit, match="exists and is not a classifier saved by linear_eval.py"):
        linear_eval.main(CPU + ["--ckpt", checkpoint, "--json", str(tmp_path / "out.json")])
    assert other.read_bytes() == b"not a classifier"


@pytest.mark.parametrize("script", ["knn_eval", "linear_eval", "bench"])
def test_an_unwritable_json_is_refused_before_any_work(checkpoint, tmp_path, no_work, monkeypatch, script):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file: no directory can be created under it, not even by root")
    out = str(blocker / "sub" / "out.json")
    monkeypatch.setattr(bench, "bench_arch", lambda *a: pytest.fail("the benchmark ran before the check"))
    main = {"knn_eval": knn_eval.main, "linear_eval": linear_eval.main, "bench": bench.main}[script]
    flags = ["--arch", "mobilenetv3_small", "--workers", "0"] if script == "bench" else ["--ckpt", checkpoint]
    with pytest.raises(SystemExit, match=f"--json {re.escape(out)} cannot be written, as {blocker} is not a "
                                         f"writable directory: choose another --json."):
        main(flags + ["--json", out])


def a_run(checkpoint, folder):
    """A pretraining run's folder as pretrain.py leaves it: checkpoint.pt, log.jsonl and summary.json."""
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(open(checkpoint, "rb").read())
    (folder / "log.jsonl").write_text('{"step": 1, "loss": 7.0}\n')
    (folder / "summary.json").write_text('{"arch": "mobilenetv3_small", "complete": true}')
    return {name: (folder / name).read_bytes() for name in evaluation.RUN_FILES}


@pytest.mark.parametrize("script", [knn_eval, linear_eval])
def test_no_evaluation_writes_over_a_runs_files(checkpoint, tmp_path, no_work, script):
    """summary.json and log.jsonl are JSON, so the JSON check alone would replace them: a file of a run's name that
    exists, or any of them in the folder of --ckpt, is refused before any work."""
    run, copies = tmp_path / "run", tmp_path / "results"
    before = a_run(checkpoint, run)
    ckpt = str(run / "checkpoint.pt")
    copies.mkdir()
    (copies / "summary.json").write_bytes(before["summary.json"])  # run_all.sh's copy beside the results
    flag_outputs = [("--json", run / "summary.json"), ("--json", run / "log.jsonl"),
                    ("--json", copies / "summary.json")]
    if script is knn_eval:
        flag_outputs.append(("--neighbours", run / "log.jsonl"))
    for flag, path in flag_outputs:
        with pytest.raises(SystemExit, match=f"^{flag} {re.escape(str(path))} names a pretraining run's "
                                             f"{path.name}, which an evaluation never replaces: choose another "
                                             f"{flag}.$"):
            script.main(["--ckpt", ckpt, "--json", str(tmp_path / "out.json"), flag, str(path)])
    (run / "summary.json").unlink()  # a run whose summary is still to come: its folder is the checkpoint's
    with pytest.raises(SystemExit, match="names a pretraining run's summary.json"):
        script.main(["--ckpt", ckpt, "--json", str(run / "summary.json")])
    assert not (run / "summary.json").exists() and (copies / "summary.json").read_bytes() == before["summary.json"]
    assert all((run / name).read_bytes() == before[name] for name in ("checkpoint.pt", "log.jsonl"))


def test_neighbours_is_checked_before_any_work(checkpoint, tmp_path, no_work):
    """The issue's --neighbours README.md/n.png failed after the whole evaluation; now it, a folder, another kind of
    file and the --json's own path are each one sentence before any data is loaded."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    picture = tmp_path / "old.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n an earlier picture")
    json_path = str(tmp_path / "knn.json")
    for path, sentence in ((notes / "n.png", f"--neighbours {notes / 'n.png'} cannot be written, as {notes} is not "
                                             f"a writable directory: choose another --neighbours."),
                           (tmp_path, f"--neighbours {tmp_path} exists and is not a PNG picture, so it is not "
                                      f"replaced"),
                           (notes, f"--neighbours {notes} exists and is not a PNG picture, so it is not replaced"),
                           (json_path, f"--neighbours and --json both name {json_path}: give the picture another "
                                       f"name.")):
        with pytest.raises(SystemExit, match=re.escape(sentence)):
            knn_eval.main(["--ckpt", checkpoint, "--json", json_path, "--neighbours", str(path)])
    assert notes.read_text() == "my notes" and not os.path.exists(json_path)
    with pytest.raises(AssertionError, match="data was loaded"):  # an earlier picture is replaced: the work starts
        knn_eval.main(["--ckpt", checkpoint, "--json", json_path, "--neighbours", str(picture)])


def test_every_evaluation_records_where_it_ran(tmp_path):
    """The machine record, against what this process and git say: the CPU's flags from /proc/cpuinfo, the cores
    this process may use, torch's threads, the project's commit; start and end in UTC around the evaluation."""
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    knn = knn_eval.main(CPU + ["--pixels", *SMALL, "--k", "20", "--json", str(tmp_path / "knn.json"),
                               "--neighbours", str(tmp_path / "picture")])  # a PNG, whatever its name ends with
    assert evaluation.is_png(tmp_path / "picture")
    linear = linear_eval.main(CPU + ["--pixels", *SMALL, "--epochs", "1", "--cached", "--json",
                                     str(tmp_path / "linear.json")])
    after = datetime.datetime.now(datetime.timezone.utc)
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    flags = (re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE) or [None, ""])[1].split()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for res, path in ((knn, "knn.json"), (linear, "linear.json")):
        m = json.loads((tmp_path / path).read_text())["machine"]
        assert m == res["machine"]
        assert set(m) == {"cpu", "cpu_flags", "cores", "threads", "gpu", "gpus", "world_size", "torch", "commit",
                          "modified", "start", "end"}
        assert m["cpu"] and m["cpu_flags"] == [f for f in ("avx2", "avx512f", "avx512_bf16") if f in flags]
        assert m["cores"] == len(os.sched_getaffinity(0)) and m["threads"] == torch.get_num_threads() >= 1
        assert m["gpus"] == torch.cuda.device_count() and (m["gpu"] is None) == (m["gpus"] == 0)
        assert (m["world_size"], m["torch"]) == (1, torch.__version__)
        assert m["commit"] == (commit or None) and isinstance(m["modified"], bool) == bool(commit)
        start, end = (datetime.datetime.fromisoformat(m[key]) for key in ("start", "end"))
        assert start.utcoffset() == end.utcoffset() == datetime.timedelta(0)
        assert before <= start <= end <= after


def test_the_machine_record_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PROJECT", str(tmp_path))  # not a git checkout
    m = evaluation.machine(0, torch.device("cpu"))
    assert (m["commit"], m["modified"], m["start"]) == (None, None, "1970-01-01T00:00:00+00:00")
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert evaluation.git("rev-parse", "HEAD") is None


@pytest.mark.parametrize("script", [knn_eval, linear_eval])
def test_a_checkpoint_with_non_finite_weights_is_refused(checkpoint, tmp_path, script):
    ckpt = torch.load(checkpoint, weights_only=True)
    name = next(k for k in ckpt["model"] if k.startswith("encoder_q.backbone.") and k.endswith("weight"))
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))
    path = tmp_path / "diverged.pt"
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match=f"{re.escape(str(path))} holds NaN or inf backbone weights"):
        script.main(["--ckpt", str(path), "--json", str(tmp_path / "out.json")])


def test_a_gpu_torch_cannot_use_is_said_not_passed_over(tmp_path, monkeypatch, capsys):
    """nvidia-smi lists a GPU, torch sees none (a driver older than torch's CUDA build): --device auto stops with
    one sentence instead of running on the CPU in silence; the CPU stays available on purpose."""
    if torch.cuda.is_available():
        pytest.skip("torch can use this machine's GPU")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200, 535.104.05'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sentence = f"nvidia-smi sees 1 GPU(s) (NVIDIA H200, driver 535.104.05) that this torch {torch.__version__}"
    with pytest.raises(SystemExit, match=re.escape(sentence)):
        evaluation.pick_device("auto")
    with pytest.raises(SystemExit, match=re.escape(sentence)):
        knn_eval.main(["--pixels", *SMALL])
    assert evaluation.pick_device("cpu").type == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose
    assert evaluation.pick_device("auto").type == "cpu"


# ----- user mistakes: said in one sentence, or said and recorded as what was used ------------------------------------

def test_k_above_the_bank_is_said_and_recorded_as_used(capsys):
    res = knn_eval.main(CPU + ["--pixels", *SMALL, "--k", "20", "500", "5000"])
    assert [r["k"] for r in res["knn"]] == [20, 200]  # the bank's 200 images: k 200, once
    err = capsys.readouterr().err
    assert "--k 500 is more than the 200 images of the bank: k 200 is used." in err and "--k 5000 is more" in err


def test_a_subset_larger_than_the_data_is_said(capsys):
    res = knn_eval.main(CPU + ["--pixels", "--data", "synthetic", "--subset", "100000", "--test-subset", "50",
                               "--k", "20"])
    assert res["n_bank"] == 2000  # the synthetic training split
    assert "--subset 100000: synthetic has fewer images than that, so 2000 are used." in capsys.readouterr().err


@pytest.mark.parametrize("device, sentence", [
    ("gpu", "--device gpu is not a device this project runs on: use auto, cpu, cuda or cuda:N."),
    ("cuda:x", "--device cuda:x is not a device this project runs on"),
    ("mps", "--device mps is not a device this project runs on")])
def test_a_device_that_is_not_one_is_one_sentence(device, sentence):
    for script in (knn_eval, linear_eval):
        with pytest.raises(SystemExit, match=re.escape(sentence)):
            script.main(["--pixels", *SMALL, "--device", device, "--json", "unused.json"])


def test_a_gpu_that_is_not_there_is_one_sentence(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU torch can use")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no nvidia-smi sentence either
    with pytest.raises(SystemExit, match="--device cuda asks for a GPU, and torch .* sees none on this machine"):
        knn_eval.main(["--pixels", *SMALL, "--device", "cuda"])
    import pretrain
    with pytest.raises(SystemExit, match="--device cuda asks for a GPU"):
        pretrain.main(["--data", "synthetic", "--subset", "64", "--batch-size", "16", "--moco-k", "32",
                       "--device", "cuda", "--out", str(tmp_path / "run")])
    assert not os.path.exists(tmp_path / "run")


def test_a_run_directory_given_as_checkpoint_is_named_so(checkpoint):
    folder = os.path.dirname(checkpoint)
    for script in (knn_eval, linear_eval):
        with pytest.raises(SystemExit, match=re.escape(f"checkpoint {folder} is a directory: pass the checkpoint.pt "
                                                       f"in it (it holds one).")):
            script.main(CPU + ["--ckpt", folder, "--json", "unused.json"])


def test_help_shows_commands_that_run_as_printed(capsys):
    """--help's example commands start with the interpreter that is running, never a bare python3 that may lack
    torch (unless python3 is that interpreter). In-process: each script's main is what `python SCRIPT --help` runs."""
    import importlib
    import data
    for script in ("knn_eval.py", "linear_eval.py", "pretrain.py", "bench.py", "report.py"):
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(script[:-3]).main(["--help"])
        assert exit_.value.code == 0, script
        stdout = capsys.readouterr().out
        assert f"{data.interpreter()} {script}" in stdout or f"{data.interpreter()} -m" in stdout, script
        if data.interpreter() != "python3":
            assert "python3 " not in stdout, script


# ----- the neighbours picture ---------------------------------------------------------------------------------------

def frame_colours(path, rows, columns, size, caption_lines=4):
    """The colour of each cell's frame in a neighbours picture: (red, green, blue) one pixel inside its border."""
    from PIL import Image
    picture = Image.open(path).convert("RGB")
    top, stride = 12 * caption_lines + 4, size + 4 + 2  # caption; image + frame of 2 on each side + grid padding 2
    return [[picture.getpixel((2 + c * stride + 1, top + 2 + r * stride + 1)) for c in range(columns)]
            for r in range(rows)]


def test_neighbours_show_the_same_queries_for_every_network_and_mark_their_classes(checkpoint, tmp_path):
    runs = {"pixels": ["--pixels"], "random0": ["--arch", "mobilenetv3_small", "--random-init", "--seed", "0"],
            "random1": ["--arch", "resnet18", "--random-init", "--seed", "1", "--precise-bn"],
            "ckpt": ["--ckpt", checkpoint]}
    test = load_data("synthetic", "test", subset="100")
    train = load_data("synthetic", "train", subset="200")
    expected = [i for c in range(10) for i in [j for j in range(100) if test.labels[j] == c][:2]]  # by hand
    for name, flags in runs.items():
        png = tmp_path / f"{name}.png"
        data_flags = [] if name == "ckpt" else ["--data", "synthetic", "--subset", "200"]
        res = knn_eval.main(CPU + flags + data_flags + ["--test-subset", "100", "--k", "20", "--neighbours",
                                                        str(png)])
        shown = res["neighbours"]
        assert shown["queries"] == expected, name  # the same images, in the same order, whatever the features
        if name == "pixels":  # the nearest under the features evaluated: here the normalised pixels, by hand
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (train.mean, train.std))
            bank, query = (F.normalize(((d.images.double() / 255 - mean) / std).flatten(1), dim=1)
                           for d in (train, test))
            similar = query[expected] @ bank.T
            for row, sims in zip(shown["nearest"], similar):
                assert sims[row].tolist() == sorted(sims[row].tolist(), reverse=True)
                assert sims[row[-1]] >= sims.sort(descending=True).values[len(row) - 1] - 1e-6
        assert all(len(row) == knn_eval.NEIGHBOURS_SHOWN for row in shown["nearest"])
        same = [[int(train.labels[j]) == int(test.labels[q]) for j in row]
                for q, row in zip(shown["queries"], shown["nearest"])]
        assert shown["same_class"] == pytest.approx(np.mean(same))
        colours = frame_colours(png, len(expected), 1 + knn_eval.NEIGHBOURS_SHOWN, 32)
        for marks, row in zip(same, colours):
            assert row[0][0] < 100 and row[0][1] < 100  # the query's dark frame
            for mark, (red, green, _) in zip(marks, row[1:]):
                assert (green > red) == mark, name  # green: the query's class; red: another
