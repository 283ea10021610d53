"""The table and the figure of a study, from its files: RESULTS.md, results.csv and results.svg in results/PRESET.

    python3 report.py results/demo          # rebuilds the three files from the study's JSON, logs and study.json

OUT/study.json (written by study.py) names the preset, the networks, the seeds, the invocation and the slices that
ran it. A run or reference is tabled when it has finished and its recorded commands mean what today's preset runs
(engine/jobs.py decides); the others are named, not tabled. OUT/notes.json, where there is one, holds sentences
written by hand after looking (the study's, the neighbours pictures') and may name, under "shorter", the folder of a
study of the same runs at a smaller budget (results/demo24's: ../demo): then RESULTS.md sets the two side by side and
budget.svg draws kNN against epochs. The tables and their words are engine/report.py's, the figures
engine/figure.py's, the statistics engine/stats.py's.
"""
import argparse
import os
import sys

import data
from engine import jobs
from engine.figure import budget_figure, figure
from engine.report import Results, load, markdown, write_csv


def finished(out, planned, preset):
    """({arch: the seeds whose two runs (pretraining, kNN, linear) and references have all finished with today's
    commands}, the planned plan lines that have not): a study in time-boxed slices is reported from what is there,
    and a run made with other flags than today's preset is never mixed into the table (jobs.Job.current: the numbers'
    commands; a picture drawn or not aside)."""
    study = jobs.Study(preset, list(planned))
    study.out, study.runs = out, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(out))), "runs", preset)
    done, missing = {}, []
    for arch, seeds in planned.items():
        for seed in seeds:
            lines = [jobs.Line(study, kind, arch, seed) for kind in ("run", "refs")]
            current = [line.current() for line in lines]  # each hashes the checkpoints there: once
            if all(current):
                done.setdefault(arch, []).append(seed)
            missing += [line.name for line, ok in zip(lines, current) if not ok]
    if not jobs.Line(study, "pixels").current():
        missing.append("pixels")
    return done, missing


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
    res = Results(study, seeds)
    other = shorter(args.out, study, seeds)
    write_csv(res, f"{args.out}/results.csv")
    table = markdown(res, other)
    with open(f"{args.out}/RESULTS.md", "w") as f:
        f.write(table)
    figure(res, f"{args.out}/results.svg")
    figures = [f"{args.out}/results.svg"]
    if other:
        budget_figure(res, other, f"{args.out}/budget.svg")
        figures.append(f"{args.out}/budget.svg")
    elif os.path.exists(f"{args.out}/budget.svg"):  # no longer set beside another study: no stale figure
        os.remove(f"{args.out}/budget.svg")
    print(table, end="")  # every file written first: a terminal that has gone loses the print alone
    print(f"figures: {', '.join(figures)}")


def shorter(out, study, seeds):
    """The Results of the study notes.json names under "shorter", for the networks and seeds both have finished, or
    None."""
    link = study["notes"].get("shorter")
    if not link:
        return None
    folder = os.path.normpath(os.path.join(out, link))
    if not os.path.isfile(os.path.join(folder, "study.json")):
        raise SystemExit(f"{out}/notes.json names \"shorter\": {link}, and {folder}/study.json does not exist: name "
                         f"the results folder of the shorter study, relative to {out}.")
    other = load(os.path.join(folder, "study.json"))
    other.update(out=folder, out_link=link, notes={})
    planned = {a: list(range(other["seeds"])) if a in other["seeds_archs"] else [0] for a in other["archs"]}
    done, missing = finished(folder, planned, other["preset"])
    common = {a: [s for s in seeds[a] if s in done.get(a, [])] for a in study["archs"]}
    other["archs"] = [a for a in study["archs"] if common[a]]
    if "pixels" in missing or not other["archs"]:
        print(f"{folder} has no finished runs of these networks and seeds with its raw pixels: not set beside.",
              file=sys.stderr)
        return None
    return Results(other, {a: common[a] for a in other["archs"]})


if __name__ == "__main__":
    main()
