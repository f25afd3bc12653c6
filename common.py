"""What the four question scripts share: gradient reversal, t-SNE plots, classification
metrics, MNIST loading, downloads from several sources, device choice, seeding, atomic
checkpoints, one resume mechanism, reports rendered from metrics.json, and one-sentence errors.

Every script imports this module and nothing else of the project. Importing it changes no
global state (the Agg backend is selected by run_cli, when a script runs from the command line).
"""
import argparse
import glob
import gzip
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import torch

import matplotlib
import matplotlib.pyplot as plt


# ---------------------------------------------------------------------------------------
# Errors a user can act on: one sentence, exit code 2, no traceback.
# ---------------------------------------------------------------------------------------
class UserError(Exception):
    """Missing data, bad weights, NaN loss: the message is the whole story for the user."""


_saved = {"note": "nothing was saved"}


def note_saved(text):
    """Say what an interruption or a NaN stop leaves behind and how to go on, e.g. "epoch 3
    of 30 is saved in outputs/q1/training_state.pt; continue with --resume"."""
    _saved["note"] = text


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_cli(main, argv=None):
    """Run `main(argv)` as a command-line program: the Agg backend, and no traceback for what a
    user does. A UserError prints `error: <sentence>` on stderr (exit 2); Ctrl-C or SIGTERM at
    any stage prints `interrupted: <what was saved>` on stderr (exit 130)."""
    matplotlib.use("Agg")
    note_saved("nothing was saved")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        main() if argv is None else main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_saved['note']}", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


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
seed_type = _number_type(int, lambda v: 0 <= v < 2**32, "seed (an integer from 0 to 2**32-1)")


def add_common_args(parser, out_default, seed_default=0, data_dir=True):
    """The flags every script has: --seed, --device, --data-dir (unless the data are
    generated), --out, --resume, --eval-only, --report-only."""
    parser.add_argument("--seed", type=seed_type, default=seed_default,
                        help="random seed, 0 to 2**32-1 (default %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto picks cuda when available (default %(default)s)")
    if data_dir:
        parser.add_argument("--data-dir", default="./data",
                            help="dataset folder (default %(default)s)")
    parser.add_argument("--out", default=out_default, help="output folder (default %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run saved in --out; settings not given "
                             "are taken from it, settings given must match it")
    parser.add_argument("--eval-only", action="store_true",
                        help="recompute every number and figure from saved weights into "
                             "<out>/eval/ and compare them with the saved metrics.json")
    parser.add_argument("--report-only", action="store_true",
                        help="render <out>/report.md from <out>/metrics.json alone (no data, "
                             "no weights)")


def prepare_out(path, flag="--out"):
    """Create the output folder and check that it can be written, before any data is loaded
    or any step trained."""
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
# Downloads: each dataset has an ordered tuple of sources, tried in turn.
# ---------------------------------------------------------------------------------------
DOWNLOAD_TIMEOUT = 30  # seconds without an answer before a source counts as down


def _failure_reason(error):
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"unreachable ({error.reason})"
    return str(error) or type(error).__name__


def _content_length(url):
    """The size a source announces (None when it does not say); HTTP errors propagate."""
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
        length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _check_download(path, expected_size, md5, check):
    from torchvision.datasets.utils import calculate_md5

    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        raise ValueError(f"the connection closed after {size:,} of {expected_size:,} bytes")
    if md5 is not None and calculate_md5(path) != md5:
        raise ValueError(f"checksum mismatch (md5 {calculate_md5(path)}, expected {md5})")
    if check is not None:
        check(path)


def download_first(sources, folder, filename, md5=None, check=None, offline_hint=""):
    """Fetch `filename` into `folder` from the first of `sources` (URLs) that works, with
    torchvision's download_url (a tqdm bar with size and speed). Each download goes to a
    temporary name, is checked (announced size, `md5`, then `check(path)`, which raises
    ValueError with a reason), and only then moved into place; each failing source prints one
    line. When every source fails: one UserError naming them all and `offline_hint`.
    A file already in place that passes the checks is used as it is."""
    from torchvision.datasets.utils import download_url

    final = os.path.join(folder, filename)
    if os.path.isfile(final):
        try:
            _check_download(final, None, md5, check)
            return final
        except ValueError as error:
            print(f"{final}: {error}; fetching it again", file=sys.stderr)
            os.remove(final)
    os.makedirs(folder, exist_ok=True)
    part = os.path.join(folder, f".part-{filename}")
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        for url in sources:
            print(f"fetching {filename} from {url}", flush=True)
            try:
                expected_size = _content_length(url)
                download_url(url, folder, filename=os.path.basename(part))
                _check_download(part, expected_size, md5, check)
                os.replace(part, final)
                return final
            except Exception as error:  # any failure of one source: say why, try the next
                print(f"  {url}: {_failure_reason(error)}", file=sys.stderr, flush=True)
            finally:
                if os.path.exists(part):
                    os.remove(part)
    finally:
        socket.setdefaulttimeout(previous_timeout)
    raise UserError(f"{filename} could not be downloaded from any of its {len(sources)} "
                    f"sources ({', '.join(sources)}); {offline_hint}".rstrip("; "))


def extract(archive, dest):
    """Unpack a .tar.gz/.tgz/.zip/.gz archive into `dest` with torchvision's extract_archive."""
    from torchvision.datasets.utils import extract_archive

    try:
        return extract_archive(archive, dest)
    except Exception as error:
        raise UserError(f"the archive {archive} could not be unpacked ({_failure_reason(error)});"
                        f" delete it and run again") from None


# ---------------------------------------------------------------------------------------
# MNIST (Questions 1 and 3.2): torchvision's layout, loaded once into uint8 tensors.
# ---------------------------------------------------------------------------------------
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirrors
                 "http://yann.lecun.com/exdb/mnist/")
MNIST_GZ_MD5 = {"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"}


def _mnist_file(raw, name, download):
    """The path of one uncompressed MNIST file: as it is, unpacked from its .gz (present or
    downloaded from the first working mirror)."""
    path = os.path.join(raw, name)
    if os.path.isfile(path):
        return path
    gz = path + ".gz"
    if not os.path.isfile(gz):
        hint = (f"put the four files {', '.join(MNIST_FILES)} (or their .gz) into {raw}/")
        if not download:
            raise UserError(f"MNIST is missing ({path} does not exist); {hint}")
        download_first([mirror + name + ".gz" for mirror in MNIST_MIRRORS], raw, name + ".gz",
                       md5=MNIST_GZ_MD5[name], offline_hint=hint)

    def unpack(tmp):
        with gzip.open(gz, "rb") as source, open(tmp, "wb") as target:
            shutil.copyfileobj(source, target)

    try:
        atomic_write(path, unpack)
    except (OSError, EOFError) as error:
        raise UserError(f"MNIST file {gz} is not a readable gzip file ({error}); delete it "
                        f"and run again") from None
    return path


def _read_idx(path, ndim, shape=None):
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    try:
        array = read_sn3_pascalvincent_tensor(path, strict=False)
    except Exception as error:
        raise UserError(f"MNIST file {path} is not an IDX file ({_failure_reason(error)}); "
                        f"replace it with the original") from None
    if array.dtype != torch.uint8 or array.ndim != ndim or (shape and tuple(array.shape[1:]) != shape):
        want = "uint8 images of 28x28" if shape else "uint8 labels"
        raise UserError(f"MNIST file {path} holds {array.dtype} data of shape "
                        f"{tuple(array.shape)}, not {want}; replace it with the original")
    return array


def load_mnist(data_dir, download=True):
    """Return ((train_images, train_labels), (test_images, test_labels)) as uint8 (N,28,28)
    and int64 (N,) tensors from torchvision's layout DATA_DIR/MNIST/raw/. Missing files are
    unpacked from their .gz or downloaded (md5-checked) from MNIST_MIRRORS when `download` is
    true. Shapes, counts and the label range are checked before anything trains."""
    raw = os.path.join(os.path.abspath(data_dir), "MNIST", "raw")
    splits = []
    for prefix in ("train", "t10k"):
        images_path = _mnist_file(raw, f"{prefix}-images-idx3-ubyte", download)
        labels_path = _mnist_file(raw, f"{prefix}-labels-idx1-ubyte", download)
        images = _read_idx(images_path, 3, (28, 28))
        labels = _read_idx(labels_path, 1)
        if len(images) != len(labels):
            raise UserError(f"MNIST file {images_path} holds {len(images)} images but "
                            f"{labels_path} holds {len(labels)} labels; replace them with the "
                            f"originals")
        if len(labels) and int(labels.max()) > 9:
            raise UserError(f"MNIST file {labels_path} holds the label {int(labels.max())}, "
                            f"outside 0-9; replace it with the original")
        splits.append((images, labels.long()))
    return splits[0], splits[1]


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
    if os.path.isdir(path):
        raise UserError(f"weights file {path} is a folder; give the .pt file inside it")
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
        raise UserError(f"the {what} became {value}; training stopped; {_saved['note']} "
                        f"(a smaller --lr may help)")
    return value


# ---------------------------------------------------------------------------------------
# Resuming: one training-state file, the settings it was trained with, the RNG states.
# ---------------------------------------------------------------------------------------
NOT_TRAINING_SETTINGS = ("resume", "eval_only", "report_only", "out", "device", "data_dir",
                         "weights")


def training_settings(args, exclude=()):
    """The flags that decide what a run computes: vars(args) less those that do not."""
    skip = set(NOT_TRAINING_SETTINGS) | set(exclude)
    return {key: value for key, value in vars(args).items() if key not in skip}


def given_flags(parser, argv=None):
    """The `dest` names of the options given on the command line (not left at a default)."""
    actions = [(action, action.default) for action in parser._actions]
    parser_defaults, parser._defaults = parser._defaults, {}
    try:
        for action, _ in actions:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    finally:
        for action, default in actions:
            action.default = default
        parser._defaults = parser_defaults
    return set(vars(given))


def _flag_name(parser, dest):
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return action.option_strings[-1]
    return dest


def rng_states():
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(path, settings, **state):
    """Atomically save what a run needs to continue exactly: its settings, the global RNG
    states, and `state` (model and optimizer state dicts, epoch or step, history...)."""
    full = {"settings": dict(settings), "rng": rng_states(), **state}
    atomic_write(path, lambda tmp: torch.save(full, tmp))


def load_training_state(path, args, parser, argv=None):
    """Read the state saved by save_training_state for --resume. The settings the user did not
    give are copied from it into `args`; a setting given that differs is refused, naming the
    flags. The global RNG states are restored. Never returns None: a resume never silently
    starts over."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: there is no interrupted run to continue ({path} does not "
                        f"exist); run without --resume to start one")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        raise UserError(f"--resume: {path} is truncated or not a PyTorch checkpoint; delete it "
                        f"and run without --resume") from None
    if not isinstance(state, dict) or not {"settings", "rng"} <= set(state):
        raise UserError(f"--resume: {path} was not written by this script's training loop")
    given = given_flags(parser, argv)
    stored = state["settings"]
    differ = [f"{_flag_name(parser, key)} {getattr(args, key)} (the run has {value})"
              for key, value in stored.items()
              if key in given and hasattr(args, key) and getattr(args, key) != value]
    if differ:
        raise UserError(f"--resume: the run in {path} was started with other settings: "
                        f"{'; '.join(differ)}; drop these flags to continue it, or start a new "
                        f"run in another --out")
    for key, value in stored.items():
        if hasattr(args, key):
            setattr(args, key, value)
    restore_rng_states(state["rng"])
    return state


# ---------------------------------------------------------------------------------------
# --eval-only: recomputed numbers beside the saved ones
# ---------------------------------------------------------------------------------------
def _numbers(tree, prefix=""):
    """Flatten the scalar numbers of a nested dict into {"a.b.c": value}."""
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_numbers(value, f"{prefix}{key}."))
        return flat
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix[:-1]: tree}
    return {}


def compare_with_committed(recomputed, committed, eval_dir, rel_tol=1e-6, abs_tol=1e-9):
    """Print every number found in both nested dicts with its saved value and whether it is
    reproduced; write the rows to eval_dir/comparison.json and return them."""
    new, old = _numbers(recomputed), _numbers(committed)
    rows = []
    for name in sorted(set(new) & set(old)):
        difference = new[name] - old[name]
        same = abs(difference) <= abs_tol + rel_tol * abs(old[name])
        rows.append({"name": name, "recomputed": new[name], "saved": old[name],
                     "reproduced": bool(same)})
        verdict = "reproduced" if same else f"differs by {difference:+.6g}"
        print(f"  {name:<48} {new[name]:<12.6g} (saved {old[name]:<12.6g}) {verdict}")
    reproduced = sum(row["reproduced"] for row in rows)
    print(f"{reproduced} of {len(rows)} numbers reproduced the saved metrics.json")
    write_json(os.path.join(eval_dir, "comparison.json"),
               {"reproduced": reproduced, "compared": len(rows), "rows": rows})
    return rows


# ---------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------
def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path, what="file"):
    """A JSON file, or one UserError sentence naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{what} {path} is not readable JSON ({error})") from None


def other_runs(out):
    """[(name, metrics)] of the runs kept beside a result in <out>/runs/<name>/metrics.json."""
    paths = sorted(glob.glob(os.path.join(out, "runs", "*", "metrics.json")))
    return [(os.path.basename(os.path.dirname(p)), read_json(p, "metrics file")) for p in paths]


def report_only(out, render):
    """--report-only: write <out>/report.md = render(metrics, out) from <out>/metrics.json
    (and the runs beside it) alone."""
    metrics = read_json(os.path.join(out, "metrics.json"), "metrics file")
    path = os.path.join(out, "report.md")
    write_text(path, render(metrics, out))
    print(f"wrote {path}")
    return path


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


DATA_FLAGS = ("--data-dir", "--cache-dir", "--bsds-dir", "--mnistm-dir")


def shown_command(command):
    """A stored command as a report shows it: an absolute data folder, which belongs to the
    machine that ran it, is written DATA_DIR (metrics.json keeps the command as it ran)."""
    words = command.split(" ")
    for i, word in enumerate(words[:-1]):
        if word in DATA_FLAGS and os.path.isabs(words[i + 1]):
            words[i + 1] = "DATA_DIR"
    return " ".join(words)


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
