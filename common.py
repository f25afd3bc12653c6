"""What the four question scripts share: gradient reversal, t-SNE plots, classification
metrics, MNIST loading, device choice, seeding, atomic checkpoints and one-sentence errors.

Every script imports this module and nothing else of the project.
"""
import json
import os
import random
import socket
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# ---------------------------------------------------------------------------------------
# Errors a user can act on: one sentence, exit code 2, no traceback.
# ---------------------------------------------------------------------------------------
class UserError(Exception):
    """Missing data, bad weights, NaN loss: the message is the whole story for the user."""


def run_cli(main):
    """Run `main()` and turn a UserError into one line on stderr and exit code 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------
# argparse types: a bad value is an argparse error, not a crash later.
# ---------------------------------------------------------------------------------------
def _number_type(cast, test, what):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not np.isfinite(value) or not test(value):
            raise ValueError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse shows this name in "invalid <name> value"
    return parse


positive_int = _number_type(int, lambda v: v > 0, "a positive integer")
positive_float = _number_type(float, lambda v: v > 0, "a positive number")
nonnegative_float = _number_type(float, lambda v: v >= 0, "a non-negative number")
finite_float = _number_type(float, lambda v: True, "a finite number")


def add_common_args(parser, out_default, seed_default=0, data_dir=True):
    """The flags every script has: --seed, --device, --data-dir (unless the data are
    generated), --out."""
    parser.add_argument("--seed", type=int, default=seed_default,
                        help="random seed (default %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto picks cuda when available (default %(default)s)")
    if data_dir:
        parser.add_argument("--data-dir", default="./data",
                            help="dataset folder (default %(default)s)")
    parser.add_argument("--out", default=out_default, help="output folder (default %(default)s)")


# ---------------------------------------------------------------------------------------
# Device and seeding
# ---------------------------------------------------------------------------------------
def choose_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; "
                        "use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed):
    """Same seed, same numbers on the CPU (GPU kernels may still differ in the last bits)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Gradient reversal (Ganin et al. 2016): identity forward, gradient * -lambda backward.
# ---------------------------------------------------------------------------------------
class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.lambda_ * grad_output, None


def grad_reverse(x, lambda_=1.0):
    """Identity on the way forward; multiplies the incoming gradient by -lambda_ on the way back."""
    return GradientReversal.apply(x, lambda_)


# ---------------------------------------------------------------------------------------
# MNIST (Questions 1 and 3.2): torchvision's layout, loaded once into uint8 tensors.
# ---------------------------------------------------------------------------------------
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def load_mnist(data_dir, download=True):
    """Return ((train_images, train_labels), (test_images, test_labels)) as uint8 (N,28,28)
    and int64 (N,) tensors. Downloads (torchvision checks the md5 sums) when the files are
    missing and `download` is true; otherwise, or when the download fails, a UserError says
    which four files to put where."""
    from torchvision.datasets import MNIST

    raw = os.path.join(os.path.abspath(data_dir), "MNIST", "raw")
    present = all(os.path.exists(os.path.join(raw, f)) for f in MNIST_FILES)
    if not present and download:
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # an unreachable mirror must not hang the run
        try:
            MNIST(data_dir, train=True, download=True)
            MNIST(data_dir, train=False, download=True)
        except Exception:  # no network, mirror down or checksum mismatch: say what to do
            pass
        finally:
            socket.setdefaulttimeout(previous_timeout)
        present = all(os.path.exists(os.path.join(raw, f)) for f in MNIST_FILES)
    if not present:
        raise UserError(f"MNIST is missing and could not be downloaded: put the four files "
                        f"{', '.join(MNIST_FILES)} (or their .gz) into {raw}/")
    try:
        train = MNIST(data_dir, train=True, download=False)
        test = MNIST(data_dir, train=False, download=False)
    except Exception as error:
        raise UserError(f"the MNIST files in {raw}/ could not be read ({error})") from None
    return (train.data, train.targets), (test.data, test.targets)


# ---------------------------------------------------------------------------------------
# Checkpoints: atomic writes, hyper-parameters stored next to the weights.
# ---------------------------------------------------------------------------------------
def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: an interrupted run never leaves a
    half-written file behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, kind, hparams, model, **extra):
    """Save `model`'s weights with `kind` (which script and model made it), the
    hyper-parameters that rebuild it, and anything else (optimizer state, epoch, history)."""
    state = {"kind": kind, "hparams": dict(hparams),
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, kinds):
    """Read a checkpoint written by save_checkpoint and check its kind is one of `kinds`
    (a string or a tuple). Every way it can be wrong is one UserError sentence."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        raise UserError(f"weights file {path} is truncated or not a PyTorch checkpoint") from None
    if not isinstance(state, dict) or "kind" not in state or "model" not in state:
        raise UserError(f"weights file {path} was not written by this project's scripts")
    if state["kind"] not in kinds:
        raise UserError(f"weights file {path} holds a '{state['kind']}' model, "
                        f"not {' or '.join(repr(k) for k in kinds)}")
    return state


def load_weights(model, state, path):
    """Load state['model'] into `model`, with one sentence when the architecture differs."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"weights file {path} does not fit this architecture ({first})") from None
    return model


def check_finite(loss, what="loss"):
    """Stop training with a message when a loss is NaN or infinite."""
    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    if not np.isfinite(value):
        raise UserError(f"the {what} became {value}; training stopped, the last good "
                        f"checkpoint is kept (try a smaller --lr)")
    return value


# ---------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------
def write_json(path, obj):
    atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(obj, indent=2) + "\n"))


def write_text(path, text):
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def save_figure(fig, path, dpi=120):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def machine_info(device=None):
    """What the numbers were measured on: CPU model, cores, PyTorch threads, GPU if used,
    and a one-line description for reports."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "platform": platform.platform(),
            "description": f"CPU: {os.cpu_count()} cores ({cpu}), {threads} PyTorch "
                           f"thread{'s' if threads > 1 else ''}"}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["description"] = f"GPU: {info['gpu']}"
    return info


def command_line():
    """The command that is running, to store beside every number it produced."""
    return "python " + " ".join(sys.argv)


@contextmanager
def stage(timings, name):
    """Record the wall time of a named stage in `timings` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 2)


def image_grid(images, nrow, pad=2, pad_value=1.0):
    """(N,C,H,W) float in [0,1] -> (H', W', C) numpy array for imshow, nrow images a row."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().cpu().float(), nrow=nrow, padding=pad, pad_value=pad_value)
    grid = grid.clamp(0, 1).permute(1, 2, 0).numpy()
    return grid[:, :, 0] if images.shape[1] == 1 else grid


# ---------------------------------------------------------------------------------------
# Classification metrics
# ---------------------------------------------------------------------------------------
def classification_metrics(y_true, y_pred, class_names=None):
    """Accuracy, confusion matrix (rows = true, columns = predicted), per-class precision,
    recall, F1 and support, and their macro averages, as plain JSON-ready numbers."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = np.unique(np.concatenate([y_true, y_pred]))
    if class_names is not None:
        labels = np.arange(len(class_names))
    names = [str(n) for n in (class_names if class_names is not None else labels)]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "n": int(len(y_true)),
        "class_names": names,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                             "support": int(s)}
                      for name, p, r, f, s in zip(names, precision, recall, f1, support)},
        "macro_precision": float(np.mean(precision)),
        "macro_recall": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
    }


def plot_confusion_matrix(metrics, path, title="Confusion matrix"):
    """Draw the confusion matrix of classification_metrics() with the counts in the cells."""
    cm = np.array(metrics["confusion_matrix"])
    names = metrics["class_names"]
    fig, ax = plt.subplots(figsize=(0.55 * len(names) + 2.5, 0.55 * len(names) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (accuracy {metrics['accuracy']:.4f})")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    save_figure(fig, path)


def metrics_table(metrics):
    """Markdown table of per-class precision, recall, F1 and the macro averages."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, m in metrics["per_class"].items():
        lines.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} "
                     f"| {m['support']} |")
    lines.append(f"| **macro** | {metrics['macro_precision']:.4f} | {metrics['macro_recall']:.4f} "
                 f"| {metrics['macro_f1']:.4f} | {metrics['n']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# t-SNE
# ---------------------------------------------------------------------------------------
TSNE_POINTS = 2000  # default subsample: t-SNE of 2,000 points takes ~10-20 s on two cores


def tsne_embed(features, seed=0):
    """2-D t-SNE (scikit-learn, PCA init, perplexity 30) of an (N, D) array."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                max_iter=1000).fit_transform(features)


def subsample(n, size, seed=0):
    """Indices of a fixed random subsample of `size` out of `n` (all of them if size >= n)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def scatter_by_label(ax, embedding, labels, names=None, colors=None, title=None, size=6):
    """Scatter 2-D points coloured by an integer label, with a legend naming each label:
    digit labels (names 0-9) or domain labels (names ["source", "target"], colors blue/red)."""
    labels = np.asarray(labels)
    values = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
    for k, value in enumerate(values):
        at = labels == value
        color = colors[k] if colors is not None else cmap(k % cmap.N)
        name = names[int(value)] if names is not None else str(value)
        ax.scatter(embedding[at, 0], embedding[at, 1], s=size, color=color, label=name,
                   alpha=0.8, linewidths=0)
    ax.legend(markerscale=2.5, fontsize=7, loc="best", framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)


def plot_tsne(features, labels, path, names=None, colors=None, title="t-SNE",
              n_points=TSNE_POINTS, seed=0):
    """t-SNE of a fixed random subsample of `n_points` rows, coloured by label; saved to
    `path`. Returns the embedding and the indices used."""
    index = subsample(len(features), n_points, seed)
    embedding = tsne_embed(np.asarray(features)[index], seed)
    fig, ax = plt.subplots(figsize=(6.5, 6))
    scatter_by_label(ax, embedding, np.asarray(labels)[index], names, colors,
                     f"{title} ({len(index)} points)")
    save_figure(fig, path)
    return embedding, index
