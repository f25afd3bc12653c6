"""Bring outputs/q2/metrics.json and outputs/q2/runs/*/metrics.json to the one metrics.json
layout (script, command, settings, machine, data, timings, checks, results). Renames and moves
keys, writes paths as DATA_DIR or relative, gives each run under runs/ the command its settings
imply, adds the checks of q2_cyclevae.checks_of; changes no number. Idempotent.

    python tools/migrate_q2.py
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import q2_cyclevae as q2  # noqa: E402

CONSTANTS = {"norm": "batch", "epoch_steps": None, "reverse_update": "separate",  # now fixed
             "reverse_cycle_coef": q2.REVERSE_CYCLE_COEF, "val_pairs": q2.VAL_PAIRS,
             "val_every": q2.VAL_EVERY, "classifier_epochs": q2.CLASSIFIER_EPOCHS,
             "classifier_train_fraction": q2.CLASSIFIER_TRAIN_FRACTION,
             "predictor_epochs": q2.PREDICTOR_EPOCHS,
             "interpolation_steps": q2.INTERPOLATION_STEPS,
             "interpolation_pairs": q2.INTERPOLATION_PAIRS, "threads": None}
STAGES = {"load_data": "data", "train": "training", "encode_training_characters": "evaluation",
          "evaluate_validation": "evaluation", "evaluate_test": "evaluation",
          "figures": "figures", "total_seconds": "total"}
DROPPED_TRAINING = ("command", "stopped_by_time_limit", "load_average_1min_before_after")


def implied_command(settings, machine, out):
    """The command that trains a run with these settings: the flags that differ from the
    current defaults (those of --paper-scale where it was given)."""
    paper = settings.get("paper_scale", False)
    defaults = vars(q2.parse_args(q2.build_parser(), ["--paper-scale"] if paper else []))
    words = ["python", "q2_cyclevae.py", "--data-dir", "DATA_DIR"]
    words += ["--device", "cuda"] if machine.startswith("GPU") else []
    words += ["--paper-scale"] if paper else []
    for key, value in settings.items():
        if key == "paper_scale" or key not in defaults or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, f"{value:g}" if isinstance(value, float)
                                               else str(value)]
    return " ".join(words + ["--out", out])


def migrate(path):
    old = json.load(open(path))
    if "script" in old:
        return False
    s, data_dir = old["settings"], os.path.abspath(os.path.join(ROOT, old["settings"]["data_dir"]))
    for key, value in CONSTANTS.items():
        assert s.pop(key, value) == value, (path, key)
    settings = {k: v for k, v in s.items() if k not in common.NOT_SETTINGS}
    results = {split: {k: v for k, v in old[split].items() if k != "targets"}
               for split in ("validation", "test") if split in old}
    checks = q2.checks_of(results)
    for split in results:  # the old targets, recomputed: every verdict the same
        held = {c["name"]: c["holds"] for c in checks}
        for name, met in old[split]["targets"].items():
            key = f"{split}: " + name.split(" >=")[0].split(" <=")[0]
            key = key.replace("identity from s", "identity from s / twin ceiling")
            assert held[key] == met, (path, key)
    timings = {}
    for key, seconds in old["timings"].items():
        timings[STAGES[key]] = round(timings.get(STAGES[key], 0) + seconds, 2)
    training = {("epochs" if k == "epochs_done" else k): v for k, v in old["training"].items()
                if k not in DROPPED_TRAINING}
    where = lambda p: "DATA_DIR/" + os.path.relpath(p, data_dir)  # noqa: E731
    out = os.path.relpath(os.path.dirname(path), ROOT)
    is_run = os.path.basename(os.path.dirname(out)) == "runs"
    new = {"script": q2.SCRIPT,
           "command": (implied_command(settings, old["machine"], out) if is_run
                       else "python q2_cyclevae.py --data-dir DATA_DIR"),
           "settings": settings, "machine": {"description": old["machine"]},
           "data": {**old["data"], "cache": where(old["data"]["cache"]),
                    "split_file": where(old["data"]["split_file"])},
           "timings": timings, "checks": checks, "results": results, "training": training}
    if is_run:
        new["command_source"] = ("derived from the settings by tools/migrate_q2.py (the "
                                 "command recorded with the run did not reproduce it)")
    if "swap_grids" in old:
        new["swap_grids"] = old["swap_grids"]
    text = json.dumps(new)
    assert '"/' not in text, f"{path} still holds an absolute path"
    common.write_json(path, new)
    return True


if __name__ == "__main__":
    folder = os.path.join(ROOT, "outputs", "q2")
    for path in [os.path.join(folder, "metrics.json")] + sorted(
            glob.glob(os.path.join(folder, "runs", "*", "metrics.json"))):
        print(f"{os.path.relpath(path, ROOT)}: {'migrated' if migrate(path) else 'already done'}")
