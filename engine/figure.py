"""The study's figures, as SVG: no plotting package needed. results.svg: top, kNN of every run, a dot per seed with
the mean +- sd, beside the network untrained and raw pixels, and the small-model recipe minus the baseline paired by
seed with the 95% interval of its mean; bottom, the health curves, pretext accuracy and the kNN monitor per epoch.
budget.svg (a study set beside the same runs at a shorter budget): kNN against epochs."""
import math
import statistics

from engine.presets import RECIPES
from engine.report import epochs_of, load, read_log, recipe_effect
from engine.stats import confidence

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def nice_ticks(low, high, count=6):
    """Round tick values inside [low, high], about `count` of them: steps of 1, 2, 2.5 or 5 times a power of ten."""
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


class Panel:
    """A plot area of an SVG: data coordinates to pixels, axes with round ticks, and the shapes drawn in it."""

    def __init__(self, left, top, width, height, xlim, ylim, title, ylabel):
        self.box, self.xlim, self.ylim, self.parts = (left, top, width, height), xlim, ylim, []
        self.parts += [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#444"/>',
                       f'<text x="{left + width / 2}" y="{top - 8}" text-anchor="middle" font-size="13">{title}</text>',
                       f'<text transform="translate({left - 40},{top + height / 2}) rotate(-90)" '
                       f'text-anchor="middle">{ylabel}</text>']
        for v in nice_ticks(*ylim):
            y = self.y(v)
            self.parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#444"/>'
                              f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" stroke="#eee"/>'
                              f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')

    def xticks(self, values, label):
        left, top, width, height = self.box
        for v in values:
            x = self.x(v)
            self.parts.append(f'<line x1="{x:.1f}" y1="{top + height}" x2="{x:.1f}" y2="{top + height + 4}" '
                              f'stroke="#444"/><text x="{x:.1f}" y="{top + height + 16}" text-anchor="middle">{v:g}'
                              f'</text>')
        self.parts.append(f'<text x="{left + width / 2}" y="{top + height + 32}" text-anchor="middle">{label}</text>')

    def x(self, v):
        left, _, width, _ = self.box
        return left + width * (v - self.xlim[0]) / (self.xlim[1] - self.xlim[0])

    def y(self, v):
        _, top, _, height = self.box
        return top + height * (1 - (v - self.ylim[0]) / (self.ylim[1] - self.ylim[0]))

    def line(self, points, colour, dashed=False, width=1.5, opacity=1.0):
        path = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in points)
        self.parts.append(svg_line(path, colour, dashed, width, opacity))

    def dots(self, points, colour, opacity=1.0):
        for a, b in points:
            self.parts.append(f'<circle cx="{self.x(a):.1f}" cy="{self.y(b):.1f}" r="2" fill="{colour}" '
                              f'fill-opacity="{opacity}"/>')


def svg_line(path, colour, dashed=False, width=1.5, opacity=1.0):
    dash = ' stroke-dasharray="5,3"' if dashed else ""
    return (f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="{width}" '
            f'stroke-opacity="{opacity}"{dash}/>')


def limits(values, pad=0.05):
    low, high = min(values), max(values)
    margin = (high - low) * pad or 1
    return low - margin, high + margin


def legend(x, y, entries):
    """Legend rows at (x, y): each a (mark, text) pair, mark being SVG drawn in a 24 x 12 box at the origin."""
    parts = []
    for i, (mark, text) in enumerate(entries):
        parts.append(f'<g transform="translate({x},{y + 16 * i})">{mark}<text x="30" y="10">{text}</text></g>')
    return parts


def figure(res, path):
    """results.svg, two rows. Top: kNN of every run, a dot per seed with the mean +- sd, beside the network untrained
    (random init) and raw pixels (dashed) -- points, not bars, so the axis may start where the data do without a
    bar's length misleading; and the small-model recipe minus the baseline paired by seed, against 0, with the 95%
    confidence interval of its mean. Bottom: pretext accuracy and the kNN monitor per epoch, one line per run."""
    several = any(len(s) > 1 for s in res.seeds.values())
    panels = [knn_panel(res), effect_panel(res)] + curve_panels(res)
    lines = legend(70, 360, [
        ('<circle cx="4" cy="6" r="3" fill="#777" fill-opacity="0.8" stroke="#777"/><circle cx="12" cy="6" r="3" '
         'fill="#1f77b4" fill-opacity="0.35" stroke="#1f77b4"/><circle cx="20" cy="6" r="3" fill="#1f77b4" '
         'fill-opacity="0.95" stroke="#1f77b4"/>', "per network: random init (grey), baseline (light), small-model "
                                                  "recipe (dark); a dot per seed"),
        (WHISKER, "mean ± sd over seeds" if several else "mean (one seed: no spread)"),
        (svg_line("0,6 24,6", "#444", dashed=True), f"raw pixels ({res.refs['pixels']:.2f})")])
    lines += legend(620, 360, [
        ('<circle cx="12" cy="6" r="3" fill="#555" stroke="#555"/>', "one seed: small minus the baseline of that seed"),
        (WHISKER, "mean, 95% confidence interval (paired t)"),
        ("", "an interval across 0: within the seed spread")])
    lines += legend(70, 790, [(svg_line("0,6 24,6", "#555"), "small-model recipe"),
                              (svg_line("0,6 24,6", "#555", dashed=True), "baseline"),
                              ("", "one line per run" + ("; seed 0 dark, the other seeds light" if several else ""))])
    lines += legend(620, 790, [(svg_line("0,6 24,6", COLOURS[i % 8], width=3), arch)
                               for i, arch in enumerate(res.archs)])
    body = "\n".join(part for p in panels for part in p.parts) + "\n" + "\n".join(lines)
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="1000" height="880" font-family="sans-serif" '
                f'font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


WHISKER = svg_line("6,6 18,6", "black", width=2.5) + svg_line("12,0 12,12", "black", width=1.2)  # its legend mark


def whisker(panel, x, values, half):
    """A mean (a short bar) and a vertical line over +- half around it, at data x."""
    mean = statistics.mean(values)
    panel.line([(x - 0.09, mean), (x + 0.09, mean)], "black", width=2.5)
    if half is not None:
        panel.line([(x, mean - half), (x, mean + half)], "black", width=1.2)


def seed_dots(panel, x, values, colour, opacity):
    for n, v in enumerate(values):
        panel.parts.append(f'<circle cx="{panel.x(x + 0.035 * (n - (len(values) - 1) / 2)):.1f}" '
                           f'cy="{panel.y(v):.1f}" r="3" fill="{colour}" fill-opacity="{opacity}" stroke="{colour}"/>')


def network_labels(panel, archs):
    for i, arch in enumerate(archs):
        x, y = panel.x(i + 0.5), panel.y(panel.ylim[0]) + 12
        panel.parts.append(f'<text transform="translate({x:.1f},{y:.1f}) rotate(-20)" text-anchor="end" '
                           f'font-size="10">{arch}</text>')


def knn_panel(res):
    """kNN of every seed, per network: random init (grey), baseline (light), small recipe (dark); raw pixels."""
    archs, refs = res.archs, res.refs
    columns = {a: [("#777", 0.8, [refs[a, s][0] for s in res.seeds[a]])] +
               [(COLOURS[i % 8], 0.35 if rc == "baseline" else 0.95, [r["knn"] for r in res.sel(a, rc)])
                for rc in RECIPES] for i, a in enumerate(archs)}
    values = [refs["pixels"]] + [v for cols in columns.values() for *_, vs in cols for v in vs]
    panel = Panel(70, 40, 460, 250, (0, len(archs)), limits(values, 0.12),
                  f"kNN top-1 (%), k {res.rows[0]['knn_k']}: every seed, mean ± sd", "kNN top-1 (%)")
    for i, arch in enumerate(archs):
        for j, (colour, opacity, vs) in enumerate(columns[arch]):
            seed_dots(panel, i + 0.2 + 0.3 * j, vs, colour, opacity)
            whisker(panel, i + 0.2 + 0.3 * j, vs, statistics.stdev(vs) if len(vs) > 1 else None)
    panel.line([(0, refs["pixels"]), (len(archs), refs["pixels"])], "#444", dashed=True)
    network_labels(panel, archs)
    return panel


def effect_panel(res):
    """The small-model recipe minus the baseline of the same seed, against 0, with its mean's 95% interval."""
    archs = res.archs
    effects = {a: recipe_effect(res.rows, a, "knn") for a in archs}
    ends = [0.0] + [v for d in effects.values() for v in d] + [
        statistics.mean(d) + sign * confidence(d) for d in effects.values() if len(d) > 1 for sign in (-1, 1)]
    panel = Panel(620, 40, 330, 250, (0, len(archs)), limits(ends, 0.12),
                  "small-model recipe minus baseline, kNN, by seed", "points")
    panel.line([(0, 0), (len(archs), 0)], "black", width=1)
    for i, arch in enumerate(archs):
        seed_dots(panel, i + 0.5, effects[arch], COLOURS[i % 8], 0.95)
        whisker(panel, i + 0.5, effects[arch], confidence(effects[arch]))
    network_labels(panel, archs)
    return panel


def curve_panels(res):
    """Pretext accuracy and the kNN monitor per epoch, one line per run (none where no run logged a monitor)."""
    curves = {}
    for r in res.rows:
        log = read_log(f"{res.study['out']}/{r['arch']}_{r['recipe']}_s{r['seed']}/log.jsonl")
        curves[r["arch"], r["recipe"], r["seed"]] = {key: [(x["epoch"], x[key]) for x in log if key in x]
                                                     for key in ("epoch_acc", "knn_top1")}
    panels = []
    for left, width, key, title in ((70, 460, "epoch_acc", "pretext accuracy, epoch mean (%)"),
                                    (620, 330, "knn_top1", "kNN monitor top-1 (%)")):
        points = [p for c in curves.values() for p in c[key]]
        if not points:  # the imagenet preset runs no kNN monitor
            continue
        panel = Panel(left, 490, width, 250, limits([p[0] for p in points], 0.02), limits([p[1] for p in points]),
                      title, "%")
        panel.xticks(sorted({p[0] for p in points}), "epoch")
        for (arch, recipe, seed), c in curves.items():
            if c[key]:
                colour, opacity = COLOURS[res.archs.index(arch) % 8], 1.0 if seed == 0 else 0.35
                panel.line(c[key], colour, dashed=recipe == "baseline", opacity=opacity)
                panel.dots(c[key], colour, opacity)
        panels.append(panel)
    return panels


def budget_figure(res, other, path):
    """budget.svg: per network, kNN against epochs for the runs of both budgets. Lines: each run's kNN monitor (its
    own bank and queries, pretrain.py's --knn-subset); points: each run's final kNN on the tables' bank and queries,
    at its last epoch, against raw pixels on the same (dashed). Solid: small-model recipe; dashed: baseline; the
    other budget's runs light."""
    panels, width = [], (1000 - 70 - 30 - 70 * (len(res.archs) - 1)) / len(res.archs)
    for i, arch in enumerate(res.archs):
        runs = [(r, 1.0) for r in res.rows if r["arch"] == arch] + [(r, 0.35) for r in other.rows
                                                                    if r["arch"] == arch]
        curves = [(r, opacity, [(x["epoch"], x["knn_top1"]) for x in read_log(
            f"{study['out']}/{r['arch']}_{r['recipe']}_s{r['seed']}/log.jsonl") if "knn_top1" in x])
            for (r, opacity), study in zip(runs, [res.study] * len(res.rows) + [other.study] * len(other.rows))]
        finals = [(r["epochs"], r["knn"]) for r, _ in runs]
        values = [v for *_, c in curves for _, v in c] + [v for _, v in finals] + [res.refs["pixels"]]
        epochs = [e for *_, c in curves for e, _ in c] + [e for e, _ in finals]
        panel = Panel(70 + i * (width + 70), 40, width, 300, (0, max(epochs) * 1.03), limits(values, 0.06), arch,
                      "kNN top-1 (%)")
        panel.xticks(sorted({e for e, _ in finals} | {0}), "epoch")
        panel.line([(0, res.refs["pixels"]), (max(epochs) * 1.03, res.refs["pixels"])], "#444", dashed=True)
        colour = COLOURS[i % 8]
        for r, opacity, curve in curves:
            if curve:
                panel.line(curve, colour, dashed=r["recipe"] == "baseline", opacity=opacity)
        for r, opacity in runs:
            fill = colour if r["recipe"] == "small" else "white"
            panel.parts.append(f'<circle cx="{panel.x(r["epochs"]):.1f}" cy="{panel.y(r["knn"]):.1f}" r="3.5" '
                               f'fill="{fill}" fill-opacity="{opacity}" stroke="{colour}" stroke-opacity="{opacity}"/>')
        panels.append(panel)
    lines = legend(70, 400, [
        (svg_line("0,6 24,6", "#555"), f"small-model recipe: its kNN monitor per epoch ({monitor_bank(res, other)})"),
        (svg_line("0,6 24,6", "#555", dashed=True), "baseline: the same"),
        ('<circle cx="6" cy="6" r="3.5" fill="#555" stroke="#555"/><circle cx="18" cy="6" r="3.5" fill="white" '
         'stroke="#555"/>', "the final kNN of each run (small filled, baseline hollow) on the tables' bank and test "
                            "images"),
        (svg_line("0,6 24,6", "#444", dashed=True), f"raw pixels on the same ({res.refs['pixels']:.2f})"),
        ("", f"dark: {epochs_of(res):g} epochs (this study); light: {epochs_of(other):g} epochs, the same seeds")])
    body = "\n".join(part for p in panels for part in p.parts) + "\n" + "\n".join(lines)
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="1000" height="500" font-family="sans-serif" '
                f'font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def monitor_bank(res, other):
    """The kNN monitor's bank and queries in words (pretrain.py's --knn-subset, from every run's summary.json), and
    whether the two studies' differ, which would make their curves incomparable."""
    subsets = {study["out"]: {load(f"{study['out']}/{r['arch']}_{r['recipe']}_s{r['seed']}/summary.json")["args"].get(
        "knn_subset") for r in rows} for study, rows in ((res.study, res.rows), (other.study, other.rows))}
    mine, theirs = (", ".join(sorted(str(v or "all") for v in s)) for s in subsets.values())
    return (f"{mine} images of bank and queries" if mine == theirs else
            f"NOT comparable: {mine} images of bank and queries here, {theirs} there")
