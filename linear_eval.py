"""Linear evaluation of a pretrained or randomly initialised backbone (MoCo's protocol, He et al. 2020).

    python3 linear_eval.py --ckpt runs/mnv3s/checkpoint.pt --json results/mnv3s_linear.json
    python3 linear_eval.py --arch mobilenetv3_small --random-init --data fashionmnist --json results/random.json
    python3 linear_eval.py --ckpt ... --cached --json ...       # fast approximation, labelled "cached-features"

The backbone is frozen and stays in eval mode, so its BN statistics cannot move; a linear classifier on its pooled
features is trained with SGD (lr 30, wd 0, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80) on random-resized
crops with flips and tested on the evaluation transform. Afterwards every backbone tensor is compared with the
loaded one (MoCo's sanity check). --json OUT receives the per-epoch history and the result, the last epoch's top-1
and top-5 (`top1`); the best epoch on the test images is kept as `best_on_test_top1`, a number selected on the test
set and never a result. The classifier is saved beside OUT as its name with "_classifier.pt" in place of ".json";
--evaluate CLASSIFIER tests a saved classifier again. --precise-bn re-estimates the backbone's BN statistics on the
training images first (the backbone stays frozen in eval mode after that). Network and data flags are those of
knn_eval.py.
"""
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import data
from evaluation import (MODEL_RUN_CONTROL, add_model_flags, check_json_output, evaluated_bn, extract_features,
                        load_model, machine, pick_device, save_atomic, settings, topk_accuracy, write_json, writing)


def check_backbone_unchanged(backbone, reference):
    """MoCo's sanity check: every backbone tensor, BN running statistics and batch counters included, must equal the
    reference (a backbone left in train mode moves its BN statistics without any gradient)."""
    state = backbone.state_dict()
    changed = sorted(k for k in state.keys() | reference.keys() if k not in state or k not in reference
                     or not torch.equal(state[k].cpu(), reference[k].cpu()))
    if changed:
        raise RuntimeError(f"linear evaluation changed {len(changed)} backbone tensors ({', '.join(changed[:3])}"
                           f"{', ...' if len(changed) > 3 else ''}), so its results are invalid: this is a bug.")


def classifier_path(json_path):
    return os.path.splitext(json_path)[0] + "_classifier.pt"


def check_classifier_output(path):
    """A classifier is saved beside --json: an existing file there is replaced only if it is a saved classifier."""
    if os.path.exists(path):
        try:
            torch.load(path, map_location="cpu", weights_only=True)["classifier"]
        except Exception:
            raise SystemExit(f"{path}, where the classifier would be saved, exists and is not a classifier saved by "
                             f"linear_eval.py, so it is not replaced: move it away or choose another --json.") from None


def epoch_order(n, batch_size, seed, epoch):
    """This epoch's shuffled index batches; the order depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).split(batch_size)


def train_epoch(classifier, optimizer, batches, embed):
    """One pass of SGD on the classifier alone; (mean loss, train top-1 %)."""
    classifier.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in batches:
        with torch.no_grad():
            feats = embed(x)
        logits = classifier(feats)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return loss_sum / seen, 100 * correct / seen


@torch.no_grad()
def evaluate(classifier, batches, embed):
    classifier.eval()
    scores, labels = zip(*((classifier(embed(x)), y) for x, y in batches))
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def load_classifier(path, args, dim, num_classes):
    """A classifier saved by this script, checked against the backbone and data it is about to be tested on."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        weights = saved["classifier"]
    except Exception as e:
        raise SystemExit(f"{path} is not a classifier saved by linear_eval.py ({type(e).__name__}): pass the "
                         f"*_classifier.pt file written beside its --json.")
    for what, trained, now in (("architecture", saved.get("arch"), args.arch), ("data set", saved.get("data"),
                               args.data), ("number of classes", saved.get("num_classes"), num_classes),
                               ("feature size", saved.get("feat_dim"), dim)):
        if trained != now:
            raise SystemExit(f"{path} was trained for {what} {trained}, but the backbone and data given have "
                             f"{now}: pass the --ckpt and --data it was trained with.")
    if saved.get("precise_bn", False) != args.precise_bn:
        raise SystemExit(f"{path} was trained on features {'with' if saved.get('precise_bn') else 'without'} "
                         f"--precise-bn: give the flag as it was given then.")
    classifier = nn.Linear(dim, num_classes)
    classifier.load_state_dict(weights)
    return classifier


# the flags that say where the results go and how fast they are made, not what is computed (a study counts
# commands that differ only in these as equal)
RUN_CONTROL = MODEL_RUN_CONTROL | {"json"}


def parser():
    p = data.FlagParser(__doc__)
    add_model_flags(p)
    a = p.add_argument
    a("--lr", type=data.float_flag(0, 1000, low_open=True), default=30.0, help="SGD learning rate (momentum 0.9)")
    a("--wd", type=data.float_flag(0, 1), default=0.0, help="weight decay")
    a("--epochs", type=data.int_flag(1, 100_000), default=100, help="training epochs of the classifier")
    a("--schedule", type=data.int_flag(1, 100_000), nargs="*", default=[60, 80],
      help="epochs at which the lr is multiplied by 0.1")
    a("--cached", action="store_true", help="fast protocol: features extracted once (evaluation transform, no "
                                            "augmentation), the classifier trained on them")
    a("--evaluate", default=None, metavar="CLASSIFIER", help="only test a *_classifier.pt saved by this script")
    a("--json", default=None, help="results file (required unless --evaluate); a trained classifier is saved beside "
                                   "it")
    return p


def get_args(argv=None):
    args = parser().parse_args(argv)
    if args.evaluate is None and args.json is None:
        raise SystemExit("pass --json OUT: the results and the trained classifier are written there.")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.json:
        check_json_output(args.json, ckpt=args.ckpt)
    if not args.evaluate:
        check_classifier_output(classifier_path(args.json))
    with writing({"--json": args.json}):  # one writer per folder: the results and the classifier go there
        return run(args)


def run(args):
    """The linear protocol (or --evaluate of a saved classifier), its outputs checked and held by main."""
    device = pick_device(args.device)
    start = time.time()
    backbone, _, dim = load_model(args)
    backbone.requires_grad_(False).eval()  # eval mode from here on: BN uses, and keeps, its running statistics
    backbone.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    train = data.load_data(args.data, "train", args.data_dir, args.subset, args.seed)
    test = data.load_data(args.data, "test", args.data_dir, args.test_subset, args.seed)
    evaluated_bn(args, backbone, train, device)
    reference = {k: v.detach().clone() for k, v in backbone.state_dict().items()}  # the backbone as evaluated
    protocol = "cached-features" if args.cached else "moco-linear"
    what = ("raw pixels" if args.pixels else args.ckpt or "random init") + (", precise BN" if args.precise_bn else "")
    name = f"{args.arch} ({what}), {args.data} at {args.img_size} px"

    if args.evaluate:
        classifier = load_classifier(args.evaluate, args, dim, train.num_classes).to(device)
        top1, top5 = evaluate(classifier, data.eval_loader(test, args.img_size, args.batch_size, args.workers,
                                                           device), backbone)
        print(f"{name}: {args.evaluate} on {len(test)} test images: top-1 {top1:.2f}%"
              + ("" if top5 is None else f", top-5 {top5:.2f}%"))
        results = {"protocol": "evaluate", "classifier": args.evaluate,
                   **settings(args, device, dim, train.num_classes), "n_test": len(test), "top1": top1, "top5": top5,
                   "machine": machine(start, device)}
        if args.json:
            write_json(results, args.json)
        return results

    torch.manual_seed(args.seed)
    classifier = nn.Linear(dim, train.num_classes).to(device)
    nn.init.normal_(classifier.weight, 0, 0.01)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    if args.cached:
        feats = [extract_features(backbone, d, args.img_size, args.batch_size, device, args.workers)
                 for d in (train, test)]
        (train_x, train_y), (test_x, test_y) = [(x.to(device), y.to(device)) for x, y in feats]
        embed = nn.Identity()

        def train_batches(epoch):
            for idx in epoch_order(len(train_y), args.batch_size, args.seed, epoch):
                yield train_x[idx.to(device)], train_y[idx.to(device)]

        def test_batches():
            return zip(test_x.split(args.batch_size), test_y.split(args.batch_size))
        print(f"{name}: protocol cached-features, a fast approximation (features extracted once, no training "
              f"augmentation), not MoCo's linear protocol")
    else:
        if train.images is not None:  # on the device once, not at every epoch's view_batches
            train.images = train.images.to(device)
        gen = torch.Generator().manual_seed(args.seed)
        embed = backbone

        def train_batches(epoch):  # crop + flip views: on the device for in-memory images, else in workers
            order = epoch_order(len(train), args.batch_size, args.seed, epoch)
            return data.view_batches(train, "linear", args.img_size, order, device, views=1, gen=gen,
                                     workers=args.workers)

        def test_batches():
            return data.eval_loader(test, args.img_size, args.batch_size, args.workers, device)
        print(f"{name}: protocol moco-linear (frozen backbone in eval mode, crop + flip training views)")

    history = []
    for epoch in range(args.epochs):
        tick = time.time()
        lr = args.lr * 0.1 ** sum(epoch >= m for m in args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, train_top1 = train_epoch(classifier, optimizer, train_batches(epoch), embed)
        top1, top5 = evaluate(classifier, test_batches(), embed)
        history.append({"epoch": epoch + 1, "loss": loss, "train_top1": train_top1, "test_top1": top1,
                        "test_top5": top5, "lr": lr, "seconds": time.time() - tick})
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} train {train_top1:.2f}% test top-1 {top1:.2f}% "
              f"lr {lr:g} {history[-1]['seconds']:.1f} s", flush=True)
    check_backbone_unchanged(backbone, reference)

    best = max(history, key=lambda h: h["test_top1"])  # chosen by looking at the test set: reported as such only
    results = {"protocol": protocol, **settings(args, device, dim, train.num_classes), "n_train": len(train),
               "n_test": len(test), "lr": args.lr, "wd": args.wd, "batch_size": args.batch_size,
               "epochs": args.epochs, "schedule": args.schedule, "top1": history[-1]["test_top1"],
               "top5": history[-1]["test_top5"], "best_on_test_top1": best["test_top1"],
               "best_on_test_epoch": best["epoch"], "classifier": classifier_path(args.json), "history": history,
               "seconds": time.time() - start, "machine": machine(start, device)}
    # the classifier first: run_all.sh takes an existing --json as a finished stage, so it must never exist alone
    save_atomic({"classifier": classifier.cpu().state_dict(), "arch": args.arch, "ckpt": args.ckpt,
                 "encoder": args.encoder, "data": args.data, "num_classes": train.num_classes, "feat_dim": dim,
                 "img_size": args.img_size, "protocol": protocol, "precise_bn": args.precise_bn}, results["classifier"])
    write_json(results, args.json)
    print(f"{protocol}: top-1 {results['top1']:.2f}% after the last epoch (the result; the best epoch on the test "
          f"set, {best['epoch']}, had {best['test_top1']:.2f}%, a number selected on the test set); backbone "
          f"unchanged; {results['seconds']:.0f} s; results in {args.json}, classifier in {results['classifier']}")
    return results


if __name__ == "__main__":
    data.exit_on_unreadable_image(main)
