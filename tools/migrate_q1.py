"""Bring outputs/q1/metrics.json, outputs/q1/beta4/metrics.json and outputs/q1/runs/*/metrics.json
to the one metrics.json layout (script, command, settings, machine, timestamp, data, timings,
checks, results, training). Moves keys, adds the checks of q1_vae.checks_of, writes the data
folder as DATA_DIR; changes no number (checked below). Idempotent.

Dropped: "question" and "mode" (text), the setting svm_c (now the constant q1_vae.SVM_C; each
file's value is checked to equal it). The old timing stages are summed into the four stage
names (data; training; evaluation = test ELBO and KL per unit + latent means + SVM; figures =
samples and latent traversal + t-SNE and silhouette + progress and curves figures); "total" is
the old wall_seconds. kl_per_unit, a list, becomes {"z0": ..., ...} in the same order.

    python tools/migrate_q1.py
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import q1_vae as q1  # noqa: E402

STAGES = {"load MNIST": "data", "training": "training", "test ELBO and KL per unit": "evaluation",
          "latent means": "evaluation", "SVM": "evaluation",
          "samples and latent traversal": "figures", "t-SNE and silhouette": "figures",
          "progress and curves figures": "figures"}
RESULTS = ("test", "kl_per_unit", "active_units", "svm", "silhouette", "tsne_points")


def numbers(tree, prefix=""):
    """Every number of a JSON tree (lists included) by its path."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix[:-1]: tree} if isinstance(tree, (int, float)) else {}
    return {k: v for key, value in items for k, v in numbers(value, f"{prefix}{key}.").items()}


def migrate(path):
    old = json.load(open(path))
    if "script" in old:
        return False
    settings = dict(old["settings"])
    assert settings.pop("svm_c") == q1.SVM_C, path
    timings = {}
    for key, seconds in old["timings"].items():
        timings[STAGES[key]] = round(timings.get(STAGES[key], 0) + seconds, 2)
    timings["total"] = old["wall_seconds"]
    results = {key: old[key] for key in RESULTS}
    results["kl_per_unit"] = {f"z{j}": kl for j, kl in enumerate(old["kl_per_unit"])}
    new = {"script": q1.SCRIPT, "command": common.shown_command(old["command"]),
           "settings": settings, "machine": {"description": old["machine"], "torch": old["torch"]},
           "timestamp": old["timestamp"],
           "data": {"folder": "DATA_DIR/MNIST/raw", "train_images": old["n_train"],
                    "test_images": old["n_test"]},
           "timings": timings, "checks": q1.checks_of(results), "results": results,
           "training": {"history": old["history"], "progress": old["progress"]}}
    check(old, new, path)
    common.write_json(path, new)
    return True


def check(old, new, path):
    """Every old number under its new key; the timings as sums of their old stages."""
    moved = {"n_train": "data.train_images", "n_test": "data.test_images",
             "wall_seconds": "timings.total", "history": "training.history",
             "progress": "training.progress", "settings": "settings"}
    moved.update({key: "results." + key for key in RESULTS})
    was, now = numbers({k: v for k, v in old.items() if k != "timings"}), numbers(new)
    for key, value in was.items():
        if key == "settings.svm_c":
            continue
        head, _, rest = key.partition(".")
        target = moved[head] + ("." + rest if rest else "")
        if head == "kl_per_unit":
            target = f"results.kl_per_unit.z{rest}"
        assert now[target] == value, (path, key, target)
    for stage in set(STAGES.values()):
        parts = [s for k, s in old["timings"].items() if STAGES[k] == stage]
        assert abs(new["timings"][stage] - sum(parts)) < 0.006, (path, stage)
    assert '"/' not in json.dumps(new), f"{path} still holds an absolute path"


if __name__ == "__main__":
    folder = os.path.join(ROOT, "outputs", "q1")
    for path in [os.path.join(folder, "metrics.json"), os.path.join(folder, "beta4",
                                                                    "metrics.json")] + sorted(
            glob.glob(os.path.join(folder, "runs", "*", "metrics.json"))):
        print(f"{os.path.relpath(path, ROOT)}: {'migrated' if migrate(path) else 'already done'}")
