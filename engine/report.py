"""A study's tables: RESULTS.md (tables to paste into a paper, and the tables in words) and results.csv (one row
per network, recipe and seed), from the files its jobs wrote under results/PRESET and its study.json; the figure is
engine/figure.py's, the statistics engine/stats.py's. report.py (the command) decides which runs are today's.

Every figure over seeds is mean +- sd (sample standard deviation, n - 1) and n. Comparisons are paired by seed: a
learned network against its own seed's random init, the small-model recipe against the baseline of the same seed.
Raw pixels are one number: runs are compared with it by a one-sample t. Over all networks, a sign test counts the seed
pairs that favour each recipe. OUT/notes.json, where there is one, holds sentences written by hand after looking.
"""
import collections
import csv
import json
import math
import os
import statistics

from engine.presets import RECIPES
from engine.stats import interval, paired, sign_test, spread
from evaluation import STALE_BN, git


def load(path):
    with open(path) as f:
        return json.load(f)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def knn_top1(results):
    """The top-1 of the largest k evaluated (run_all.sh asks for 20 and 200; a bank smaller than 200 gives its size,
    which the results file records)."""
    return results["knn"][-1]["top1"]


def linear_top1(results):
    """The linear result: the last epoch's top-1, never the epoch picked on the test set (files written before the
    key "top1" existed call it "last_top1")."""
    return results["top1"] if "top1" in results else results["last_top1"]


def stale_bn(results):
    """The fraction of initial values still in the BN statistics an evaluation used; 0 with precise BN."""
    return 0.0 if results.get("precise_bn") else results.get("bn_initial_fraction") or 0.0


class Results:
    """What a study's files say, for the tables: one row per network, recipe and seed (rows); the references per
    network and seed and the raw pixels' under "pixels" (refs); the seconds of every evaluation (eval_s); the raw
    pixels' knn.json and a linear.json (their protocols); every pretraining's and evaluation's results file (made:
    their machine records); the study.json record with its notes and missing jobs (study); the seeds of each network
    (seeds) and the networks tabled (archs)."""

    def __init__(self, study, seeds):
        self.study, self.seeds, self.archs = study, seeds, study["archs"]
        out = study["out"]
        self.pixels = load(f"{out}/pixels/knn.json")
        self.refs, self.rows, self.eval_s = {"pixels": knn_top1(self.pixels)}, [], self.pixels["seconds"]
        self.made = {"pretraining": [], "evaluation": [self.pixels]}
        for seed in sorted({s for arch in self.archs for s in seeds[arch]}):
            for arch in [a for a in self.archs if seed in seeds[a]]:
                ref, ref_bn = (load(f"{out}/{arch}_random_s{seed}/{name}.json") for name in ("knn", "knn_bn"))
                self.refs[arch, seed] = knn_top1(ref), knn_top1(ref_bn)
                self.eval_s += ref["seconds"] + ref_bn["seconds"]
                self.made["evaluation"] += [ref, ref_bn]
                for recipe in RECIPES:
                    self.rows.append(self.row(f"{out}/{arch}_{recipe}_s{seed}", arch, recipe, seed))

    def row(self, run, arch, recipe, seed):
        summary, knn, linear = load(f"{run}/summary.json"), load(f"{run}/knn.json"), load(f"{run}/linear.json")
        self.eval_s += knn["seconds"] + linear["seconds"]
        self.made["pretraining"].append(summary)
        self.made["evaluation"] += [knn, linear]
        self.linear = linear
        diag = knn["diagnostics"]
        log = read_log(f"{run}/log.jsonl")
        pretext = [r["epoch_acc"] for r in log if "epoch_acc" in r]
        emb_std = [r["emb_std"] for r in log if "emb_std" in r]
        random, random_bn = self.refs[arch, seed]
        return {"arch": arch, "recipe": recipe, "seed": seed, "backbone_params": summary["backbone_params"],
                "epochs": summary["epochs"], "steps": summary["steps"], "pretext_first": pretext[0],
                "pretext_last": pretext[-1], "emb_std": emb_std[-1] if emb_std else None,
                "collapsed_at_step": summary.get("collapsed_at_step"), "instance_acc": diag["instance_accuracy"],
                "knn_k": knn["knn"][-1]["k"], "knn": knn_top1(knn), "knn_random": random, "knn_random_bn": random_bn,
                "knn_pixels": self.refs["pixels"], "knn_gain": knn_top1(knn) - random,
                "precise_bn": bool(knn.get("precise_bn")), "stale_bn": stale_bn(knn),
                "linear_top1": linear_top1(linear), "linear_protocol": linear["protocol"],
                "alignment": diag["alignment_original_view"], "uniformity": diag["uniformity_original"],
                "images_per_s": summary["images_per_s"], "pretrain_min": summary["wall_s"] / 60,
                "device": summary["device"], "machine": machine_name(summary), "ckpt_sha256": knn["ckpt_sha256"]}

    def sel(self, arch, recipe):
        return [r for r in self.rows if r["arch"] == arch and r["recipe"] == recipe]


def slices_section(study):
    """Markdown: each slice of the study (an invocation of run_all.sh / study.py) with its machine, the jobs it
    finished and its predicted and actual wall time; the jobs still missing."""
    lines = []
    if study.get("slices"):
        lines += ["", "## How the study ran", "",
                  "| slice | invocation | machine | jobs at once | jobs finished | predicted for all jobs left at its "
                  "start | took |",
                  "|---|---|---|---|---|---|---|"]
        for i, sl in enumerate(study["slices"], 1):
            m = sl.get("machine") or {}
            where = machine_words(m, bool(m.get("gpus")), threads=False)
            took = minutes(sl.get("seconds")) if sl.get("closed", True) else (
                f"at least {minutes(sl.get('seconds'))}, to its last job's end: its record was not closed (the slice "
                f"was killed, or is still running)")
            lines.append(f"| {i} | `{sl['invocation']}` | {where} | {sl.get('jobs')} | {len(sl.get('finished', []))} "
                         f"| {minutes(sl.get('predicted_s'))} | {took} |")
    if study.get("missing"):
        lines += ["", f"Not in the tables: not finished, or made with other flags than today's preset (the same "
                      f"command again runs them): {', '.join(study['missing'])}."]
    return lines


def minutes(seconds):
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def machine_name(results):
    """Where a results file says it was made (its "machine" record, evaluation.machine): the GPU's name and count
    for work on a GPU, else the CPU's model, its instruction sets of evaluation.CPU_FLAGS, the cores it could use
    and torch's threads; None for a file without a record (written before there was one)."""
    m = results.get("machine")
    return machine_words(m, results.get("device", "").startswith("cuda")) if m else None


def machine_words(m, on_gpu, threads=True):
    """A machine record in words: the GPU's name and count, or the CPU's model, its instruction sets of
    evaluation.CPU_FLAGS and the cores it could use (and torch's threads)."""
    if on_gpu:
        return f"{m['gpu']} x {m['gpus']}"
    used = f"{plural(m.get('cores'), 'core')} / {plural(m.get('threads'), 'thread')}" if threads else \
        f"{m.get('cores')} cores"
    return f"{m.get('cpu')} ({' '.join(m.get('cpu_flags', [])) or 'no AVX2'}, {used})"


# the code a result depends on: the method, the data, the evaluations (not the study's machinery or the report)
CODE = ("pretrain.py", "run_state.py", "models.py", "losses.py", "data.py", "evaluation.py", "knn_eval.py",
        "linear_eval.py")


def code_line(made):
    """A sentence on the code that made the results: the commits their machine records name, and for each whose
    training or evaluation code (CODE) differs from this checkout's, the files that differ; results made from a
    modified tree and results without a record are counted."""
    records = [r["machine"] for files in made.values() for r in files if r.get("machine")]
    commits = collections.Counter(m.get("commit") for m in records if m.get("commit"))
    head = git("rev-parse", "HEAD")
    parts = []
    for commit, count in sorted(commits.items(), key=lambda kv: -kv[1]):
        changed = None if commit == head else git("diff", "--name-only", commit, "HEAD", "--", *CODE)
        what = (f"{plural(count, 'file')} from commit {commit[:7]}" + (
            "" if commit == head or changed == "" else
            f", whose training or evaluation code differs from this checkout's ({', '.join(changed.split())})"
            if changed else ", a commit this checkout does not have"))
        parts.append(what)
    dirty = sum(1 for m in records if m.get("modified"))
    unrecorded = sum(1 for files in made.values() for r in files if not (r.get("machine") or {}).get("commit"))
    return ("Code: " + "; ".join(parts or ["no commit recorded"])
            + (f"; {plural(dirty, 'file')} made from a modified tree" if dirty else "")
            + (f"; {plural(unrecorded, 'file')} without a recorded commit" if unrecorded else "") + ".")


def machine_line(made):
    """The Machine line: for the pretrainings and for the evaluations, each machine their files name with how many
    were made on it (most first), those without a record counted as not recorded; the torch versions recorded. Never
    the machine that rebuilds the report."""
    def counted(files, unit):
        counts = collections.Counter(machine_name(r) for r in files)
        named = sorted(((n, c) for n, c in counts.items() if n), key=lambda nc: (-nc[1], nc[0]))
        return "; ".join([f"{plural(count, unit)} on {name}" for name, count in named]
                         + ([f"{plural(counts[None], unit)} not recorded"] if None in counts else []))

    versions = sorted({r["machine"]["torch"] for files in made.values() for r in files if r.get("machine")})
    return (f"Machine: pretraining, {counted(made['pretraining'], 'run')}. Evaluations, "
            f"{counted(made['evaluation'], 'file')}. Torch {', '.join(versions) or 'not recorded'}.")


def recipe_effect(rows, arch, key):
    """The small-model recipe minus the baseline of the same seed, per seed (in seed order), for one column."""
    base = {r["seed"]: r[key] for r in rows if r["arch"] == arch and r["recipe"] == "baseline"}
    return [r[key] - base[r["seed"]] for r in rows if r["arch"] == arch and r["recipe"] == "small"]


def per_seed(diffs):
    return " / ".join(f"{d:+.2f}" for d in diffs)


def t_cells(diffs):
    """Three table cells: the 95% interval of the mean difference, its t and whether it is beyond the seed spread."""
    t, beyond = paired(diffs)
    return ("- | - | one seed: not measured" if t is None else
            f"{interval(diffs)} | {t:+.1f} | {'yes' if beyond else 'no'}")


def group(pairs):
    """{"beyond up", "beyond down", "within", "one seed"}: 'name (+mean, t x)' for each (name, diffs) pair."""
    out = collections.defaultdict(list)
    for name, diffs in pairs:
        t, beyond = paired(diffs)
        mean = statistics.mean(diffs)
        key = "one seed" if t is None else ("beyond up" if mean > 0 else "beyond down") if beyond else "within"
        out[key].append(f"{name} ({mean:+.2f}" + ("" if t is None else f", 95% interval {interval(diffs)}, "
                                                            f"t {t:+.1f}") + ")")
    return out


def sentence(subject, g, up, down):
    """A finding in words from group(): what is beyond the seed spread either way, what is within, what has one seed."""
    parts = [f"{up} {', '.join(g['beyond up'])}" if g["beyond up"] else "",
             f"{down} {', '.join(g['beyond down'])}" if g["beyond down"] else "",
             f"within the seed spread for {', '.join(g['within'])}" if g["within"] else "",
             f"one seed, so not measured, for {', '.join(g['one seed'])}" if g["one seed"] else ""]
    return f"- **{subject}**: " + "; ".join(p for p in parts if p) + "."


def findings(rows, refs, archs):
    """The tables in words, worked out from the numbers so that a rebuilt table cannot keep a stale sentence: which
    differences are beyond the seed spread (a paired t-test at 5%, two-sided), which are not, which rest on one seed,
    and how likely one "beyond" among several comparisons is by chance alone."""
    def per_run(value):
        return [(f"{a} {rc}", [value(r) for r in rows if r["arch"] == a and r["recipe"] == rc])
                for a in archs for rc in RECIPES]

    effect = group((a, recipe_effect(rows, a, "knn")) for a in archs)
    linear = group((a, recipe_effect(rows, a, "linear_top1")) for a in archs)
    gain = group(per_run(lambda r: r["knn_gain"]))
    pixels = group(per_run(lambda r: r["knn"] - refs["pixels"]))
    tests = 2 * sum(1 for a in archs if len(recipe_effect(rows, a, "knn")) > 1)  # kNN and linear per network
    lines = [sentence("Small-model recipe minus baseline, kNN", effect, "beyond the seed spread and in the recipe's "
                      "favour for", "beyond it and against the recipe for"),
             sentence("The same, linear", linear, "beyond the seed spread and in the recipe's favour for",
                      "beyond it and against the recipe for"),
             sentence("Learned against its own untrained network (kNN)", gain, "above it beyond the seed spread:",
                      "below it beyond the seed spread:"),
             sentence(f"Learned against raw pixels ({refs['pixels']:.2f}; one-sample t against that constant)",
                      pixels, "above them beyond the seed spread:", "below them beyond the seed spread:"),
             "", "\"Beyond the seed spread\": a two-sided t-test of the per-seed differences (n - 1 degrees of "
                 "freedom) rejects \"no difference\" at 5%, that is, the 95% interval of the mean difference "
                 "excludes 0. It is a statement about the mean over seeds, not that every seed differs; a t just "
                 "short of the line is about as much evidence as one just past it."]
    pairs = {key: [d for a in archs for d in recipe_effect(rows, a, key)] for key in ("knn", "linear_top1")}
    if len(archs) > 1 and len(pairs["knn"]) > 1:
        counts = {key: (sum(d > 0 for d in ds), sum(d != 0 for d in ds)) for key, ds in pairs.items()}
        lines += ["", "All networks together (a sign test over every network's seed pairs, which asks whether the "
                      "recipe helps more often than not, not by how much): "
                      + "; ".join(f"{name}, {up} of {n} pairs favour the small-model recipe (two-sided p "
                                  f"{sign_test(up, n):.2g})" for name, (up, n) in (("kNN", counts["knn"]),
                                                                                 ("linear", counts["linear_top1"])))
                      + "."]
    if tests > 1:
        lines += ["", f"The tables make {tests} recipe comparisons (kNN and linear per network with several seeds), "
                      f"each a test at 5%: with no recipe effect at all, at least one would read \"beyond\" by seed "
                      f"noise alone with probability at most {1 - 0.95 ** tests:.0%} (the figure for independent "
                      f"tests; these share seeds and checkpoints, so the chance is lower). One network beyond the "
                      f"spread is evidence to confirm with more seeds, not a finding on its own."]
    return lines


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def linear_protocol(linear):
    """The linear protocol of a linear.json, in words."""
    what = {"cached-features": "a linear classifier on features extracted once under the evaluation transform (a "
                               "fast approximation of MoCo's protocol, no training augmentation)",
            "moco-linear": "MoCo's linear protocol (frozen backbone, crop + flip training views)"}[linear["protocol"]]
    steps = " and ".join(str(e) for e in linear["schedule"])
    return (f"{what}, SGD lr {linear['lr']:g}, {linear['epochs']} epochs, lr x0.1 at epoch {steps}; the last epoch's "
            f"top-1 on the test images (not an epoch picked on them)")


def markdown(res, other=None):
    """RESULTS.md: what ran and how to read it, then the tables, the tables in words (with `other`, the Results of
    the same runs at another budget: those side by side), the neighbours pictures and how the study ran."""
    return "\n".join(header(res) + summary(res) + references(res) + pretrained(res) + recipe_table(res)
                     + learned(res) + (budget(res, other) + budget_neighbours(res, other) if other else [])
                     + ["", "## The tables in words", ""] + findings(res.rows, res.refs, res.archs)
                     + (budget_findings(res, other) if other else [])
                     + neighbours_section(res.study, res.rows, res.archs) + slices_section(res.study)) + "\n"


def same_runs(res, other):
    """[(arch, recipe, seed, this study's row, the other's row)] for the runs both studies made."""
    theirs = {(r["arch"], r["recipe"], r["seed"]): r for r in other.rows}
    return [(r["arch"], r["recipe"], r["seed"], r, theirs[r["arch"], r["recipe"], r["seed"]]) for r in res.rows
            if (r["arch"], r["recipe"], r["seed"]) in theirs]


def budget_diffs(res, other, arch, recipe, key):
    """This study's figure minus the other's, per seed of (arch, recipe), in seed order."""
    return [mine[key] - theirs[key] for a, rc, _, mine, theirs in same_runs(res, other) if (a, rc) == (arch, recipe)]


def budget(res, other):
    """The same networks, recipes and seeds after the other study's epochs and after this one's, side by side, with
    the paired difference (the same seed: its initialisation, image order and augmentation draws)."""
    mine, theirs = epochs_of(res), epochs_of(other)
    lines = ["", f"## {theirs:g} and {mine:g} epochs, the same seeds", "",
             f"The same runs at {theirs:g} epochs: [{other.study['out_link']}]({other.study['out_link']}/RESULTS.md) "
             f"(its numbers as tracked there); the difference is paired by seed (the same initialisation, image order "
             f"and augmentation draws). Raw pixels: {res.refs['pixels']:.2f} here, {other.refs['pixels']:.2f} there. "
             f"Where the {theirs:g}-epoch runs were made: {machine_line(other.made)} {code_line(other.made)} Runs "
             f"made by other code or on another machine differ by rounding from their first step, which moves a run "
             f"about as much as another seed: the paired differences carry that too. "
             f"![kNN against epochs](budget.svg)", "",
             f"| network | recipe | seeds | kNN, {theirs:g} epochs | kNN, {mine:g} epochs | "
             f"{mine:g} - {theirs:g}, per seed | "
             f"mean ± sd | 95% interval | paired t | beyond the seed spread | linear, {theirs:g} epochs | "
             f"linear, {mine:g} epochs | linear {mine:g} - {theirs:g}: mean ± sd | 95% interval | paired t | "
             f"beyond the seed spread |", "|---" * 16 + "|"]
    for arch in res.archs:
        for recipe in RECIPES:
            both = [(m, t) for a, rc, _, m, t in same_runs(res, other) if (a, rc) == (arch, recipe)]
            if not both:
                continue
            knn, linear = (budget_diffs(res, other, arch, recipe, key) for key in ("knn", "linear_top1"))
            lines.append(f"| {arch} | {recipe} | {len(both)} | {spread([t['knn'] for _, t in both])} | "
                         f"{spread([m['knn'] for m, _ in both])} | {per_seed(knn)} | {spread(knn)} | {t_cells(knn)} | "
                         f"{spread([t['linear_top1'] for _, t in both])} | "
                         f"{spread([m['linear_top1'] for m, _ in both])} | {spread(linear)} | {t_cells(linear)} |")
    return lines


def budget_neighbours(res, other):
    """Markdown: per network, the neighbours pictures of seed 0 after the other study's epochs and after this one's,
    both recipes (the same 20 test images), with the share of same-class neighbours; [] where a picture is missing."""
    mine, theirs = epochs_of(res), epochs_of(other)
    lines = []
    for arch in res.archs:
        cells = [(f"{recipe}, {epochs:g} epochs", link, os.path.join(study["out"], f"{arch}_{recipe}_s0"))
                 for recipe in RECIPES for epochs, link, study in ((theirs, other.study["out_link"] + "/", other.study),
                                                                   (mine, "", res.study))]
        if not all(os.path.exists(os.path.join(folder, "neighbours.png")) for _, _, folder in cells):
            continue
        lines += ["", f"**{arch}, seed 0**: the {theirs:g}-epoch and the {mine:g}-epoch networks' nearest training "
                      f"images to the same test images (framed green when they have the query's class).", "",
                  "| " + " | ".join(title for title, _, _ in cells) + " |", "|---" * len(cells) + "|",
                  "| " + " | ".join(f"![{title}]({link}{os.path.basename(folder)}/neighbours.png)"
                                    for title, link, folder in cells) + " |",
                  "| " + " | ".join(f"{load(os.path.join(folder, 'knn.json'))['neighbours']['same_class']:.0%} of "
                                    f"the neighbours share their query's class" for _, _, folder in cells) + " |"]
    return (["", f"### What the features find after {theirs:g} and {mine:g} epochs"] + lines) if lines else []


def budget_findings(res, other):
    mine, theirs = epochs_of(res), epochs_of(other)
    def diffs(key):
        pairs = [(f"{a} {rc}", budget_diffs(res, other, a, rc, key)) for a in res.archs for rc in RECIPES]
        return group((name, d) for name, d in pairs if d)

    return ["", sentence(f"{mine:g} epochs minus {theirs:g}, the same seeds, kNN", diffs("knn"),
                         "beyond the seed spread and up for", "beyond it and down for"),
            sentence("The same, linear", diffs("linear_top1"), "beyond the seed spread and up for",
                     "beyond it and down for")]


def epochs_of(res):
    """The epochs the study's runs trained for (their mean, one number for a preset's study)."""
    return statistics.mean(r["epochs"] for r in res.rows)


def header(res):
    study, rows, refs, pixels, seeds, archs = res.study, res.rows, res.refs, res.pixels, res.seeds, res.archs
    pretrain_s = sum(r["pretrain_min"] * 60 for r in rows)
    counts = sorted({len(s) for s in seeds.values()})
    seeded = ", ".join(f"{a} {len(seeds[a])}" for a in archs) if len(counts) > 1 else f"{counts[0]} each"
    bn = ("precise BN: every checkpoint's BN statistics re-estimated on the bank's training images" if
          all(r["precise_bn"] for r in rows) else "each checkpoint's own BN running statistics" if
          not any(r["precise_bn"] for r in rows) else "precise BN where the run's knn.json says so")
    took = (f" Its invocations took {study['seconds'] / 60:.1f} min; the stages' own times sum to "
            f"{(pretrain_s + res.eval_s) / 60:.1f} min (pretraining {pretrain_s / 60:.1f}, evaluation "
            f"{res.eval_s / 60:.1f}; resumed runs included)." if study.get("seconds") is not None else "")
    lines = [f"# run_all.sh {study['preset']}: results", "",
             f"`{study['invocation']}`: {plural(len(archs), 'network')} x 2 recipes; seeds per network: {seeded}. "
             f"{machine_line(res.made)} {code_line(res.made)}{took}" + (
                 f" {study['notes']['study']}" if study["notes"].get("study") else ""),
             "", "![kNN per network and recipe, and the health curves](results.svg)", "",
             f"Figures over seeds are mean ± sd (n = the network's seeds; one seed: the value alone). kNN: weighted, "
             f"k {rows[0]['knn_k']}, T 0.1, on the backbone's pooled features with {bn}, bank and queries as each "
             f"run's knn.json says. References under the same protocol: random init = the same network untrained (its "
             f"seed's initialisation); random, BN of data = the same, its BN statistics set to the training images'; "
             f"raw pixels = the normalised images themselves ({refs['pixels']:.2f}). Gain = learned minus its own "
             f"seed's random init. Pretext acc: how often the positive key beats all K queue entries, mean over the "
             f"first and the last epoch; while the lr is high it is inflated by the queue's stale keys, so read it "
             f"with instance acc: the trained network, frozen, ranks each image's own {pixels['diagnostics']['aug']} "
             f"view above the originals of the {pixels['diagnostics']['n_images'] - 1} other images of a fixed set "
             f"(as ssl-small; raw pixels: {pixels['diagnostics']['instance_accuracy']:.1f}). emb_std: the spread of "
             f"the queries over the last logged steps (about {1 / math.sqrt(128):.3f} when 128-d embeddings spread "
             f"evenly, 0 when they collapse). Linear: {linear_protocol(res.linear)}.", ""]
    if any(r["stale_bn"] > STALE_BN for r in rows):
        lines += [f"† Evaluated with BN running statistics that still hold more than {STALE_BN:.0%} of their initial "
                  f"values: not the trained network's features (re-evaluate with --precise-bn).", ""]
    if any(r["collapsed_at_step"] for r in rows):
        lines += ["‡ pretrain.py warned that the run looked collapsed at the step given (its log.jsonl and "
                  "output.log say why).", ""]
    return lines


def summary(res):
    """The table the README copies: per network, the references, both recipes' kNN and linear, the recipe effect."""
    refs, seeds = res.refs, res.seeds
    lines = ["## Summary", "",
             "| network | seeds | kNN random init | random, BN of data | raw pixels | kNN baseline | "
             "kNN small recipe | small - baseline, paired: mean ± sd (t) | linear baseline | linear small recipe |",
             "|---" * 10 + "|"]
    for arch in res.archs:
        effect = recipe_effect(res.rows, arch, "knn")
        t, _ = paired(effect)
        effect_cell = f"{statistics.mean(effect):+.2f}" + (
            "" if t is None else f" ± {statistics.stdev(effect):.2f} (t {t:+.1f})")
        lines.append(f"| {arch} | {len(seeds[arch])} | {spread([refs[arch, s][0] for s in seeds[arch]])} | "
                     f"{spread([refs[arch, s][1] for s in seeds[arch]])} | {refs['pixels']:.2f} | "
                     f"{spread([r['knn'] for r in res.sel(arch, 'baseline')])} | "
                     f"{spread([r['knn'] for r in res.sel(arch, 'small')])} | {effect_cell} | "
                     f"{spread([r['linear_top1'] for r in res.sel(arch, 'baseline')])} | "
                     f"{spread([r['linear_top1'] for r in res.sel(arch, 'small')])} |")
    return lines


def references(res):
    refs, seeds = res.refs, res.seeds
    lines = ["", "## References", "",
             "| network | params | seeds | kNN random init | kNN random, BN of data | kNN raw pixels |",
             "|---|---|---|---|---|---|"]
    for arch in res.archs:
        lines.append(f"| {arch} | {res.sel(arch, 'small')[0]['backbone_params'] / 1e6:.2f}M | {len(seeds[arch])} | "
                     f"{spread([refs[arch, s][0] for s in seeds[arch]])} | "
                     f"{spread([refs[arch, s][1] for s in seeds[arch]])} | {refs['pixels']:.2f} |")
    return lines


def pretrained(res):
    """Every run's health and numbers, per network and recipe."""
    def mark(r):
        return " †" if r["stale_bn"] > STALE_BN else ""

    pixels = res.refs["pixels"]
    columns = ["network", "recipe", "seeds", "epochs", "pretext acc first -> last", "instance acc", "emb_std",
               "kNN learned", "gain over random init", "minus raw pixels", "linear top-1", "alignment", "uniformity",
               "img/s", "pretrain min"]
    lines = ["", "## Pretrained networks", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for arch in res.archs:
        for recipe in RECIPES:
            rs = res.sel(arch, recipe)
            col = {k: [r[k] for r in rs] for k in rs[0] if isinstance(rs[0][k], (int, float))}
            emb = [r["emb_std"] for r in rs if r["emb_std"] is not None]
            collapsed = [f"‡ {r['collapsed_at_step']}" for r in rs if r["collapsed_at_step"]]
            lines.append(f"| {arch} | {recipe} | {len(rs)} | {rs[0]['epochs']:g} | "
                         f"{spread(col['pretext_first'], 1)} -> {spread(col['pretext_last'], 1)} | "
                         f"{spread(col['instance_acc'], 1)} | "
                         f"{(spread(emb, 3) if emb else '-') + ''.join(' ' + c for c in collapsed)} | "
                         f"{spread(col['knn'])}{''.join(dict.fromkeys(mark(r) for r in rs))} | "
                         f"{spread(col['knn_gain'])} | {spread([v - pixels for v in col['knn']])} | "
                         f"{spread(col['linear_top1'])} | {spread(col['alignment'], 3)} | "
                         f"{spread(col['uniformity'], 3)} | {spread(col['images_per_s'], 0)} | "
                         f"{spread(col['pretrain_min'], 1)} |")
    return lines


def recipe_table(res):
    lines = ["", "## Small-model recipe minus baseline, paired by seed", "",
             "| network | kNN, per seed | kNN mean ± sd | 95% interval | paired t | beyond the seed spread | "
             "linear, per seed | linear mean ± sd | 95% interval | linear paired t | beyond the seed spread |",
             "|---" * 11 + "|"]
    for arch in res.archs:
        knn, linear_diff = recipe_effect(res.rows, arch, "knn"), recipe_effect(res.rows, arch, "linear_top1")
        lines.append(f"| {arch} | {per_seed(knn)} | {spread(knn)} | {t_cells(knn)} | {per_seed(linear_diff)} | "
                     f"{spread(linear_diff)} | {t_cells(linear_diff)} |")
    return lines


def learned(res):
    lines = ["", "## Learned against its references", "",
             "Each run's kNN minus its own seed's untrained network (paired by seed), and minus raw pixels (one "
             "number, the same for every seed: a one-sample t of the runs against that constant).", "",
             "| network | recipe | minus random init, per seed | mean ± sd | 95% interval | paired t | "
             "beyond the seed spread | minus raw pixels, mean ± sd | 95% interval | one-sample t | "
             "beyond the seed spread |", "|---" * 11 + "|"]
    for arch in res.archs:
        for recipe in RECIPES:
            gain = [r["knn_gain"] for r in res.sel(arch, recipe)]
            pix = [r["knn"] - res.refs["pixels"] for r in res.sel(arch, recipe)]
            lines.append(f"| {arch} | {recipe} | {per_seed(gain)} | {spread(gain)} | {t_cells(gain)} | "
                         f"{spread(pix)} | {t_cells(pix)} |")
    return lines


def write_csv(res, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(res.rows[0]))
        writer.writeheader()
        writer.writerows(res.rows)


def neighbours_section(study, rows, archs):
    """Markdown: the neighbours pictures of seed 0 side by side (raw pixels, random init, baseline, small-model
    recipe) for the network whose recipe effect on kNN is largest, with the share of same-class neighbours and,
    from OUT/notes.json's "neighbours", one sentence each written by whoever looked at them."""
    effect = {a: statistics.mean(recipe_effect(rows, a, "knn")) for a in archs}
    arch = max(archs, key=lambda a: abs(effect[a]))
    panels = {"pixels": ("raw pixels", "pixels/knn.json", "pixels/neighbours.png"),
              "random": ("random init", f"{arch}_random_s0/knn.json", f"{arch}_random_s0/neighbours.png"),
              "baseline": ("baseline", f"{arch}_baseline_s0/knn.json", f"{arch}_baseline_s0/neighbours.png"),
              "small": ("small-model recipe", f"{arch}_small_s0/knn.json", f"{arch}_small_s0/neighbours.png")}
    if not all(os.path.exists(os.path.join(study["out"], png)) for _, _, png in panels.values()):
        return []  # a study from before knn_eval.py drew them
    notes = study.get("notes", {}).get("neighbours", {})
    shown = {k: load(os.path.join(study["out"], knn))["neighbours"] for k, (_, knn, _) in panels.items()}
    return ["", f"## What the features find: {arch}, seed 0", "",
            (f"{arch} is the network whose recipe effect on kNN is largest in size" if len(archs) > 1 else
             f"{arch} is this study's one network")
            + f" (small minus baseline, {effect[arch]:+.2f} points). Each picture shows the same "
            f"{len(shown['pixels']['queries'])} test images (the first two of each class, left column) and the "
            f"{len(shown['pixels']['nearest'][0])} training images nearest to each under that column's features, "
            f"framed green when they have the query's class and red when not (`knn_eval.py --neighbours`).", "",
            "| " + " | ".join(title for title, _, _ in panels.values()) + " |", "|---|---|---|---|",
            "| " + " | ".join(f"![{title}]({png})" for title, _, png in panels.values()) + " |",
            "| " + " | ".join(f"{shown[k]['same_class']:.0%} of the neighbours share their query's class"
                              for k in panels) + " |"] \
        + (["| " + " | ".join(notes.get(k, "") for k in panels) + " |"] if notes else [])
