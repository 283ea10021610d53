"""The study's results, from the files run_all.sh's jobs wrote under OUT_DIR: RESULTS.md (tables to paste into a
paper), results.csv (one row per network, recipe and seed) and results.svg (kNN per network and recipe with every
seed against the references, and the health curves: pretext accuracy and the kNN monitor per epoch).

    python3 report.py PRESET OUT_DIR SECONDS --archs ARCH [ARCH ...] --seeds N [--seeds-archs ARCH ...]
        [--invocation TEXT]

Every figure over seeds is mean +- sd (sample standard deviation, n - 1) and n. Comparisons are paired by seed: a
learned network against its own seed's random init, the small-model recipe against the baseline of the same seed;
a paired difference counts as beyond the seed spread when a two-sided paired t-test rejects "no difference" at 5%.
run_all.sh runs it last; SECONDS is how long that invocation of run_all.sh took.
"""
import argparse
import csv
import json
import math
import os
import platform
import statistics

import torch

RECIPES = ("baseline", "small")
# two-sided 5% critical values of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
T_CRITICAL = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
              2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
              2.045, 2.042)


def load(path):
    with open(path) as f:
        return json.load(f)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def knn200(results):
    return next(x["top1"] for x in results["knn"] if x["k"] == 200)


def collect(out, archs, seeds):
    """(rows, references, evaluation seconds): one row per network, recipe and seed; the references per network
    and seed, and the raw pixels' under the key "pixels"."""
    pixels = load(f"{out}/pixels/knn.json")
    refs, rows, eval_s = {"pixels": knn200(pixels)}, [], pixels["seconds"]
    for seed in sorted({s for arch in archs for s in seeds[arch]}):
        for arch in [a for a in archs if seed in seeds[a]]:
            ref, ref_bn = (load(f"{out}/{arch}_random_s{seed}/{name}.json") for name in ("knn", "knn_bn"))
            refs[arch, seed] = knn200(ref), knn200(ref_bn)
            eval_s += ref["seconds"] + ref_bn["seconds"]
            for recipe in RECIPES:
                run = f"{out}/{arch}_{recipe}_s{seed}"
                summary, knn, linear = load(f"{run}/summary.json"), load(f"{run}/knn.json"), load(f"{run}/linear.json")
                eval_s += knn["seconds"] + linear["seconds"]
                diag = knn["diagnostics"]
                pretext = [r["epoch_acc"] for r in read_log(f"{run}/log.jsonl") if "epoch_acc" in r]
                rows.append({"arch": arch, "recipe": recipe, "seed": seed,
                             "backbone_params": summary["backbone_params"], "epochs": summary["epochs"],
                             "steps": summary["steps"], "pretext_first": pretext[0], "pretext_last": pretext[-1],
                             "instance_acc": diag["instance_accuracy"], "knn200": knn200(knn),
                             "knn200_random": refs[arch, seed][0], "knn200_random_bn": refs[arch, seed][1],
                             "knn200_pixels": refs["pixels"], "knn200_gain": knn200(knn) - refs[arch, seed][0],
                             "linear_top1": linear["best_top1"], "linear_protocol": linear["protocol"],
                             "alignment": diag["alignment_original_view"], "uniformity": diag["uniformity_original"],
                             "images_per_s": summary["images_per_s"], "pretrain_min": summary["wall_s"] / 60,
                             "device": summary["device"], "ckpt_sha256": knn["ckpt_sha256"]})
    return rows, refs, eval_s, pixels


def spread(values, digits=2):
    """'mean +- sd' of the values (sd with n - 1); the value itself for one."""
    text = f"{statistics.mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {statistics.stdev(values):.{digits}f}"


def paired(diffs):
    """(t statistic, beyond the seed spread?) of paired differences; (None, None) for fewer than two."""
    if len(diffs) < 2:
        return None, None
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    t = mean / (sd / math.sqrt(len(diffs))) if sd else math.copysign(math.inf, mean) if mean else 0.0
    critical = T_CRITICAL[len(diffs) - 2] if len(diffs) - 1 <= len(T_CRITICAL) else 1.96
    return t, abs(t) > critical


def markdown(preset, rows, refs, eval_s, seconds, invocation, archs, seeds, pixels):
    def sel(arch, recipe):
        return [r for r in rows if r["arch"] == arch and r["recipe"] == recipe]

    pretrain_s = sum(r["pretrain_min"] * 60 for r in rows)
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
               else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores")
    counts = sorted({len(s) for s in seeds.values()})
    seeded = ", ".join(f"{a} {len(seeds[a])}" for a in archs) if len(counts) > 1 else f"{counts[0]} each"
    lines = [f"# run_all.sh {preset}: results", "",
             f"`{invocation}`: {len(archs)} networks x 2 recipes; seeds per network: {seeded}. "
             f"Machine: {machine}; torch {torch.__version__}. This invocation took {seconds / 60:.1f} min; the "
             f"stages' own times sum to {(pretrain_s + eval_s) / 60:.1f} min (pretraining {pretrain_s / 60:.1f}, "
             f"evaluation {eval_s / 60:.1f}; resumed runs included).", "",
             f"Figures over seeds are mean ± sd (n = the network's seeds; one seed: the value alone). kNN: weighted, "
             f"k 200, T 0.1, on the backbone's pooled features, bank and queries as each run's knn.json says. "
             f"References under the same protocol: random init = the same network untrained (its seed's "
             f"initialisation); random, BN of data = the same, its BN statistics set to the training images'; raw "
             f"pixels = the normalised images themselves ({refs['pixels']:.2f}). Gain = learned minus its own seed's "
             f"random init. Pretext acc: how often the positive key beats all K queue entries, mean over the first "
             f"and the last epoch; while the lr is high it is inflated by the queue's stale keys, so read it with "
             f"instance acc: the trained network, frozen, ranks each image's own {pixels['diagnostics']['aug']} view "
             f"above the originals of the {pixels['diagnostics']['n_images'] - 1} other images of a fixed set (as "
             f"ssl-small; raw pixels: {pixels['diagnostics']['instance_accuracy']:.1f}). Linear: "
             f"{rows[0]['linear_protocol']}.", "",
             "## References", "",
             "| network | params | seeds | kNN random init | kNN random, BN of data | kNN raw pixels |",
             "|---|---|---|---|---|---|"]
    for arch in archs:
        lines.append(f"| {arch} | {sel(arch, 'small')[0]['backbone_params'] / 1e6:.2f}M | {len(seeds[arch])} | "
                     f"{spread([refs[arch, s][0] for s in seeds[arch]])} | "
                     f"{spread([refs[arch, s][1] for s in seeds[arch]])} | {refs['pixels']:.2f} |")
    columns = ["network", "recipe", "seeds", "epochs", "pretext acc first -> last", "instance acc", "kNN learned",
               "gain over random init", "minus raw pixels", "linear top-1", "alignment", "uniformity", "img/s",
               "pretrain min"]
    lines += ["", "## Pretrained networks", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for arch in archs:
        for recipe in RECIPES:
            rs = sel(arch, recipe)
            col = {k: [r[k] for r in rs] for k in rs[0] if isinstance(rs[0][k], (int, float))}
            lines.append(f"| {arch} | {recipe} | {len(rs)} | {rs[0]['epochs']:g} | "
                         f"{spread(col['pretext_first'], 1)} -> {spread(col['pretext_last'], 1)} | "
                         f"{spread(col['instance_acc'], 1)} | "
                         f"{spread(col['knn200'])} | {spread(col['knn200_gain'])} | "
                         f"{spread([v - refs['pixels'] for v in col['knn200']])} | {spread(col['linear_top1'])} | "
                         f"{spread(col['alignment'], 3)} | {spread(col['uniformity'], 3)} | "
                         f"{spread(col['images_per_s'], 0)} | {spread(col['pretrain_min'], 1)} |")
    lines += ["", "## Small-model recipe minus baseline, paired by seed", "",
              "| network | kNN, per seed | kNN mean ± sd | paired t | beyond the seed spread | linear, per seed | "
              "linear mean ± sd |", "|---|---|---|---|---|---|---|"]
    for arch in archs:
        base, small = sel(arch, "baseline"), sel(arch, "small")
        knn = [s["knn200"] - b["knn200"] for b, s in zip(base, small)]
        linear = [s["linear_top1"] - b["linear_top1"] for b, s in zip(base, small)]
        t, beyond = paired(knn)
        lines.append(f"| {arch} | {' / '.join(f'{d:+.2f}' for d in knn)} | {spread(knn)} | "
                     f"{'-' if t is None else f'{t:+.1f}'} | "
                     f"{'one seed: not measured' if beyond is None else 'yes' if beyond else 'no'} | "
                     f"{' / '.join(f'{d:+.2f}' for d in linear)} | {spread(linear)} |")
    return "\n".join(lines) + "\n"


# ----- the figure, as SVG: no plotting package needed ------------------------------------------------------------

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


class Panel:
    """A plot area of an SVG: data coordinates to pixels, axes with ticks, and the shapes drawn in it."""

    def __init__(self, left, top, width, height, xlim, ylim, title, xlabel, ylabel):
        self.box, self.xlim, self.ylim, self.parts = (left, top, width, height), xlim, ylim, []
        ticks = [ylim[0] + i * (ylim[1] - ylim[0]) / 5 for i in range(6)]
        self.parts += [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#444"/>',
                       f'<text x="{left + width / 2}" y="{top - 8}" text-anchor="middle" font-size="13">{title}</text>',
                       f'<text x="{left + width / 2}" y="{top + height + 34}" text-anchor="middle">{xlabel}</text>',
                       f'<text transform="translate({left - 42},{top + height / 2}) rotate(-90)" '
                       f'text-anchor="middle">{ylabel}</text>']
        for v in ticks:
            y = self.y(v)
            self.parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#444"/>'
                              f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.3g}</text>')

    def xticks(self, values):
        _, top, _, height = self.box
        for v in values:
            x = self.x(v)
            self.parts.append(f'<line x1="{x:.1f}" y1="{top + height}" x2="{x:.1f}" y2="{top + height + 4}" '
                              f'stroke="#444"/><text x="{x:.1f}" y="{top + height + 16}" text-anchor="middle">{v:g}'
                              f'</text>')

    def x(self, v):
        left, _, width, _ = self.box
        return left + width * (v - self.xlim[0]) / (self.xlim[1] - self.xlim[0])

    def y(self, v):
        _, top, _, height = self.box
        return top + height * (1 - (v - self.ylim[0]) / (self.ylim[1] - self.ylim[0]))

    def line(self, points, colour, dashed=False, width=1.5, opacity=1.0):
        path = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in points)
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        self.parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="{width}" '
                          f'stroke-opacity="{opacity}"{dash}/>')

    def dots(self, points, colour, opacity=1.0):
        for a, b in points:
            self.parts.append(f'<circle cx="{self.x(a):.1f}" cy="{self.y(b):.1f}" r="2" fill="{colour}" '
                              f'fill-opacity="{opacity}"/>')


def limits(values, pad=0.05):
    low, high = min(values), max(values)
    margin = (high - low) * pad or 1
    return low - margin, high + margin


def figure(rows, refs, out, archs, seeds, path):
    """results.svg: kNN per network and recipe (bars: mean; dots: seeds) against random init (black tick: mean) and
    raw pixels (dashed line); pretext accuracy and the kNN monitor per epoch for every run."""
    curves = {}
    for r in rows:
        log = read_log(f"{out}/{r['arch']}_{r['recipe']}_s{r['seed']}/log.jsonl")
        curves[r["arch"], r["recipe"], r["seed"]] = {key: [(x["epoch"], x[key]) for x in log if key in x]
                                                     for key in ("epoch_acc", "knn_top1")}
    values = [r["knn200"] for r in rows] + [refs[a, s][0] for a in archs for s in seeds[a]] + [refs["pixels"]]
    bars = Panel(60, 30, 420, 260, (0, len(archs)), limits(values, 0.15), "kNN top-1 (%), k 200",
                 "dark: small recipe; light: baseline; black: random init; dashed: raw pixels", "kNN top-1 (%)")
    for i, arch in enumerate(archs):
        for j, recipe in enumerate(RECIPES):
            knn = [r["knn200"] for r in rows if r["arch"] == arch and r["recipe"] == recipe]
            x0, top, base = bars.x(i + 0.12 + 0.38 * j), bars.y(statistics.mean(knn)), bars.y(bars.ylim[0])
            bars.parts.append(f'<rect x="{x0:.1f}" y="{top:.1f}" width="{bars.x(0.36) - bars.x(0):.1f}" '
                              f'height="{base - top:.1f}" fill="{COLOURS[i % 8]}" '
                              f'fill-opacity="{0.9 if recipe == "small" else 0.35}"/>')
            for v in knn:
                bars.parts.append(f'<circle cx="{x0 + (bars.x(0.18) - bars.x(0)):.1f}" cy="{bars.y(v):.1f}" r="2.5" '
                                  f'fill="black"/>')
        mean_ref = statistics.mean(refs[arch, s][0] for s in seeds[arch])
        bars.line([(i + 0.06, mean_ref), (i + 0.94, mean_ref)], "black", width=2.5)
        bars.parts.append(f'<text x="{bars.x(i + 0.5):.1f}" y="{bars.y(bars.ylim[0]) + 14:.1f}" '
                          f'text-anchor="middle" font-size="9">{arch}</text>')
    bars.line([(0, refs["pixels"]), (len(archs), refs["pixels"])], "#444", dashed=True)
    panels = [bars]
    for left, key, title in ((560, "epoch_acc", "pretext accuracy, epoch mean (%)"),
                             (1000, "knn_top1", "kNN monitor top-1 (%)")):
        points = [p for c in curves.values() for p in c[key]]
        if not points:  # the imagenet preset runs no kNN monitor
            continue
        panel = Panel(left, 30, 380, 260, limits([p[0] for p in points], 0.02), limits([p[1] for p in points]),
                      title, "epoch (solid: small-model recipe; dashed: baseline)", "%")
        panel.xticks(sorted({p[0] for p in points}))
        for (arch, recipe, seed), c in curves.items():
            if c[key]:
                colour, opacity = COLOURS[archs.index(arch) % 8], 1.0 if seed == 0 else 0.45
                panel.line(c[key], colour, dashed=recipe == "baseline", opacity=opacity)
                panel.dots(c[key], colour, opacity)
        panels.append(panel)
    legend = [f'<text x="{560 + 150 * i}" y="368" fill="{COLOURS[i % 8]}" font-size="12">{arch}</text>'
              for i, arch in enumerate(archs)]
    body = "\n".join(part for p in panels for part in p.parts) + "\n" + "\n".join(legend)
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="1420" height="380" font-family="sans-serif" '
                f'font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    p.add_argument("out", help="results/<preset>: the folder the study's jobs wrote")
    p.add_argument("seconds", type=int, help="how long the invocation of run_all.sh took")
    p.add_argument("--archs", nargs="+", required=True)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1")
    p.add_argument("--seeds-archs", nargs="*", help="the networks with every seed (default: all); the others: 0")
    p.add_argument("--invocation", default="bash run_all.sh", help="the command the table comes from")
    args = p.parse_args(argv)
    seeds = {arch: list(range(args.seeds)) if arch in (args.seeds_archs or args.archs) else [0] for arch in args.archs}
    rows, refs, eval_s, pixels = collect(args.out, args.archs, seeds)
    with open(f"{args.out}/results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(args.preset, rows, refs, eval_s, args.seconds, args.invocation, args.archs, seeds, pixels)
    with open(f"{args.out}/RESULTS.md", "w") as f:
        f.write(table)
    print(table, end="")
    figure(rows, refs, args.out, args.archs, seeds, f"{args.out}/results.svg")
    print(f"figure: {args.out}/results.svg")


if __name__ == "__main__":
    main()
