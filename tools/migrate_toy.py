"""Bring outputs/q3_toy/metrics.json and outputs/q3_toy/runs/*/metrics.json to the one
metrics.json layout (script, command, settings, machine, data, timings, checks, results).
Renames and moves keys (each seed's target_train_last_epochs, measured during training, to
training), adds the checks of q3_toy_dann.checks_of; changes no number. Dropped:
the settings that became constants (each checked to equal its constant), resumed_from_epoch
(0 in every file; --resume is gone) and timings.train_cpu (process time of the training,
a stage no longer measured). Idempotent.

    python tools/migrate_toy.py
"""
import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import q3_toy_dann as toy  # noqa: E402

STAGES = {"data": "data", "train": "training", "evaluate": "evaluation", "figures": "figures",
          "total": "total"}
DROPPED = ("resumed_from_epoch", "timings.train_cpu")


def numbers(tree, prefix=""):
    """{dotted path: number} of every number in a JSON tree (list items by index)."""
    items = (tree.items() if isinstance(tree, dict) else enumerate(tree)
             if isinstance(tree, list) else None)
    if items is None:
        return {prefix[:-1]: tree} if isinstance(tree, (int, float)) else {}
    return {k: v for key, value in items for k, v in numbers(value, f"{prefix}{key}.").items()}


def new_key(old_key, old):
    """Where an old number lives in the new layout."""
    head, _, rest = old_key.partition(".")
    if head == "runs":
        index, _, rest = rest.partition(".")
        seed = old["runs"][int(index)]["seed"]
        model, _, rest = rest.partition(".")
        if rest.startswith("target_train_last_epochs."):
            return f"training.{rest.replace('.', f'.{seed}.{model}.', 1)}"
        return f"results.runs.{seed}.{model}.{rest}".rstrip(".")
    if head == "summary":
        return f"results.{old_key}"
    if head == "throughput":
        return f"training.{rest}"
    if head == "timings":
        return f"timings.{STAGES[rest]}"
    return old_key


def migrate(path):
    old = json.load(open(path))
    if "script" in old:
        return False
    settings = dict(old["settings"])
    for key, value in toy.CONSTANTS.items():
        assert settings.pop(key) == value, (path, key)
    assert old["resumed_from_epoch"] == 0, path
    runs = {str(run["seed"]): {k: {s: v for s, v in scores.items()
                                   if s != "target_train_last_epochs"}
                               if k in toy.MODELS else scores for k, scores in run.items()}
            for run in old["runs"]}
    last = {str(run["seed"]): {m: run[m]["target_train_last_epochs"] for m in toy.MODELS}
            for run in old["runs"]}
    results = {"runs": runs, "summary": old["summary"]}
    new = {"script": toy.SCRIPT, "command": common.shown_command(old["command"]),
           "settings": settings, "machine": old["machine"],
           "data": toy.data_record(argparse.Namespace(**settings)),
           "timings": {STAGES[k]: v for k, v in old["timings"].items() if k in STAGES},
           "checks": toy.checks_of(results), "results": results,
           "training": {**old["throughput"], "target_train_last_epochs": last}}
    now = numbers(new)
    for key, value in numbers(old).items():  # every old number, under its new key
        if key in DROPPED or key.startswith("settings."):
            continue
        assert now[new_key(key, old)] == value, (path, key)
    for key, value in numbers(old["settings"]).items():
        assert now.get(f"settings.{key}", toy.CONSTANTS.get(key)) == value, (path, key)
    assert '"/' not in json.dumps(new), f"{path} holds an absolute path"
    common.write_json(path, new)
    return True


if __name__ == "__main__":
    folder = os.path.join(ROOT, "outputs", "q3_toy")
    for path in [os.path.join(folder, "metrics.json")] + sorted(
            glob.glob(os.path.join(folder, "runs", "*", "metrics.json"))):
        print(f"{os.path.relpath(path, ROOT)}: {'migrated' if migrate(path) else 'already done'}")
