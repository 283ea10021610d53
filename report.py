"""The study's results, from the JSON files that run_all.sh's stages wrote: RESULTS.md (a table to paste into a
paper), results.csv (one row per network and recipe) and, where matplotlib is installed, results.png (kNN against
the random-init reference, and the health curves: pretext accuracy and the kNN monitor per epoch).

    python3 report.py PRESET RUNS_DIR OUT_DIR SECONDS ARCH [ARCH ...]

run_all.sh runs it last; SECONDS is how long that invocation of run_all.sh took.
"""
import csv
import json
import os
import platform
import sys

import torch

RECIPES = ("baseline", "small")
COLUMNS = ["network", "recipe", "params", "epochs", "pretext acc first -> last", "instance acc", "kNN random init",
           "kNN random, BN of data", "kNN learned", "gain", "linear top-1", "alignment", "uniformity", "img/s",
           "pretrain min"]


def load(path):
    with open(path) as f:
        return json.load(f)


def read_log(run):
    with open(f"{run}/log.jsonl") as f:
        return [json.loads(line) for line in f]


def knn200(results):
    return next(x["top1"] for x in results["knn"] if x["k"] == 200)


def collect(runs, out, archs):
    """(rows, evaluation seconds, the diagnostics of the last run): one row per network and recipe."""
    rows, eval_s = [], 0.0
    for arch in archs:
        ref, ref_bn = load(f"{out}/{arch}_random_knn.json"), load(f"{out}/{arch}_random_bn_knn.json")
        eval_s += ref["seconds"] + ref_bn["seconds"]
        for recipe in RECIPES:
            run = f"{runs}/{arch}_{recipe}"
            summary, knn, linear = load(f"{run}/summary.json"), load(f"{run}/knn.json"), load(f"{run}/linear.json")
            diag = knn["diagnostics"]
            eval_s += knn["seconds"] + linear["seconds"]
            pretext = [r["epoch_acc"] for r in read_log(run) if "epoch_acc" in r]  # the health signal: must rise
            rows.append({"arch": arch, "recipe": recipe, "backbone_params": summary["backbone_params"],
                         "epochs": summary["epochs"], "knn200_random": knn200(ref),
                         "knn200_random_bn": knn200(ref_bn), "knn200": knn200(knn),
                         "knn200_gain": knn200(knn) - knn200(ref), "pretext_first": pretext[0],
                         "pretext_last": pretext[-1], "instance_acc": diag["instance_accuracy"],
                         "linear_top1": linear["best_top1"],
                         "linear_protocol": linear["protocol"], "alignment": diag["alignment_original_view"],
                         "uniformity": diag["uniformity_original"], "images_per_s": summary["images_per_s"],
                         "pretrain_min": summary["wall_s"] / 60, "device": summary["device"]})
    return rows, eval_s, diag


def markdown(preset, rows, eval_s, seconds, diag):
    pretrain_s = sum(r["pretrain_min"] * 60 for r in rows)
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
               else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores")
    lines = [f"# run_all.sh {preset}: results", "",
             f"Machine: {machine}; torch {torch.__version__}. Time, summed over the stages (resumed runs included): "
             f"{(pretrain_s + eval_s) / 60:.1f} min = pretraining {pretrain_s / 60:.1f} + evaluation "
             f"{eval_s / 60:.1f}; this invocation of run_all.sh: {seconds / 60:.1f} min.",
             f"kNN: weighted, k=200, T 0.1, backbone features; random init = the same network untrained (gain: "
             f"learned minus this); random, BN of data = untrained, its BN statistics set to the training images'. "
             f"Pretext acc: how often the positive key beats all K queue entries, mean over the first and the last "
             f"epoch (chance 100/(K+1) %); while the lr is high it is inflated by the queue's stale keys, so read it "
             f"with instance acc: the trained network, frozen, ranks each image's own {diag['aug']} view above the "
             f"originals of the {diag['n_images'] - 1} other images of a fixed set (as ssl-small; alignment "
             f"original-view and uniformity of the originals on the same set). Linear: {rows[0]['linear_protocol']}.",
             "", "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['recipe']} | {r['backbone_params'] / 1e6:.2f}M | {r['epochs']:g} | "
                     f"{r['pretext_first']:.1f} -> {r['pretext_last']:.1f} | {r['instance_acc']:.1f} | "
                     f"{r['knn200_random']:.2f} | {r['knn200_random_bn']:.2f} | {r['knn200']:.2f} | "
                     f"{r['knn200_gain']:+.2f} | {r['linear_top1']:.2f} | {r['alignment']:.3f} | "
                     f"{r['uniformity']:.3f} | {r['images_per_s']:.0f} | {r['pretrain_min']:.1f} |")
    return "\n".join(lines) + "\n"


def figure(rows, runs, archs, path):
    """kNN per network and recipe against random init, and the health curves; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4))
    for i, recipe in enumerate(RECIPES):
        sel = [r for r in rows if r["recipe"] == recipe]
        ax1.bar([j + 0.4 * i for j in range(len(sel))], [r["knn200"] for r in sel], 0.4, label=recipe)
    ax1.scatter(range(len(archs)), [r["knn200_random"] for r in rows[::2]], color="k", marker="_", s=400,
                label="random init", zorder=3)
    ax1.set_xticks([j + 0.2 for j in range(len(archs))], archs, rotation=20)
    ax1.set_ylabel("kNN top-1 (%)")
    ax1.legend()
    for r in rows:  # the health curves: pretext accuracy per epoch, and the kNN monitor
        log = read_log(f"{runs}/{r['arch']}_{r['recipe']}")
        style = dict(label=f"{r['arch']} {r['recipe']}", ls="-" if r["recipe"] == "small" else "--")
        for ax, key in ((ax2, "epoch_acc"), (ax3, "knn_top1")):
            points = [(x["epoch"], x[key]) for x in log if key in x]
            if points:  # the imagenet preset runs no kNN monitor
                ax.plot(*zip(*points), marker=".", **style)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("pretext accuracy, epoch mean (%)")
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("kNN monitor top-1 (%)")
    ax3.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    preset, runs, out, seconds, *archs = sys.argv[1:] if argv is None else argv
    rows, eval_s, diag = collect(runs, out, archs)
    with open(f"{out}/results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(preset, rows, eval_s, int(seconds), diag)
    with open(f"{out}/RESULTS.md", "w") as f:
        f.write(table)
    print(table, end="")
    if figure(rows, runs, archs, f"{out}/results.png"):
        print(f"figure: {out}/results.png")


if __name__ == "__main__":
    main()
