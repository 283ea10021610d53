"""kNN evaluation and over-clustering diagnostics of a pretrained or randomly initialised backbone
(weighted kNN: Wu et al. 2018, InstDisc; alignment and uniformity: Wang & Isola 2020; the diagnostics as the
AAAI'22 paper's code, WOWNICE/ssl-small, measures them).

    python3 knn_eval.py --ckpt runs/mnv3s/checkpoint.pt --subset 10000 --k 20 200 --sweep --diagnostics --json OUT
    python3 knn_eval.py --arch mobilenetv3_small --random-init --data fashionmnist --subset 10000 --json OUT
    python3 knn_eval.py --pixels --data fashionmnist --subset 10000 --json OUT       # the raw-pixel reference

Features are the pooled backbone output of the query encoder (--encoder key, --features head for the projection
output) under the evaluation transform. The bank is the training split (--subset), the queries the test split
(--test-subset). Data settings default to the checkpoint's; --arch, --small-stem or --img-size contradicting it is an
error, while another --data is allowed (transfer evaluation) and reported.
"""
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import data
from data import eval_resize, exit_on_unreadable_image, load_data, pil_image, view_batches
from evaluation import (MODEL_RUN_CONTROL, add_model_flags, check_json_output, evaluated_bn, extract_features, is_png,
                        knn_predict, load_model, machine, nearest, pick_device, settings, topk_accuracy, write_json,
                        writing)

BEST_NN_KS = tuple(range(1, 102, 2))


# ----- pure functions of tensors -----------------------------------------------------------------------------------


def squared_distances(a, b):
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp_min(0)


def best_nn_accuracies(query, query_labels, bank, bank_labels, num_classes, ks=BEST_NN_KS, chunk=1024):
    """{k: top-1 %} of a majority vote among the k nearest bank entries in Euclidean distance (raw features), for
    every k in ks up to the bank size. The nearest max(ks) are found once per chunk of queries and reused for every k.
    Equal distances rank the lower bank index first; a tied vote goes to the tied class met first (its nearest
    member is nearest)."""
    ks = [k for k in ks if k <= len(bank)]
    kmax = max(ks)
    correct = dict.fromkeys(ks, 0)
    for q, y in zip(query.split(chunk), query_labels.split(chunk)):
        labels = bank_labels[nearest(-squared_distances(q, bank), kmax)[1]]  # [c, kmax], nearest first
        rank = torch.arange(kmax, device=q.device).expand_as(labels)
        first = torch.full((len(q), num_classes), kmax, device=q.device).scatter_reduce_(1, labels, rank, "amin")
        counts = torch.zeros(len(q), num_classes, dtype=torch.long, device=q.device)
        for k in range(1, kmax + 1):
            counts.scatter_add_(1, labels[:, k - 1:k], torch.ones_like(labels[:, :1]))
            if k in correct:  # counts decide; among equal counts the class met first wins
                correct[k] += ((counts * (kmax + 1) - first).argmax(1) == y).sum().item()
    return {k: 100 * c / len(query) for k, c in correct.items()}


def alignment(z1, z2):
    """Mean ||z1_i - z2_i||^2 over the views of each image (L2-normalised features)."""
    return (z1 - z2).pow(2).sum(1).mean().item()


def uniformity(z, t=2.0, chunk=1024):
    """log of the mean of exp(-t ||z_i - z_j||^2) over all pairs of different images i != j."""
    total = 0.0
    for start in range(0, len(z), chunk):
        d2 = squared_distances(z[start:start + chunk], z)
        rows = torch.arange(len(d2), device=z.device)
        d2[rows, rows + start] = math.inf  # leave out i == j
        total += (-t * d2).exp().sum(dtype=torch.float64).item()
    return math.log(total / (len(z) * (len(z) - 1)))


def intra_class_alignment(z, labels, num_classes):
    """ssl-small's intra-class alignment: per class, the mean ||z_i - z_j||^2 over its pairs i != j; then the mean
    over the classes that have at least two images. Per class of n images,
    sum_{i,j} ||z_i - z_j||^2 = 2 n sum_i ||z_i||^2 - 2 ||sum_i z_i||^2."""
    z = z.double()
    n = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, labels, z)
    sq = torch.zeros(num_classes, dtype=z.dtype, device=z.device).index_add_(0, labels, z.pow(2).sum(1))
    pairs = n > 1
    per_class = (2 * n * sq - 2 * sums.pow(2).sum(1))[pairs] / (n * (n - 1))[pairs]
    return per_class.mean().item()


def instance_accuracy(originals, views, chunk=1024):
    """ssl-small's instance discrimination: % of images whose original (evaluation transform) is more similar to its
    own augmented view than to the original of every other image (cosine, L2-normalised features); a tie is a miss."""
    n = len(originals)
    hits = 0
    for start in range(0, n, chunk):
        o = originals[start:start + chunk]
        rows = torch.arange(len(o), device=o.device)
        others = o @ originals.T
        others[rows, rows + start] = -math.inf  # its own original is not a candidate
        positive = (o * views[start:start + chunk]).sum(1)
        hits += (positive > others.max(1).values).sum().item()
    return 100 * hits / n


# ----- the diagnostics ----------------------------------------------------------------------------------------


VIEW_CHUNK = 256  # views are drawn for this many images at a time, whatever --batch-size


@torch.no_grad()
def view_features(model, images, aug, img_size, seed, device, workers=0):
    """L2-normalised features of two augmented views of each image, (z1, z2), in data-set order and the same on any
    device and for any --batch-size: in-memory images through BatchedAugment with a seeded CPU generator, image files
    through view_transform with torch (and the DataLoader workers) seeded, VIEW_CHUNK images at a time. The model runs
    in eval mode."""
    model.eval()
    torch.manual_seed(seed)  # view_transform in this process (no workers) draws from torch's generator
    order = torch.arange(len(images)).split(VIEW_CHUNK)
    z1, z2 = [], []
    for x1, x2, _ in view_batches(images, aug, img_size, order, device, gen=torch.Generator().manual_seed(seed),
                                  workers=workers, loader_gen=torch.Generator().manual_seed(seed)):
        z1.append(F.normalize(model(x1).float(), dim=1))
        z2.append(F.normalize(model(x2).float(), dim=1))
    return torch.cat(z1), torch.cat(z2)


# ssl-small's diagnostics see MoCo-v2's views of a fixed set of images, drawn once: the same inputs for every
# checkpoint and recipe, whatever augmentation or seed a checkpoint was trained with.
DIAG_AUG, DIAG_SEED = "mocov2", 0


def diagnostics(model, data_name, data_dir, per_class, img_size, batch_size, device, workers=0, chunk=1024):
    """Over-clustering diagnostics as ssl-small measures them (eval/stats-dist.py, eval/instdisc.py): per_class
    training images of each class, each seen as its original (the evaluation transform) and as two MoCo-v2 views.
    Alignment original-view and view-view, uniformity (t 2) and intra-class alignment of the originals and of the
    first views, and instance accuracy (the original finds its own view; instance_accuracy). Uniformity is the exact
    mean over all pairs, where ssl-small averages three random samples of 128 images."""
    fixed = load_data(data_name, "train", data_dir, f"{per_class}/class", DIAG_SEED)
    originals = F.normalize(extract_features(model, fixed, img_size, batch_size, device, workers)[0].to(device), dim=1)
    view1, view2 = view_features(model, fixed, DIAG_AUG, img_size, DIAG_SEED, device, workers)
    y, c = fixed.labels.to(device), fixed.num_classes
    return {"n_images": len(fixed), "aug": DIAG_AUG, "seed": DIAG_SEED,
            "alignment_original_view": alignment(originals, view1), "alignment_view_view": alignment(view1, view2),
            "uniformity_original": uniformity(originals, chunk=chunk),
            "uniformity_view": uniformity(view1, chunk=chunk),
            "intra_class_original": intra_class_alignment(originals, y, c),
            "intra_class_view": intra_class_alignment(view1, y, c),
            "instance_accuracy": instance_accuracy(originals, view1, chunk)}


# ----- the nearest neighbours of fixed queries, as a picture --------------------------------------------------------

NEIGHBOUR_QUERIES_PER_CLASS, NEIGHBOURS_SHOWN = 2, 8


def neighbour_queries(labels, num_classes, per_class=NEIGHBOUR_QUERIES_PER_CLASS):
    """The picture's queries: the first `per_class` test images of each class, class by class in data-set order. They
    depend on the test labels alone, so every checkpoint, seed and reference shows the same images in the same
    order."""
    return [i for c in range(num_classes) for i in (labels == c).nonzero().flatten()[:per_class].tolist()]


def thumbnails(data, indices, img_size):
    """The images themselves (not normalised), [N, 3, img_size, img_size] in [0, 1], as the evaluation sees them."""
    if data.images is not None:
        return eval_resize(data.images[indices], img_size)
    from torchvision import transforms as T  # image files only
    show = T.Compose([T.Resize(round(img_size / 0.875)), T.CenterCrop(img_size), T.ToTensor()])
    return torch.stack([show(pil_image(data, i)) for i in indices])


def framed(images, colours, width=2):
    """Each image inside a frame of its colour (RGB in [0, 1])."""
    n, c, h, w = images.shape
    out = torch.tensor(colours, dtype=images.dtype).view(n, c, 1, 1).expand(n, c, h + 2 * width, w + 2 * width)
    out = out.clone()
    out[:, :, width:width + h, width:width + w] = images
    return out


QUERY_FRAME, SAME_CLASS, OTHER_CLASS = (0.2, 0.2, 0.2), (0.0, 0.6, 0.0), (0.85, 0.0, 0.0)


def neighbours_picture(path, caption, queries, neighbours, test, train, img_size):
    """A grid, one row per query: the query (dark frame), then its nearest training images, nearest first, each
    framed green when it has the query's class and red when not; the caption's lines above. Saved as a PNG of at
    most 64 colours (a few tens of KB). Returns the fraction of neighbours with the query's class."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid  # imported where used, as data.py does
    same = train.labels[neighbours] == test.labels[queries].view(-1, 1)  # [queries, shown]
    rows = []
    for query, row, marks in zip(queries, neighbours, same):
        colours = [QUERY_FRAME] + [SAME_CLASS if m else OTHER_CLASS for m in marks.tolist()]
        images = torch.cat([thumbnails(test, [query], img_size), thumbnails(train, row.tolist(), img_size)])
        rows.append(framed(images, colours))
    grid = make_grid(torch.cat(rows), nrow=1 + neighbours.shape[1], padding=2, pad_value=1.0)
    picture = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    top = 12 * len(caption) + 4
    canvas = Image.new("RGB", (picture.width, picture.height + top), "white")
    canvas.paste(picture, (0, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(caption):
        draw.text((2, 2 + 12 * i), line, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.quantize(colors=64).save(path, format="PNG", optimize=True)  # whatever the file's name ends with
    return same.float().mean().item()


# ----- the script -------------------------------------------------------------------------------------------------

# the flags that say where the results go and how fast they are made, not what is computed (a study counts
# commands that differ only in these as equal; --neighbours counts as whether a picture is drawn)
RUN_CONTROL = MODEL_RUN_CONTROL | {"json", "chunk"}


def parser():
    p = data.FlagParser(__doc__)
    add_model_flags(p)
    a = p.add_argument
    count = data.int_flag
    a("--features", default="backbone", choices=("backbone", "head"), help="pooled backbone output, or the "
                                                                           "projection head's")
    a("--k", type=count(1, 2**24), nargs="+", default=[200],
      help="neighbours of the weighted kNN (200 on small data, 20 on ImageNet); several values share one feature "
           "extraction")
    a("--t", type=data.float_flag(0, 100, low_open=True), default=0.1,
      help="temperature of the kNN vote weights exp(sim / t)")
    a("--sweep", action="store_true", help="also best-NN: Euclidean, majority vote, best k in 1, 3, ..., 101")
    a("--diagnostics", action="store_true", help="ssl-small's alignment, uniformity, intra-class alignment and "
                                                  "instance accuracy on fixed images and MoCo-v2 views")
    a("--diag-per-class", type=count(2, 10**6), default=50, help="training images per class for the diagnostics")
    a("--neighbours", default=None, metavar="FILE.png",
      help="draw the nearest training images of fixed test queries (the first two of each class) under these "
           "features, each marked as of the query's class (green) or not (red)")
    a("--chunk", type=count(1, 2**24), default=1024, help="query rows of the similarity matrix held at a time")
    a("--json", default=None, help="write the results here")
    return p


def get_args(argv=None):
    return parser().parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if args.json:
        check_json_output(args.json, ckpt=args.ckpt)
    if args.neighbours:
        check_json_output(args.neighbours, "--neighbours", args.ckpt, is_png, "a PNG picture")
        if args.json and os.path.abspath(args.neighbours) == os.path.abspath(args.json):
            raise SystemExit(f"--neighbours and --json both name {args.json}: give the picture another name.")
    with writing({"--json": args.json, "--neighbours": args.neighbours}):  # one writer per folder
        return run(args)


def run(args):
    """The kNN evaluation and what was asked beside it (best-NN sweep, neighbours, diagnostics), its outputs checked
    and held by main."""
    device = pick_device(args.device)
    start = time.time()
    backbone, head, dim = load_model(args)
    if args.features == "head" and head is None:
        raise SystemExit("--features head needs a --ckpt: a random initialisation or the pixels have no trained "
                         "projection head.")
    model = backbone if args.features == "backbone" else torch.nn.Sequential(backbone, head)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    train = load_data(args.data, "train", args.data_dir, args.subset, args.seed)
    test = load_data(args.data, "test", args.data_dir, args.test_subset, args.seed)
    evaluated_bn(args, model, train, device)
    bank, bank_labels = (t.to(device) for t in extract_features(model, train, args.img_size, args.batch_size, device,
                                                                 args.workers))
    query, labels = (t.to(device) for t in extract_features(model, test, args.img_size, args.batch_size, device,
                                                            args.workers))
    dim = bank.shape[1]
    results = {"protocol": "knn", **settings(args, device, dim, train.num_classes), "features": args.features,
               "n_bank": len(bank), "n_query": len(query), "t": args.t,
               "knn": [], "best_nn": None, "diagnostics": None, "neighbours": None}
    name = (args.ckpt or ("raw pixels" if args.pixels else "random init")) + (", precise BN" if args.precise_bn else "")
    print(f"{args.arch} ({name}), {args.features} features d={dim}, "
          f"{args.data} at {args.img_size} px: bank {len(bank)}, queries {len(query)}")
    print(f"{'protocol':<22}{'k':>5}{'top-1':>8}{'top-5':>8}")
    normed_bank, normed_query = F.normalize(bank, dim=1), F.normalize(query, dim=1)
    for k in [k for k in args.k if k > len(bank)]:
        print(f"--k {k} is more than the {len(bank)} images of the bank: k {len(bank)} is used.", file=sys.stderr)
    for k in dict.fromkeys(min(k, len(bank)) for k in args.k):  # the k used, each once, in the order given
        scores = knn_predict(normed_query, normed_bank, bank_labels, train.num_classes, k, args.t, args.chunk)
        top1, top5 = topk_accuracy(scores, labels)
        results["knn"].append({"k": k, "top1": top1, "top5": top5})
        print(f"{f'weighted kNN, T {args.t:g}':<22}{k:>5}{top1:>8.2f}{'-' if top5 is None else f'{top5:.2f}':>8}")
    if args.sweep:
        by_k = best_nn_accuracies(query, labels, bank, bank_labels, train.num_classes, chunk=args.chunk)
        best = max(by_k, key=lambda k: (by_k[k], -k))  # equal accuracies: the smaller k
        results["best_nn"] = {"k": best, "top1": by_k[best], "by_k": by_k}
        print(f"{'best-NN (Euclidean)':<22}{best:>5}{by_k[best]:>8.2f}{'-':>8}")
    if args.neighbours:
        queries = neighbour_queries(labels.cpu(), train.num_classes)
        shown = nearest(normed_query[queries] @ normed_bank.T, min(NEIGHBOURS_SHOWN, len(bank)))[1].cpu()
        run = os.path.basename(os.path.dirname(os.path.abspath(args.ckpt))) if args.ckpt else None
        label = run or ("raw pixels" if args.pixels else f"{args.arch}, random init")
        caption = [label + (", precise BN" if args.precise_bn else ""),
                   f"kNN k {results['knn'][-1]['k']}: {results['knn'][-1]['top1']:.2f}%",
                   "query, then its nearest training", "images (green: its class; red: not)"]
        same = neighbours_picture(args.neighbours, caption, queries, shown, test, train, args.img_size)
        results["neighbours"] = {"png": args.neighbours, "queries": queries, "nearest": shown.tolist(),
                                 "same_class": same}
        print(f"neighbours: {args.neighbours} ({len(queries)} queries, {same:.0%} of their {shown.shape[1]} nearest "
              f"training images of their class)")
    if args.diagnostics:
        results["diagnostics"] = d = diagnostics(model, args.data, args.data_dir, args.diag_per_class, args.img_size,
                                                 args.batch_size, device, args.workers, args.chunk)
        print(f"diagnostics on {d['n_images']} images (original and two {d['aug']} views each): alignment "
              f"original-view {d['alignment_original_view']:.4f}, view-view {d['alignment_view_view']:.4f}; "
              f"uniformity {d['uniformity_original']:.4f} / {d['uniformity_view']:.4f}; intra-class alignment "
              f"{d['intra_class_original']:.4f} / {d['intra_class_view']:.4f} (originals / views); instance accuracy "
              f"{d['instance_accuracy']:.2f}%")
    results["seconds"] = time.time() - start
    results["machine"] = machine(start, device)
    print(f"{results['seconds']:.1f} s on {device}")
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    exit_on_unreadable_image(main)
