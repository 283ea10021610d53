"""The study's results, from the files study.py's jobs wrote under OUT_DIR: RESULTS.md (tables to paste into a
paper, and the tables in words), results.csv (one row per network, recipe and seed) and results.svg (kNN of every
run and seed beside the references, the recipe difference paired by seed with its 95% interval, and the health
curves: pretext accuracy and the kNN monitor per epoch).

    python3 report.py results/demo          # rebuilds the three files from the study's JSON, logs and study.json

OUT_DIR/study.json (written by study.py) names the preset, the networks, the seeds, the invocation and the slices that
ran it; runs and references not finished yet are named, not tabled; OUT_DIR/notes.json, where there is one, holds
sentences written by hand after looking (the study's, the neighbours pictures'). Every figure over seeds is mean +- sd
(sample standard deviation, n - 1) and n. Comparisons are paired by seed: a learned network against its own seed's
random init, the small-model recipe against the baseline of the same seed; a paired difference counts as beyond the
seed spread when a two-sided paired t-test rejects "no difference" at 5% (its 95% interval excludes 0). Raw pixels
are one number: runs are compared with it by a one-sample t. Over all networks, a sign test counts the seed pairs
that favour each recipe.
"""
import argparse
import collections
import csv
import json
import math
import os
import statistics

import data
from evaluation import STALE_BN, git

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


def collect(out, archs, seeds):
    """(rows, references, evaluation seconds, the raw pixels' knn.json, a linear.json, where each file was made):
    one row per network, recipe and seed; the references per network and seed, and the raw pixels' under the key
    "pixels"; the machines, as machine_name says them, of the pretrainings and of the evaluations."""
    pixels = load(f"{out}/pixels/knn.json")
    refs, rows, eval_s = {"pixels": knn_top1(pixels)}, [], pixels["seconds"]
    made = {"pretraining": [], "evaluation": [pixels]}
    for seed in sorted({s for arch in archs for s in seeds[arch]}):
        for arch in [a for a in archs if seed in seeds[a]]:
            ref, ref_bn = (load(f"{out}/{arch}_random_s{seed}/{name}.json") for name in ("knn", "knn_bn"))
            refs[arch, seed] = knn_top1(ref), knn_top1(ref_bn)
            eval_s += ref["seconds"] + ref_bn["seconds"]
            made["evaluation"] += [ref, ref_bn]
            for recipe in RECIPES:
                run = f"{out}/{arch}_{recipe}_s{seed}"
                summary, knn, linear = load(f"{run}/summary.json"), load(f"{run}/knn.json"), load(f"{run}/linear.json")
                eval_s += knn["seconds"] + linear["seconds"]
                made["pretraining"].append(summary)
                made["evaluation"] += [knn, linear]
                diag = knn["diagnostics"]
                log = read_log(f"{run}/log.jsonl")
                pretext = [r["epoch_acc"] for r in log if "epoch_acc" in r]
                emb_std = [r["emb_std"] for r in log if "emb_std" in r]
                rows.append({"arch": arch, "recipe": recipe, "seed": seed,
                             "backbone_params": summary["backbone_params"], "epochs": summary["epochs"],
                             "steps": summary["steps"], "pretext_first": pretext[0], "pretext_last": pretext[-1],
                             "emb_std": emb_std[-1] if emb_std else None,
                             "collapsed_at_step": summary.get("collapsed_at_step"),
                             "instance_acc": diag["instance_accuracy"], "knn_k": knn["knn"][-1]["k"],
                             "knn": knn_top1(knn),
                             "knn_random": refs[arch, seed][0], "knn_random_bn": refs[arch, seed][1],
                             "knn_pixels": refs["pixels"], "knn_gain": knn_top1(knn) - refs[arch, seed][0],
                             "precise_bn": bool(knn.get("precise_bn")), "stale_bn": stale_bn(knn),
                             "linear_top1": linear_top1(linear), "linear_protocol": linear["protocol"],
                             "alignment": diag["alignment_original_view"], "uniformity": diag["uniformity_original"],
                             "images_per_s": summary["images_per_s"], "pretrain_min": summary["wall_s"] / 60,
                             "device": summary["device"], "machine": machine_name(summary),
                             "ckpt_sha256": knn["ckpt_sha256"]})
    return rows, refs, eval_s, pixels, linear, made


def finished(out, planned, preset):
    """({arch: the seeds whose two runs (pretraining, kNN, linear) and references have all finished with today's
    commands}, the planned jobs that have not, by study.py's names, and why): a study in time-boxed slices is reported
    from what is there, and a run made with other flags than today's preset is never mixed into the table
    (study.Job.current: the numbers' commands; a picture drawn or not aside)."""
    import study as engine
    s = engine.Study(preset, list(planned))
    s.out, s.runs = out, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(out))), "runs", preset)
    done, missing = {}, []
    for arch, seeds in planned.items():
        for seed in seeds:
            run, refs = (engine.Job(s, kind, arch, seed) for kind in ("run", "refs"))
            if run.current() and refs.current():
                done.setdefault(arch, []).append(seed)
            missing += [job.name for job in (run, refs) if not job.current()]
    if not engine.Job(s, "pixels").current():
        missing.append("pixels")
    return done, missing


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
            where = (f"{m['gpu']} x {m['gpus']}" if m.get("gpus") else
                     f"{m.get('cpu')} ({' '.join(m.get('cpu_flags', [])) or 'no AVX2'}, {m.get('cores')} cores)")
            lines.append(f"| {i} | `{sl['invocation']}` | {where} | {sl.get('jobs')} | {len(sl.get('finished', []))} "
                         f"| {minutes(sl.get('predicted_s'))} | {minutes(sl.get('seconds'))} |")
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
    if not m:
        return None
    if results.get("device", "").startswith("cuda"):
        return f"{m['gpu']} x {m['gpus']}"
    return (f"{m['cpu']} ({' '.join(m['cpu_flags']) or 'no AVX2'}, {plural(m['cores'], 'core')} / "
            f"{plural(m['threads'], 'thread')})")


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


def spread(values, digits=2):
    """'mean +- sd' of the values (sd with n - 1); the value itself for one."""
    text = f"{statistics.mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {statistics.stdev(values):.{digits}f}"


def critical(n):
    """The two-sided 5% critical value of Student's t for the mean of n values (n - 1 degrees of freedom): the table
    up to 30, then the Cornish-Fisher expansion about the normal's 1.96 (within 1e-4 from 31 on)."""
    df = n - 1
    if df <= len(T_CRITICAL):
        return T_CRITICAL[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired(diffs):
    """(t statistic, beyond the seed spread?) of paired differences; (None, None) for fewer than two."""
    if len(diffs) < 2:
        return None, None
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    t = mean / (sd / math.sqrt(len(diffs))) if sd else math.copysign(math.inf, mean) if mean else 0.0
    return t, abs(t) > critical(len(diffs))


def confidence(diffs):
    """Half the width of the 95% confidence interval of the mean of paired differences (Student's t); None for one.
    It excludes 0 exactly when paired() calls the difference beyond the seed spread."""
    if len(diffs) < 2:
        return None
    return critical(len(diffs)) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def sign_test(up, n):
    """Two-sided p of an exact sign test: the chance of a split at least as uneven as `up` of `n` under a fair coin."""
    if not n:
        return 1.0
    extreme = min(up, n - up)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(extreme + 1)) / 2 ** n)


def interval(diffs):
    """'low to high': the 95% confidence interval of the mean of paired differences; '-' for one."""
    if len(diffs) < 2:
        return "-"
    mean, half = statistics.mean(diffs), confidence(diffs)
    return f"{mean - half:+.2f} to {mean + half:+.2f}"


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


def findings(rows, refs, archs):
    """The tables in words, worked out from the numbers so that a rebuilt table cannot keep a stale sentence: which
    differences are beyond the seed spread (a paired t-test at 5%, two-sided), which are not, which rest on one seed,
    and how likely one "beyond" among several comparisons is by chance alone."""
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
        parts = [f"{up} {', '.join(g['beyond up'])}" if g["beyond up"] else "",
                 f"{down} {', '.join(g['beyond down'])}" if g["beyond down"] else "",
                 f"within the seed spread for {', '.join(g['within'])}" if g["within"] else "",
                 f"one seed, so not measured, for {', '.join(g['one seed'])}" if g["one seed"] else ""]
        return f"- **{subject}**: " + "; ".join(p for p in parts if p) + "."

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


def markdown(study, rows, refs, eval_s, pixels, linear, seeds, made):
    archs = study["archs"]

    def sel(arch, recipe):
        return [r for r in rows if r["arch"] == arch and r["recipe"] == recipe]

    def mark(r):
        return " †" if r["stale_bn"] > STALE_BN else ""

    pretrain_s = sum(r["pretrain_min"] * 60 for r in rows)
    counts = sorted({len(s) for s in seeds.values()})
    seeded = ", ".join(f"{a} {len(seeds[a])}" for a in archs) if len(counts) > 1 else f"{counts[0]} each"
    bn = ("precise BN: every checkpoint's BN statistics re-estimated on the bank's training images" if
          all(r["precise_bn"] for r in rows) else "each checkpoint's own BN running statistics" if
          not any(r["precise_bn"] for r in rows) else "precise BN where the run's knn.json says so")
    took = (f" Its invocations took {study['seconds'] / 60:.1f} min; the stages' own times sum to "
            f"{(pretrain_s + eval_s) / 60:.1f} min (pretraining {pretrain_s / 60:.1f}, evaluation {eval_s / 60:.1f}; "
            f"resumed runs included)." if study.get("seconds") is not None else "")
    lines = [f"# run_all.sh {study['preset']}: results", "",
             f"`{study['invocation']}`: {plural(len(archs), 'network')} x 2 recipes; seeds per network: {seeded}. "
             f"{machine_line(made)} {code_line(made)}{took}" + (f" {study['notes']['study']}" if study["notes"].get(
                 "study") else ""),
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
             f"evenly, 0 when they collapse). Linear: {linear_protocol(linear)}.", ""]
    if any(r["stale_bn"] > STALE_BN for r in rows):
        lines += [f"† Evaluated with BN running statistics that still hold more than {STALE_BN:.0%} of their initial "
                  f"values: not the trained network's features (re-evaluate with --precise-bn).", ""]
    if any(r["collapsed_at_step"] for r in rows):
        lines += ["‡ pretrain.py warned that the run looked collapsed at the step given (its log.jsonl and "
                  "output.log say why).", ""]
    lines += ["## Summary", "",
              "| network | seeds | kNN random init | random, BN of data | raw pixels | kNN baseline | "
              "kNN small recipe | small - baseline, paired: mean ± sd (t) | linear baseline | linear small recipe |",
              "|---" * 10 + "|"]
    for arch in archs:
        effect = recipe_effect(rows, arch, "knn")
        t, _ = paired(effect)
        effect_cell = f"{statistics.mean(effect):+.2f}" + (
            "" if t is None else f" ± {statistics.stdev(effect):.2f} (t {t:+.1f})")
        lines.append(f"| {arch} | {len(seeds[arch])} | {spread([refs[arch, s][0] for s in seeds[arch]])} | "
                     f"{spread([refs[arch, s][1] for s in seeds[arch]])} | {refs['pixels']:.2f} | "
                     f"{spread([r['knn'] for r in sel(arch, 'baseline')])} | "
                     f"{spread([r['knn'] for r in sel(arch, 'small')])} | "
                     f"{effect_cell} | "
                     f"{spread([r['linear_top1'] for r in sel(arch, 'baseline')])} | "
                     f"{spread([r['linear_top1'] for r in sel(arch, 'small')])} |")
    lines += ["", "## References", "",
              "| network | params | seeds | kNN random init | kNN random, BN of data | kNN raw pixels |",
              "|---|---|---|---|---|---|"]
    for arch in archs:
        lines.append(f"| {arch} | {sel(arch, 'small')[0]['backbone_params'] / 1e6:.2f}M | {len(seeds[arch])} | "
                     f"{spread([refs[arch, s][0] for s in seeds[arch]])} | "
                     f"{spread([refs[arch, s][1] for s in seeds[arch]])} | {refs['pixels']:.2f} |")
    columns = ["network", "recipe", "seeds", "epochs", "pretext acc first -> last", "instance acc", "emb_std",
               "kNN learned", "gain over random init", "minus raw pixels", "linear top-1", "alignment", "uniformity",
               "img/s", "pretrain min"]
    lines += ["", "## Pretrained networks", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for arch in archs:
        for recipe in RECIPES:
            rs = sel(arch, recipe)
            col = {k: [r[k] for r in rs] for k in rs[0] if isinstance(rs[0][k], (int, float))}
            emb = [r["emb_std"] for r in rs if r["emb_std"] is not None]
            collapsed = [f"‡ {r['collapsed_at_step']}" for r in rs if r["collapsed_at_step"]]
            lines.append(f"| {arch} | {recipe} | {len(rs)} | {rs[0]['epochs']:g} | "
                         f"{spread(col['pretext_first'], 1)} -> {spread(col['pretext_last'], 1)} | "
                         f"{spread(col['instance_acc'], 1)} | "
                         f"{(spread(emb, 3) if emb else '-') + ''.join(' ' + c for c in collapsed)} | "
                         f"{spread(col['knn'])}{''.join(dict.fromkeys(mark(r) for r in rs))} | "
                         f"{spread(col['knn_gain'])} | {spread([v - refs['pixels'] for v in col['knn']])} | "
                         f"{spread(col['linear_top1'])} | {spread(col['alignment'], 3)} | "
                         f"{spread(col['uniformity'], 3)} | {spread(col['images_per_s'], 0)} | "
                         f"{spread(col['pretrain_min'], 1)} |")
    lines += ["", "## Small-model recipe minus baseline, paired by seed", "",
              "| network | kNN, per seed | kNN mean ± sd | 95% interval | paired t | beyond the seed spread | "
              "linear, per seed | linear mean ± sd | 95% interval | linear paired t | beyond the seed spread |",
              "|---" * 11 + "|"]
    for arch in archs:
        knn, linear_diff = recipe_effect(rows, arch, "knn"), recipe_effect(rows, arch, "linear_top1")
        lines.append(f"| {arch} | {per_seed(knn)} | {spread(knn)} | {t_cells(knn)} | {per_seed(linear_diff)} | "
                     f"{spread(linear_diff)} | {t_cells(linear_diff)} |")
    lines += ["", "## Learned against its references", "",
              "Each run's kNN minus its own seed's untrained network (paired by seed), and minus raw pixels (one "
              "number, the same for every seed: a one-sample t of the runs against that constant).", "",
              "| network | recipe | minus random init, per seed | mean ± sd | 95% interval | paired t | "
              "beyond the seed spread | minus raw pixels, mean ± sd | 95% interval | one-sample t | "
              "beyond the seed spread |", "|---" * 11 + "|"]
    for arch in archs:
        for recipe in RECIPES:
            gain = [r["knn_gain"] for r in sel(arch, recipe)]
            pix = [r["knn"] - refs["pixels"] for r in sel(arch, recipe)]
            lines.append(f"| {arch} | {recipe} | {per_seed(gain)} | {spread(gain)} | {t_cells(gain)} | "
                         f"{spread(pix)} | {t_cells(pix)} |")
    lines += ["", "## The tables in words", ""] + findings(rows, refs, archs)
    lines += neighbours_section(study, rows, archs)
    lines += slices_section(study)
    return "\n".join(lines) + "\n"


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


# ----- the figure, as SVG: no plotting package needed ------------------------------------------------------------

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


def figure(rows, refs, out, archs, seeds, path):
    """results.svg, two rows. Top: kNN of every run, a dot per seed with the mean +- sd, beside the network untrained
    (random init) and raw pixels (dashed) -- points, not bars, so the axis may start where the data do without a
    bar's length misleading; and the small-model recipe minus the baseline paired by seed, against 0, with the 95%
    confidence interval of its mean. Bottom: pretext accuracy and the kNN monitor per epoch, one line per run."""
    k = rows[0]["knn_k"]

    def whisker(panel, x, values, interval, colour="black"):
        """A mean (a short bar) and a vertical line over +- interval around it, at data x."""
        mean = statistics.mean(values)
        panel.line([(x - 0.09, mean), (x + 0.09, mean)], colour, width=2.5)
        if interval is not None:
            panel.line([(x, mean - interval), (x, mean + interval)], colour, width=1.2)

    def seed_dots(panel, x, values, colour, opacity):
        for n, v in enumerate(values):
            panel.parts.append(f'<circle cx="{panel.x(x + 0.035 * (n - (len(values) - 1) / 2)):.1f}" '
                               f'cy="{panel.y(v):.1f}" r="3" fill="{colour}" fill-opacity="{opacity}" '
                               f'stroke="{colour}"/>')

    def network_labels(panel):
        for i, arch in enumerate(archs):
            x, y = panel.x(i + 0.5), panel.y(panel.ylim[0]) + 12
            panel.parts.append(f'<text transform="translate({x:.1f},{y:.1f}) rotate(-20)" text-anchor="end" '
                               f'font-size="10">{arch}</text>')

    def sd(values):
        return statistics.stdev(values) if len(values) > 1 else None

    columns = {a: [("random", "#777", 0.8, [refs[a, s][0] for s in seeds[a]])] +
               [(rc, COLOURS[i % 8], 0.35 if rc == "baseline" else 0.95,
                 [r["knn"] for r in rows if r["arch"] == a and r["recipe"] == rc]) for rc in RECIPES]
               for i, a in enumerate(archs)}
    values = [refs["pixels"]] + [v for cols in columns.values() for *_, vs in cols for v in vs]
    knn = Panel(70, 40, 460, 250, (0, len(archs)), limits(values, 0.12),
                f"kNN top-1 (%), k {k}: every seed, mean ± sd", "kNN top-1 (%)")
    for i, arch in enumerate(archs):
        for j, (_, colour, opacity, vs) in enumerate(columns[arch]):
            seed_dots(knn, i + 0.2 + 0.3 * j, vs, colour, opacity)
            whisker(knn, i + 0.2 + 0.3 * j, vs, sd(vs))
    knn.line([(0, refs["pixels"]), (len(archs), refs["pixels"])], "#444", dashed=True)
    network_labels(knn)
    effects = {a: recipe_effect(rows, a, "knn") for a in archs}
    ends = [0.0] + [v for d in effects.values() for v in d] + [
        statistics.mean(d) + sign * confidence(d) for d in effects.values() if len(d) > 1 for sign in (-1, 1)]
    diff = Panel(620, 40, 330, 250, (0, len(archs)), limits(ends, 0.12),
                 "small-model recipe minus baseline, kNN, by seed", "points")
    diff.line([(0, 0), (len(archs), 0)], "black", width=1)
    for i, arch in enumerate(archs):
        seed_dots(diff, i + 0.5, effects[arch], COLOURS[i % 8], 0.95)
        whisker(diff, i + 0.5, effects[arch], confidence(effects[arch]))
    network_labels(diff)
    several = any(len(s) > 1 for s in seeds.values())
    lines = legend(70, 360, [
        ('<circle cx="4" cy="6" r="3" fill="#777" fill-opacity="0.8" stroke="#777"/><circle cx="12" cy="6" r="3" '
         'fill="#1f77b4" fill-opacity="0.35" stroke="#1f77b4"/><circle cx="20" cy="6" r="3" fill="#1f77b4" '
         'fill-opacity="0.95" stroke="#1f77b4"/>', "per network: random init (grey), baseline (light), small-model "
                                                  "recipe (dark); a dot per seed"),
        (svg_line("6,6 18,6", "black", width=2.5) + svg_line("12,0 12,12", "black", width=1.2),
         "mean ± sd over seeds" if several else "mean (one seed: no spread)"),
        (svg_line("0,6 24,6", "#444", dashed=True), f"raw pixels ({refs['pixels']:.2f})")])
    lines += legend(620, 360, [
        ('<circle cx="12" cy="6" r="3" fill="#555" stroke="#555"/>', "one seed: small minus the baseline of that seed"),
        (svg_line("6,6 18,6", "black", width=2.5) + svg_line("12,0 12,12", "black", width=1.2),
         "mean, 95% confidence interval (paired t)"),
        ("", "an interval across 0: within the seed spread")])
    panels = [knn, diff]
    curves = {}
    for r in rows:
        log = read_log(f"{out}/{r['arch']}_{r['recipe']}_s{r['seed']}/log.jsonl")
        curves[r["arch"], r["recipe"], r["seed"]] = {key: [(x["epoch"], x[key]) for x in log if key in x]
                                                     for key in ("epoch_acc", "knn_top1")}
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
                colour, opacity = COLOURS[archs.index(arch) % 8], 1.0 if seed == 0 else 0.35
                panel.line(c[key], colour, dashed=recipe == "baseline", opacity=opacity)
                panel.dots(c[key], colour, opacity)
        panels.append(panel)
    lines += legend(70, 790, [(svg_line("0,6 24,6", "#555"), "small-model recipe"),
                              (svg_line("0,6 24,6", "#555", dashed=True), "baseline"),
                              ("", "one line per run" + ("; seed 0 dark, the other seeds light" if several else ""))])
    lines += legend(620, 790, [(svg_line("0,6 24,6", COLOURS[i % 8], width=3), arch) for i, arch in enumerate(archs)])
    body = "\n".join(part for p in panels for part in p.parts) + "\n" + "\n".join(lines)
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="1000" height="880" font-family="sans-serif" '
                f'font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("out", help="results/<preset>: the folder the study's jobs wrote, with its study.json")
    args = p.parse_args(argv)
    study_file = os.path.join(args.out, "study.json")
    if not os.path.isfile(study_file):
        raise SystemExit(f"{study_file} does not exist: pass the results/<preset> folder of a study run_all.sh ran.")
    study = load(study_file)
    study["out"] = args.out
    notes_file = os.path.join(args.out, "notes.json")  # sentences written by hand after looking at the results
    study["notes"] = load(notes_file) if os.path.isfile(notes_file) else {}
    planned = {arch: list(range(study["seeds"])) if arch in study["seeds_archs"] else [0] for arch in study["archs"]}
    seeds, study["missing"] = finished(args.out, planned, study["preset"])
    study["archs"] = [a for a in study["archs"] if seeds.get(a)]
    if not study["archs"] or "pixels" in study["missing"]:
        raise SystemExit(f"{args.out}: no network has both recipes' runs and its references finished with today's "
                         f"commands for presets/{study['preset']}, and the raw pixels, so there is no table to build "
                         f"(not finished: {', '.join(study['missing'])}).")
    rows, refs, eval_s, pixels, linear, made = collect(args.out, study["archs"], seeds)
    with open(f"{args.out}/results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(study, rows, refs, eval_s, pixels, linear, seeds, made)
    with open(f"{args.out}/RESULTS.md", "w") as f:
        f.write(table)
    print(table, end="")
    figure(rows, refs, args.out, study["archs"], seeds, f"{args.out}/results.svg")
    print(f"figure: {args.out}/results.svg")


if __name__ == "__main__":
    main()
