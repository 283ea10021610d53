"""The presets: folders presets/NAME/ of flag files, each read by the script it is for (as @FILE), and the two
recipes recipes/NAME.args. Nothing here imports torch: run_all.sh asks `python3 -m engine.presets NAME` whether a
preset exists before it builds the .venv.

    presets/NAME/pretrain.args   every pretraining of the preset
    presets/NAME/baseline.args   the preset's additions to recipes/baseline.args
    presets/NAME/small.args      the preset's additions to recipes/small.args
    presets/NAME/eval.args       every evaluation (kNN, linear, the references)
    presets/NAME/linear.args     the linear evaluation's own
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("baseline", "small")


def presets():
    return sorted(d for d in os.listdir(os.path.join(ROOT, "presets"))
                  if os.path.isdir(os.path.join(ROOT, "presets", d)))


def check(name):
    """The one sentence for a preset that is not there (exit 2)."""
    if name not in presets():
        print(f"unknown preset '{name}': choose one of presets/ ({' '.join(presets())}), or tests, gpucheck.",
              file=sys.stderr)
        raise SystemExit(2)


def flag_file(preset, name):
    """The @FILE argument of presets/PRESET/NAME.args (absolute: the scripts read it from any folder)."""
    return "@" + os.path.join(ROOT, "presets", preset, name + ".args")


def recipe_file(recipe):
    return "@" + os.path.join(ROOT, "recipes", recipe + ".args")


if __name__ == "__main__":
    check(sys.argv[1])
