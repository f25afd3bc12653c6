"""What the four question scripts share: gradient reversal, t-SNE and classification metrics; the
run around them (flags, one-sentence errors, atomic files, checkpoints, resume); MNIST and
downloads; and metrics.json with its --eval-only comparison and --report-only template.

Importing this module changes no global state (run_cli selects matplotlib's Agg backend).
"""
import argparse
import errno
import glob
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

# Gradient reversal (Ganin et al. 2016, Section 3.1): identity forward, -lambda * grad back.
class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.lambda_ * grad_output, None

def grad_reverse(x, lambda_=1.0):
    return GradientReversal.apply(x, lambda_)

# Classification metrics and t-SNE
def classification_metrics(y_true, y_pred, class_names=None):
    """Accuracy, confusion matrix (rows true, columns predicted), per-class precision, recall,
    F1 and support, and their macro averages, as JSON-ready numbers."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = (np.arange(len(class_names)) if class_names is not None
              else np.unique(np.concatenate([y_true, y_pred])))
    names = [str(n) for n in (class_names if class_names is not None else labels)]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {"accuracy": float(np.mean(y_true == y_pred)), "n": int(len(y_true)),
            "class_names": names,
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
            "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                                 "support": int(s)}
                          for name, p, r, f, s in zip(names, precision, recall, f1, support)},
            "macro_precision": float(np.mean(precision)), "macro_recall": float(np.mean(recall)),
            "macro_f1": float(np.mean(f1))}

def plot_confusion_matrix(metrics, path, title="Confusion matrix"):
    cm, names = np.array(metrics["confusion_matrix"]), metrics["class_names"]
    fig, ax = plt.subplots(figsize=(0.55 * len(names) + 2.5, 0.55 * len(names) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (accuracy {metrics['accuracy']:.4f})")
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > cm.max() / 2 else "black")
    save_figure(fig, path)

def metrics_table(metrics):
    """Markdown table of per-class precision, recall, F1 and the macro averages."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | "
              f"{m['support']} |" for name, m in metrics["per_class"].items()]
    lines.append(f"| **macro** | {metrics['macro_precision']:.4f} | "
                 f"{metrics['macro_recall']:.4f} | {metrics['macro_f1']:.4f} | {metrics['n']} |")
    return "\n".join(lines)

TSNE_POINTS = 2000

def tsne_embed(features, seed=0):
    """2-D t-SNE (scikit-learn, PCA init, perplexity 30 or less for few points)."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                max_iter=1000).fit_transform(features)

def subsample(n, size, seed=0):
    """Sorted indices of a fixed random subsample of `size` out of `n` (all when size >= n)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))

def scatter_by_label(ax, embedding, labels, names=None, colors=None, title=None, size=6):
    labels = np.asarray(labels)
    values = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
    for k, value in enumerate(values):
        at = labels == value
        ax.scatter(embedding[at, 0], embedding[at, 1], s=size, alpha=0.8, linewidths=0,
                   color=colors[k] if colors is not None else cmap(k % cmap.N),
                   label=names[int(value)] if names is not None else str(value))
    ax.legend(markerscale=2.5, fontsize=7, loc="best", framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)

def plot_tsne(features, labels, path, names=None, colors=None, title="t-SNE",
              n_points=TSNE_POINTS, seed=0):
    """t-SNE of a fixed random subsample, coloured by label, saved to `path`."""
    index = subsample(len(features), n_points, seed)
    embedding = tsne_embed(np.asarray(features)[index], seed)
    fig, ax = plt.subplots(figsize=(6.5, 6))
    scatter_by_label(ax, embedding, np.asarray(labels)[index], names, colors,
                     f"{title} ({len(index)} points)")
    save_figure(fig, path)
    return embedding, index

def image_grid(images, nrow, pad=2, pad_value=1.0):
    """(N,C,H,W) floats in [0,1] -> an (H', W'[, C]) array for imshow, nrow images a row."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().cpu().float(), nrow=nrow, padding=pad, pad_value=pad_value)
    grid = grid.clamp(0, 1).permute(1, 2, 0).numpy()
    return grid[:, :, 0] if images.shape[1] == 1 else grid

# The command line: flags, one-sentence errors, Ctrl-C as one line
class UserError(Exception):
    """Something a user can act on: the message is the whole story (exit code 2)."""


_run = {"note": "nothing was saved", "started": time.perf_counter()}

def note_saved(text):
    """What an interruption or a NaN stop leaves behind, e.g. "epoch 3 is saved in ..."."""
    _run["note"] = text

def _interrupt(signum, frame):
    raise KeyboardInterrupt

def run_cli(main, argv=None):
    """Run main(argv): a UserError prints one sentence (exit 2), a full disk one sentence naming
    the folder (exit 2), Ctrl-C or SIGTERM what was saved (exit 130)."""
    matplotlib.use("Agg")
    note_saved("nothing was saved")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        folder = os.path.dirname(os.path.abspath(error.filename or "."))
        print(f"error: the disk is full (writing in {folder}); {_run['note']}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_run['note']}", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)

def _number_type(cast, test, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not np.isfinite(value) or not test(value):
            raise ValueError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse shows it in "invalid <name> value"
    return parse

positive_int = _number_type(int, lambda v: v > 0, "a positive integer")
positive_float = _number_type(float, lambda v: v > 0, "a positive number")
nonnegative_float = _number_type(float, lambda v: v >= 0, "a non-negative number")
seed_type = _number_type(int, lambda v: 0 <= v < 2**32, "seed (an integer from 0 to 2**32-1)")

def add_common_args(parser, out_default, seed_default=0, data_dir=True, resume=True):
    parser.add_argument("--seed", type=seed_type, default=seed_default)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto takes cuda when there is one")
    if data_dir:
        parser.add_argument("--data-dir", default="./data", help="dataset folder")
    parser.add_argument("--out", default=out_default, help="output folder")
    if resume:
        parser.add_argument("--resume", action="store_true",
                            help="continue the interrupted run in --out (same settings, data)")
    parser.add_argument("--eval-only", action="store_true",
                        help="recompute every number from the saved weights into <out>/eval/ "
                             "and compare them with <out>/metrics.json")
    parser.add_argument("--report-only", action="store_true",
                        help="render <out>/report.md from <out>/metrics.json alone")

MODES = ("resume", "eval_only", "report_only", "download_only")
NOT_SETTINGS = MODES + ("out", "device", "data_dir", "weights", "given", "no_download")

def parse(parser, argv=None):
    """Parse once: two modes together are an argparse error; args.given holds what was typed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    modes = [m for m in MODES if getattr(args, m, False)]
    if len(modes) > 1:
        parser.error(" and ".join("--" + m.replace("_", "-") for m in modes)
                     + " exclude each other")
    unset = object()  # argparse fills in a default only where the namespace has no value
    typed = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    args.given = {key for key, value in vars(typed).items() if value is not unset}
    _run["started"] = time.perf_counter()
    return args


def settings_of(args, exclude=()):
    """The flags that decide what a run computes."""
    skip = set(NOT_SETTINGS) | set(exclude)
    return {key: value for key, value in vars(args).items() if key not in skip}


def prepare_out(path, flag="--out"):
    """Create the output folder and check it can be written, before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder; give a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(f"{flag} {path} cannot be written ({error.strerror or error}); "
                        f"give a folder you can write to") from None
    return path

def data_folder(path, flag="--data-dir"):
    """A data folder that is a file is one sentence, before anything reads or downloads."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder; give the data folder")
    return path

def choose_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; "
                        "use --device cpu or auto")
    return torch.device(name)

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def check_finite(loss, what="loss"):
    """Stop training with a true message when a loss is NaN or infinite."""
    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    if not np.isfinite(value):
        raise UserError(f"the {what} became {value}; training stopped; {_run['note']}")
    return value

# Files: every one written atomically
def atomic_write(path, write):
    """write(tmp), then rename it over `path`: a file is either as it was or complete."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files readable by the owner only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)

def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")

def read_json(path, what="file"):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{what} {path} is not readable JSON ({error})") from None

def save_figure(fig, path, dpi=120):
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi,
                                                   bbox_inches="tight"))
    finally:
        plt.close(fig)

def save_checkpoint(path, kind, hparams, model, **extra):
    """The weights with `kind` (which script and model) and the hyper-parameters that rebuild it."""
    state = {"kind": kind, "hparams": dict(hparams),
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    atomic_write(path, lambda tmp: torch.save(state, tmp))

def _load(path, what):
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder; give the .pt file inside it")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        raise UserError(f"{what} {path} is truncated or not a PyTorch checkpoint") from None

def load_checkpoint(path, kinds):
    """A checkpoint of save_checkpoint whose kind is one of `kinds`, or one sentence."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    state = _load(path, "weights file")
    if not isinstance(state, dict) or "kind" not in state or "model" not in state:
        raise UserError(f"weights file {path} was not written by this project's scripts")
    if state["kind"] not in kinds:
        raise UserError(f"weights file {path} holds a '{state['kind']}' model, "
                        f"not {' or '.join(repr(k) for k in kinds)}")
    return state

def load_weights(model, state, path):
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"weights file {path} does not fit this architecture ({first})") from None
    return model

# Resume: one training-state file holds the settings, the data's fingerprint, the RNG states
def fingerprint(*arrays):
    """Sizes and a hash of every 997th byte of each array: which data a run trains on."""
    digest, shapes = hashlib.md5(), []
    for array in arrays:
        array = array.cpu().numpy() if torch.is_tensor(array) else np.asarray(array)
        shapes.append("x".join(map(str, array.shape)))
        digest.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1)[::997].tobytes())
    return f"{'+'.join(shapes)}:{digest.hexdigest()[:12]}"

def _rng_states():
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states

def save_training_state(path, settings, data=None, finished=False, **state):
    """What a run needs to continue exactly: settings, data fingerprint, RNG states, `state`."""
    full = {"settings": dict(settings), "data": data, "finished": finished,
            "rng": _rng_states(), **state}
    atomic_write(path, lambda tmp: torch.save(full, tmp))

def _flag(key):
    return "--" + key.replace("_", "-")

def load_training_state(path, args, data):
    """The state for --resume: the settings not given are taken from it; a given one that
    differs, other data (`data`: its fingerprint) or a finished run is one sentence. Restores
    the RNG states."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: there is no interrupted run to continue ({path} does not "
                        f"exist); run without --resume to start one")
    state = _load(path, "--resume: the training state")
    if not isinstance(state, dict) or not {"settings", "rng"} <= set(state):
        raise UserError(f"--resume: {path} was not written by this script's training loop")
    if state.get("finished") is True:
        raise UserError(f"--resume: the run in {path} is finished; nothing was changed")
    stored = state["settings"]
    differ = [f"{_flag(key)} {getattr(args, key)} (the run has {value})"
              for key, value in stored.items()
              if key in args.given and getattr(args, key, value) != value]
    if differ:
        raise UserError(f"--resume: the run in {path} was started with other settings: "
                        f"{'; '.join(differ)}; drop these flags to continue it, or start a new "
                        f"run in another --out")
    if state.get("data") != data:
        raise UserError(f"--resume: the run in {path} trained on other data ({state['data']}, "
                        f"now {data}); give the data it started with")
    for key, value in stored.items():
        setattr(args, key, value)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state

# metrics.json: one layout for all four scripts
@contextmanager
def stage(timings, name):
    """Seconds of a stage (data, training, evaluation, figures) into timings[name]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0) + time.perf_counter() - start, 2)

def portable(word, name="DATA_DIR"):
    """A path as a committed file may hold it: relative inside the working folder, else `name`."""
    here, full = os.getcwd(), os.path.abspath(word)
    if full == here or full.startswith(here + os.sep):
        return os.path.relpath(full)
    return name

def shown_command(command):
    """A command with every path outside the working folder written as its flag, e.g. DATA_DIR."""
    words = command.split(" ")
    for i, word in enumerate(words[1:], 1):
        if word.startswith("-") or not (os.path.isabs(word) or word.startswith("..")):
            continue
        flag = words[i - 1]
        words[i] = portable(word, flag.lstrip("-").replace("-", "_").upper()
                            if flag.startswith("--") else "PATH")
    return " ".join(words)

def command_line():
    return shown_command(" ".join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]]))

def machine_info(device=None):
    """CPU model, cores, PyTorch threads and version, GPU if used, and one line for reports."""
    import platform

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if "model name" in line), cpu)
    threads = torch.get_num_threads()
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "description": f"CPU: {os.cpu_count()} cores ({cpu}), "
            f"{threads} PyTorch thread{'s' if threads > 1 else ''}"}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["description"] = f"GPU: {info['gpu']}"
    return info

def check(name, value, threshold, holds):
    """A judgement where its number is measured, e.g. ("negative ELBO", 96.2, "<= 100", True)."""
    return {"name": name, "value": value, "threshold": threshold, "holds": bool(holds)}

def record(script, args, device, data, timings, checks, results, **extra):
    """metrics.json of a run: what ran, on what, how long, its checks and its results."""
    timings = {**timings, "total": round(time.perf_counter() - _run["started"], 1)}
    return {"script": script, "command": command_line(), "settings": settings_of(args),
            "machine": machine_info(device),
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "data": data, "timings": timings, "checks": checks, "results": results, **extra}

def read_metrics(path, script):
    """A metrics.json written by `script`, or one sentence naming the file."""
    metrics = read_json(path, "metrics file")
    if not isinstance(metrics, dict) or metrics.get("script") != script:
        other = metrics.get("script", "another program") if isinstance(metrics, dict) else None
        raise UserError(f"metrics file {path} was written by {other or 'another program'}, "
                        f"not {script}")
    missing = [key for key in ("settings", "checks", "results") if key not in metrics]
    if missing:
        raise UserError(f"metrics file {path} lacks {', '.join(missing)}; it is not a "
                        f"complete run of {script}")
    return metrics

def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items()
                for k, v in _numbers(value, f"{prefix}{key}.").items()}
    if isinstance(tree, bool):
        return {prefix[:-1]: int(tree)}
    if isinstance(tree, (int, float)):
        return {prefix[:-1]: tree}
    return {}

def comparable(metrics):
    """The numbers --eval-only recomputes: the results and each check's value and verdict."""
    checks = {c["name"]: {"value": c["value"], "holds": c["holds"]} for c in metrics["checks"]}
    return _numbers({"results": metrics["results"], "checks": checks})

def compare_with_committed(recomputed, committed, eval_dir, tolerances=None):
    """Each committed number beside its recomputed value (a number not recomputed counts as not
    reproduced); eval_dir/comparison.json. tolerances: {key prefix: (absolute tolerance,
    reason)} for numbers that refit something and may differ on another machine."""
    new, old = comparable(recomputed), comparable(committed)
    if not set(new) & set(old):
        raise UserError("--eval-only: the saved metrics.json holds none of the numbers this "
                        "evaluation computes; nothing was verified")
    rows = []
    for name in sorted(old):
        tol, reason = next(((t, r) for p, (t, r) in (tolerances or {}).items()
                            if name.startswith(p)), (1e-9 + 1e-6 * abs(old[name]), "exact"))
        value = new.get(name)
        same = value is not None and abs(value - old[name]) <= tol
        rows.append({"name": name, "recomputed": value, "committed": old[name],
                     "tolerance": tol, "why": reason, "reproduced": bool(same)})
        verdict = ("not recomputed" if value is None else "reproduced" if same else
                   f"differs by {value - old[name]:+.6g}")
        shown = "-" if value is None else f"{value:.6g}"
        print(f"  {name:<52} {shown:<12} (committed {old[name]:<12.6g}) {verdict}")
    reproduced = sum(row["reproduced"] for row in rows)
    print(f"{reproduced} of {len(rows)} numbers reproduced the committed metrics.json")
    write_json(os.path.join(eval_dir, "comparison.json"),
               {"reproduced": reproduced, "compared": len(rows), "rows": rows})
    return rows

# report.md: a Markdown template filled from metrics.json
def fill(template, metrics, **derived):
    return template.format_map({**metrics, **derived})

def _shown(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

def checks_table(checks):
    lines = ["| check | value | threshold | holds |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {_shown(c['value'])} | {c['threshold']} | "
              f"{'**yes**' if c['holds'] else 'no'} |" for c in checks]
    return "\n".join(lines)

def lookup(metrics, key):
    """metrics["a"]["b"] for key "a.b"; None where the run has no such number."""
    for part in key.split("."):
        if not isinstance(metrics, dict) or part not in metrics:
            return None
        metrics = metrics[part]
    return metrics

def runs_table(out, script, columns):
    """Markdown table of <out>/runs/*/metrics.json: name, command, then (header, key, format)."""
    paths = sorted(glob.glob(os.path.join(out, "runs", "*", "metrics.json")))
    if not paths:
        return ""
    lines = ["| run | command | " + " | ".join(h for h, _, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for path in paths:
        run = read_metrics(path, script)
        cells = [fmt.format(value) if (value := lookup(run, key)) is not None else "-"
                 for _, key, fmt in columns]
        lines.append(f"| {os.path.basename(os.path.dirname(path))} | `{run['command']}` | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)

def report_only(out, script, render):
    """--report-only: <out>/report.md = render(metrics, out) from <out>/metrics.json alone."""
    path = os.path.join(out, "metrics.json")
    metrics = read_metrics(path, script)
    try:
        text = render(metrics, out)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise UserError(f"metrics file {path} lacks {error} or holds it in another form; it was "
                        f"not written by this version of {script}") from None
    write_text(os.path.join(out, "report.md"), text)
    print(f"wrote {os.path.join(out, 'report.md')}")
    return text

# Downloads (sources tried in order) and MNIST through torchvision
DOWNLOAD_TIMEOUT = 30  # seconds without an answer before a source counts as down

def _reason(error):
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"unreachable ({error.reason})"
    return str(error) or type(error).__name__

def _check_download(path, size, md5, check):
    from torchvision.datasets.utils import calculate_md5

    if size is not None and os.path.getsize(path) != size:
        raise ValueError(f"the connection closed after {os.path.getsize(path):,} of "
                         f"{size:,} bytes")
    if md5 is not None and calculate_md5(path) != md5:
        raise ValueError(f"checksum mismatch (md5 {calculate_md5(path)}, expected {md5})")
    if check is not None:
        check(path)

def download_first(sources, folder, filename, md5=None, check=None, offline_hint=""):
    """`filename` in `folder`, fetched from the first source that works with torchvision's
    download_url (a tqdm bar); each download is checked (announced size, md5, check(path)
    raising ValueError) under a temporary name before it is moved into place."""
    from torchvision.datasets.utils import download_url

    final = os.path.join(folder, filename)
    if os.path.isfile(final):
        try:
            _check_download(final, None, md5, check)
            return final
        except ValueError as error:
            print(f"{final}: {error}; fetching it again", file=sys.stderr)
    os.makedirs(folder, exist_ok=True)
    part = os.path.join(folder, f".part-{filename}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        for url in sources:
            print(f"fetching {filename} from {url}", flush=True)
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
                    page = "html" in r.headers.get("Content-Type", "")  # a page before the file
                    size = None if page else r.headers.get("Content-Length")
                download_url(url, folder, filename=os.path.basename(part))
                _check_download(part, int(size) if size and size.isdigit() else None, md5, check)
                os.replace(part, final)
                return final
            except Exception as error:  # any failure of one source: say why, try the next
                print(f"  {url}: {_reason(error)}", file=sys.stderr, flush=True)
            finally:
                if os.path.exists(part):
                    os.remove(part)
    finally:
        socket.setdefaulttimeout(previous)
    raise UserError(f"{filename} could not be downloaded from any of its {len(sources)} "
                    f"sources ({', '.join(sources)}); {offline_hint}".rstrip("; "))

def extract(archive, dest):
    from torchvision.datasets.utils import extract_archive

    try:
        return extract_archive(archive, dest)
    except Exception as error:
        raise UserError(f"the archive {archive} could not be unpacked ({_reason(error)}); "
                        f"delete it and run again") from None

def _mnist_split(data_dir, train, download):
    from torchvision.datasets import MNIST

    raw = os.path.join(data_dir, "MNIST", "raw")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        dataset = MNIST(data_dir, train=train, download=download)
    except RuntimeError as error:
        detail = " ".join(str(error).split()) if download else "downloads are off"
        files = ", ".join(name[:-3] for name, _ in MNIST.resources)
        raise UserError(f"MNIST is missing or incomplete in {raw}/ ({detail}); put the files "
                        f"{files} (or their .gz) there") from None
    except Exception as error:
        raise UserError(f"MNIST in {raw}/ is not readable ({_reason(error)}); replace its "
                        f"files with the originals") from None
    finally:
        socket.setdefaulttimeout(previous)
    images, labels = dataset.data, dataset.targets
    prefix = "train" if train else "t10k"
    images_file, labels_file = (os.path.join(raw, f"{prefix}-{kind}") for kind in
                                ("images-idx3-ubyte", "labels-idx1-ubyte"))
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (28, 28):
        raise UserError(f"MNIST file {images_file} holds {images.dtype} data of shape "
                        f"{tuple(images.shape)}, not 28x28 uint8 images; replace it")
    if len(images) != len(labels):
        raise UserError(f"MNIST file {images_file} holds {len(images)} images but "
                        f"{labels_file} holds {len(labels)} labels; replace them")
    if len(labels) and int(labels.max()) > 9:
        raise UserError(f"MNIST file {labels_file} holds the label {int(labels.max())}, "
                        f"outside 0-9; replace it with the original")
    return images, labels.long()

def load_mnist(data_dir, download=True):
    """((train_images, train_labels), (test_images, test_labels)): uint8 (N,28,28) and int64,
    through torchvision.datasets.MNIST (its mirrors, md5s and progress bar)."""
    data_folder(data_dir)
    return _mnist_split(data_dir, True, download), _mnist_split(data_dir, False, download)



# make verify: every committed number recomputed from the committed weights
QUESTIONS = {"Q1": ("q1_vae.py", "q1"), "Q2": ("q2_cyclevae.py", "q2"),
             "Q3.1": ("q3_toy_dann.py", "q3_toy"), "Q3.2": ("q3_mnistm_dann.py", "q3_mnistm")}
DRAWS_ITS_DATA = ("q3_toy_dann.py",)  # takes no --data-dir

def _evaluate(script, out, args):
    """Run `script --eval-only` on the run in `out`: (comparison rows, None) or (None, why)."""
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script),
               "--eval-only", "--out", out, "--device", args.device]
    if script not in DRAWS_ITS_DATA:
        command += ["--data-dir", args.data_dir]
    comparison = os.path.join(out, "eval", "comparison.json")
    if os.path.exists(comparison):
        os.remove(comparison)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no message").splitlines()
        return None, (done.returncode, lines[-1])
    return read_json(comparison, "comparison file")["rows"], None

def verify(argv=None):
    """Exit 0 when every committed number is reproduced, 1 when one differs, 2 when data or
    weights are missing."""
    parser = argparse.ArgumentParser(prog="python common.py", description="Recompute every "
                                     "number of the committed runs from their weights.")
    parser.add_argument("--data-dir", default="./data", help="dataset folder")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--outputs", default="outputs", help="folder of the committed runs")
    parser.add_argument("--questions", nargs="+", choices=list(QUESTIONS), default=list(QUESTIONS))
    args = parser.parse_args(argv)
    table, failed = ["| question | number | committed | recomputed | tolerance | reproduced |",
                     "|---|---|---|---|---|---|"], []
    reasons = {}
    for question in args.questions:
        script, folder = QUESTIONS[question]
        started = time.perf_counter()
        rows, error = _evaluate(script, os.path.join(args.outputs, folder), args)
        seconds = time.perf_counter() - started
        if error:
            failed.append(error[0])
            print(f"{question} ({script}) was not verified: {error[1]}", flush=True)
            committed = os.path.join(args.outputs, folder, "metrics.json")
            if os.path.isfile(committed):  # its numbers count as not reproduced
                table += [f"| {question} | {name} | {value:.6g} | - | - | **no** |" for name, value
                          in sorted(comparable(read_json(committed, "metrics file")).items())]
            continue
        print(f"{question} ({script}): {sum(r['reproduced'] for r in rows)} of {len(rows)} "
              f"reproduced in {seconds:.0f} s", flush=True)
        table += [f"| {question} | {r['name']} | {r['committed']:.6g} | "
                  f"{'-' if r['recomputed'] is None else format(r['recomputed'], '.6g')} | "
                  f"{'exact' if r['why'] == 'exact' else format(r['tolerance'], 'g')} | "
                  f"{'yes' if r['reproduced'] else '**no**'} |" for r in rows]
        reasons.update({(question, r["why"]): r["tolerance"] for r in rows if r["why"] != "exact"})
    rows = table[2:]
    reproduced = sum(line.endswith("| yes |") for line in rows)
    print("\n".join(table))
    for (question, why), tolerance in reasons.items():
        print(f"{question}: within {tolerance:g}, not exactly: {why}")
    print(f"{reproduced} of {len(rows)} committed numbers reproduced"
          + (f"; {len(failed)} question(s) not verified" if failed else ""))
    return 2 if 2 in failed else 1 if failed or reproduced < len(rows) else 0


if __name__ == "__main__":
    sys.exit(verify())
