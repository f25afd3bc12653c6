"""Bring outputs/q3_mnistm/metrics.json and outputs/q3_mnistm/runs/*/metrics.json to the one
metrics.json layout (script, command, settings, machine, data, timings, checks, results). Renames
and moves keys, writes machine paths as DATA_DIR / CACHE_DIR, adds the checks of
q3_mnistm_dann.checks_of; changes no number (checked below). Idempotent.

    python tools/migrate_mnistm.py

Dropped: the settings that became constants (seeds 1, lr 0.01, momentum 0.9, mnistm_seed 0,
also in data), the mode flags of the settings (all false), "resumed" (false), and "summary" (a
mean, std 0 and n 1 over the one seed of each model: its values are the results).
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import q3_mnistm_dann as q3  # noqa: E402

CONSTANTS = {"seeds": 1, "lr": q3.LR, "momentum": q3.MOMENTUM, "mnistm_seed": q3.MNISTM_SEED,
             "weights": None}
STAGES = {"data_seconds": "data", "training_seconds": "training",
          "test_evaluation_seconds": "evaluation", "figures_seconds": "figures",
          "total_seconds": "total"}
DROPPED = ("resumed", "summary", "data.mnistm_seed") + tuple(  # and the mode flags (false)
    f"settings.{key}" for key in (*CONSTANTS, *common.NOT_SETTINGS))


def numbers(tree, prefix=""):
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in numbers(v, f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [n for i, v in enumerate(tree) for n in numbers(v, f"{prefix}{i}.")]
    if isinstance(tree, (bool, int, float)) and tree is not None:
        return [(prefix[:-1], tree)]
    return []


def migrate(path):
    old = json.load(open(path))
    if "script" in old:
        return False
    s = dict(old["settings"])
    for key, value in CONSTANTS.items():
        assert s.pop(key, value) == value, (path, key)
    settings = {k: v for k, v in s.items() if k not in common.NOT_SETTINGS}
    for key in q3.WHERE:
        if settings.get(key):
            settings[key] = common.portable(settings[key], key.upper())
    data_dir = old["settings"]["data_dir"]
    data = {k: v for k, v in old["data"].items() if k != "mnistm_seed"}
    assert old["data"].get("mnistm_seed", 0) == q3.MNISTM_SEED
    data["bsds_dir"] = "DATA_DIR/" + os.path.relpath(data["bsds_dir"], data_dir)
    data["cache"] = "CACHE_DIR/MNIST-M/" + os.path.basename(data["cache"])
    data["warnings"] = [] if data["bsds_matches_official_release"] else None
    assert data["warnings"] is not None, "an unofficial BSDS500 needs its warning sentence"
    results = {"softmax": {r["model"]: {"mnist_test": r["mnist_test_accuracy"],
                                        "mnistm_test": r["mnistm_test_accuracy"]}
                           for r in old["runs"]}}
    if all("svm_mnistm_test_accuracy" in r for r in old["runs"]):
        results["svm"] = {r["model"]: {"mnist_test": r["svm_mnist_test_accuracy"],
                                       "mnistm_test": r["svm_mnistm_test_accuracy"]}
                          for r in old["runs"]}
    results["figure5_domain_knn_accuracy"] = old["figure5_domain_knn_accuracy"]
    training = {r["model"]: r["training"] for r in old["runs"]}
    assert all(r["seed"] == old["settings"]["seed"] for r in old["runs"])
    new = {"script": q3.SCRIPT, "command": common.shown_command(old["command"]),
           "settings": settings, "machine": old["machine"], "data": data,
           "timings": {STAGES[k]: v for k, v in old["timings"].items()},
           "checks": q3.checks_of(results, training, data), "results": results,
           "training": training, "pixel_mean": old["pixel_mean"]}
    kept = {value for key, value in numbers(new)}
    lost = [(key, value) for key, value in numbers(old)
            if not key.startswith(DROPPED) and value not in kept]
    assert not lost, (path, lost[:5])
    assert '"/' not in json.dumps(new), f"{path} still holds an absolute path"
    common.write_json(path, new)
    return True


if __name__ == "__main__":
    os.chdir(ROOT)  # paths inside the working folder are written relative to it
    folder = os.path.join("outputs", "q3_mnistm")
    for path in [os.path.join(folder, "metrics.json")] + sorted(
            glob.glob(os.path.join(folder, "runs", "*", "metrics.json"))):
        print(f"{path}: {'migrated' if migrate(path) else 'already done'}")
