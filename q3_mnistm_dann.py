"""Question 3.2: domain-adversarial training from MNIST to MNIST-M (Ganin et al., JMLR 2016,
Section 5.2, Table 2 and Figure 5), with the Figure 4(a) network.

    python q3_mnistm_dann.py --data-dir ./data --svm-retrain   # source only, DANN, train on target
    python q3_mnistm_dann.py --data-dir ./data --eval-only      # recompute the numbers into <out>/eval/
    python q3_mnistm_dann.py --report-only                      # re-render report.md from metrics.json
    python q3_mnistm_dann.py --data-dir ./data --download-only  # fetch MNIST and BSDS500, then stop

The script reads top to bottom as the method: the data (MNIST; MNIST-M built from BSDS500
photos as Section 5.2.4 says, or the authors' own MNIST-M), the Figure 4(a) network, the losses
and the lr_p / lambda_p schedules, one training step, the training loop shared by the three
models (source only, DANN, train on target), the test evaluation (Table 2, the last layer
optionally retrained by a linear SVM), the figures, and report.md rendered from metrics.json.

A labelled validation split is held out of MNIST train and of MNIST-M train (--validation-size
each). The training loop watches it every epoch; the MNIST-M test set is evaluated once, after
training. MNIST-M is built once and kept as uint8 arrays in <cache-dir>/MNIST-M/.
"""
import argparse
import glob
import hashlib
import math
import os
import shutil
import tarfile
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (UserError, add_common_args, atomic_write, check_finite, choose_device,
                    classification_metrics, command_line, compare_with_committed,
                    download_first, given_flags, grad_reverse, image_grid, load_checkpoint,
                    load_mnist, load_training_state, load_weights, machine_info, note_saved,
                    other_runs, plot_confusion_matrix, positive_int, positive_float,
                    prepare_out, read_json, report_only, run_cli, save_checkpoint, save_figure,
                    save_training_state, scatter_by_label, seed_everything, seed_type,
                    shown_command, stage,
                    subsample, training_settings, tsne_embed, write_json, write_text)

OUT_DEFAULT = "outputs/q3_mnistm"
MODELS = ["source_only", "dann", "target_only"]
TRAIN_ORDER = ["dann", "source_only", "target_only"]  # the headline model first
MODEL_TITLES = {"source_only": "Source only", "dann": "DANN", "target_only": "Train on target"}
KINDS = {name: f"q3_mnistm_dann/{name}" for name in MODELS}
# Table 2 of the JMLR paper (MNIST -> MNIST-M, target test accuracy, every method's last layer
# retrained by a linear SVM) and the ICML 2015 version of the same table.
PAPER = {"source_only": 0.5225, "dann": 0.7666, "target_only": 0.9596}
PAPER_ICML2015 = {"source_only": 0.5749, "dann": 0.8149, "target_only": 0.9891}

# The epoch count is read off the MNIST-M validation curve of one DANN run, committed as
# outputs/q3_mnistm/runs/<EPOCH_CHOICE_RUN>/metrics.json: the first epoch whose validation
# accuracy is within EPOCH_TOLERANCE of that run's best.
DEFAULT_EPOCHS = 27  # runs/epoch_choice: best 0.8776 at epoch 28 of 30, within 0.01 from epoch 27
EPOCH_CHOICE_RUN = "epoch_choice"
EPOCH_TOLERANCE = 0.01

# BSDS500 sources, tried in turn: Berkeley's archive (two spellings) and the GitHub mirror.
BSDS_SOURCES = (
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/BSR/BSR_bsds500.tgz",
    "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/BSR/BSR_bsds500.tgz",
    "https://github.com/BIDS/BSDS500/archive/refs/heads/master.zip",
)
BSDS_DOWNLOAD = "BSDS500_archive"  # the archive's name while it is checked and unpacked
BSDS_ARCHIVE_LAYOUTS = ("BSR/BSDS500/data/images/", "BSDS500-master/BSDS500/data/images/")
BSDS_LOCAL_ARCHIVES = ("BSR_bsds500.tgz", "BSDS500-master.zip")
# No checksum of the archives is published (and GitHub regenerates its zip), so a download is
# checked on what MNIST-M uses: SHA-256 over "split/name:" + SHA-256(bytes) of the 200 train
# and 200 test JPEGs, train first, each split sorted by name (the byte-exact BSR release).
BSDS_FINGERPRINT = "02dac0fc5b9a349c7695cdc915cd73acb66f543de5d682bf2c1ecfe57829e38e"
OFFICIAL_SIZE = 32  # the authors' mnist_m.tar.gz holds 32x32 RGB PNGs
# Flags that only say where the data are: a resumed run may change them.
NOT_TRAINING = ("cache_dir", "bsds_dir", "mnistm_dir", "no_download", "download_only")
# Settings an --eval-only run takes from the saved metrics.json (unless given): they decide the
# data split and the evaluation.
EVAL_SETTINGS = ("mnistm", "mnistm_seed", "validation_size", "svm_retrain", "svm_train_size",
                 "tsne_points")


# =======================================================================================
# Arguments
# =======================================================================================
def build_parser():
    parser = argparse.ArgumentParser(
        description="DANN from MNIST to MNIST-M (Ganin et al. 2016, Table 2 and Figure 5).")
    add_common_args(parser, OUT_DEFAULT)
    parser.add_argument("--cache-dir", default="./data",
                        help="writable folder for the MNIST-M cache, uint8 arrays of about "
                             "165 MB (default: ./data)")
    parser.add_argument("--bsds-dir", default=None,
                        help="folder holding BSDS500's images/train and images/test (default: "
                             "<data-dir>/BSDS500, downloaded there when missing)")
    parser.add_argument("--mnistm", choices=["build", "official"], default="build",
                        help="build MNIST-M from BSDS500 as the paper says (default), or load "
                             "the authors' mnist_m.tar.gz from --mnistm-dir")
    parser.add_argument("--mnistm-dir", default=None,
                        help="folder with mnist_m.tar.gz or its extracted mnist_m/ (--mnistm official)")
    parser.add_argument("--mnistm-seed", type=seed_type, default=0,
                        help="seed of the MNIST-M construction, fixed across training seeds (default 0)")
    parser.add_argument("--no-download", action="store_true", help="never try to download data")
    parser.add_argument("--download-only", action="store_true",
                        help="download MNIST and BSDS500 into --data-dir, then stop")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS,
                        help="models to train (default all three)")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="train seeds --seed .. --seed+K-1; Table 2 gives mean and std (default 1)")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                        help=f"passes over the labelled training set (default {DEFAULT_EPOCHS}, "
                             f"chosen on the validation split)")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per domain per step: 64 source + 64 target (default 64)")
    parser.add_argument("--lr", type=positive_float, default=0.01, help="mu_0 in lr_p (default 0.01)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--validation-size", type=positive_int, default=5000,
                        help="labelled images held out of MNIST train and of MNIST-M train, "
                             "watched every epoch (default 5000)")
    parser.add_argument("--svm-retrain", action="store_true",
                        help="also retrain each last layer with a linear SVM, as the paper did")
    parser.add_argument("--svm-train-size", type=positive_int, default=20000,
                        help="training images for the SVM (default 20000)")
    parser.add_argument("--tsne-points", type=positive_int, default=500,
                        help="test images per domain in the Figure 5 t-SNE (default 500)")
    parser.add_argument("--weights", default=None,
                        help="--eval-only: a weights file or a folder holding source_only.pt, "
                             "dann.pt, target_only.pt (default: the --out folder)")
    return parser


def parse_args(argv=None, parser=None):
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.momentum < 1:
        parser.error("argument --momentum: must be in [0, 1)")
    if args.mnistm == "official" and not args.mnistm_dir:
        parser.error("--mnistm official needs --mnistm-dir")
    return args


# =======================================================================================
# Data: MNIST-M (Section 5.2.4) from MNIST digits and BSDS500 photos
# =======================================================================================
def build_mnistm(digits, photos, seed=0):
    """MNIST-M as Section 5.2.4 says: each grey digit (0-255, repeated to 3 channels) blended
    over a uniformly random 28x28 crop of a uniformly random photo, out = |patch - digit| per
    pixel and channel. digits: uint8 (N,28,28); photos: list of uint8 (H,W,3) arrays.
    Returns uint8 (N,28,28,3)."""
    digits = np.asarray(digits, dtype=np.uint8)
    n, h, w = digits.shape
    rng = np.random.default_rng(seed)
    which = rng.integers(len(photos), size=n)
    patches = np.empty((n, h, w, 3), dtype=np.uint8)
    for i, k in enumerate(which):
        photo = photos[k]
        top = rng.integers(photo.shape[0] - h + 1)
        left = rng.integers(photo.shape[1] - w + 1)
        patches[i] = photo[top:top + h, left:left + w]
    return np.abs(patches.astype(np.int16) - digits[..., None].astype(np.int16)).astype(np.uint8)


def make_mnistm(train_digits, test_digits, photos, seed=0):
    """Training digits over BSDS500 train photos, test digits over test photos: no background
    is shared between the two splits. photos: {"train": [...], "test": [...]}."""
    return (build_mnistm(train_digits, photos["train"], seed),
            build_mnistm(test_digits, photos["test"], seed + 1))


def photo_fingerprint(photos):
    """SHA-256 of {"train/<name>": bytes, "test/<name>": bytes}, as BSDS_FINGERPRINT."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for key in sorted(k for k in photos if k.startswith(split + "/")):
            digest.update(f"{key}:".encode())
            digest.update(hashlib.sha256(photos[key]).digest())
    return digest.hexdigest()


def bsds_files(root, split):
    folder = os.path.join(root, "images", split)
    return sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))


def folder_photos(root):
    photos = {}
    for split in ("train", "test"):
        for name in bsds_files(root, split):
            with open(os.path.join(root, "images", split, name), "rb") as f:
                photos[f"{split}/{name}"] = f.read()
    return photos


def archive_photos(path):
    """The train and test JPEGs of a BSDS500 archive, {"train/<name>": bytes, ...}, in either
    layout (Berkeley's BSR_bsds500.tgz, GitHub's BSDS500-master.zip). Raises ValueError when
    the archive is broken or its photos are not the official ones."""
    photos = {}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [(info.filename, info) for info in archive.infolist() if not info.is_dir()]
                photos = bsds_members(members, archive.read)
        else:
            with tarfile.open(path) as archive:
                members = [(member.name, member) for member in archive if member.isfile()]
                photos = bsds_members(members, lambda member: archive.extractfile(member).read())
    except Exception as error:  # tarfile, zipfile, zlib, EOF and OS errors all mean a bad archive
        raise ValueError(f"not a readable tgz or zip archive ({error})") from None
    if photo_fingerprint(photos) != BSDS_FINGERPRINT:
        raise ValueError(f"its {len(photos)} BSDS500 train/test photos are not the official "
                         f"ones (checksum mismatch)")
    return photos


def bsds_members(members, read):
    photos = {}
    for name, member in members:
        for prefix in BSDS_ARCHIVE_LAYOUTS:
            split, _, file = name[len(prefix):].partition("/") if name.startswith(prefix) else ("", "", "")
            if split in ("train", "test") and file.lower().endswith(".jpg") and "/" not in file:
                photos[f"{split}/{file}"] = read(member)
    return photos


def write_photos(photos, root):
    """Write the photos as root/images/{train,test}/*.jpg, all at once (a temporary folder
    renamed into place): an interrupted run leaves no half-written BSDS500 folder."""
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-BSDS500-")
    try:
        for key, data in photos.items():
            split, name = key.split("/")
            os.makedirs(os.path.join(tmp, "images", split), exist_ok=True)
            with open(os.path.join(tmp, "images", split, name), "wb") as f:
                f.write(data)
        os.rename(tmp, root)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return root


def is_bsds_root(path):
    return all(os.path.isdir(os.path.join(path, "images", s)) for s in ("train", "test"))


def find_bsds(args):
    """The folder holding images/train and images/test: --bsds-dir; a copy in --data-dir
    (BSDS500/, or either archive's extracted layout); either archive in --data-dir; else a
    download from BSDS_SOURCES into <data-dir>/BSDS500/."""
    if args.bsds_dir:
        if not is_bsds_root(args.bsds_dir):
            raise UserError(f"--bsds-dir {args.bsds_dir} does not hold images/train and "
                            f"images/test (the BSDS500 JPEGs)")
        return args.bsds_dir
    root = os.path.join(args.data_dir, "BSDS500")
    for folder in (root, os.path.join(args.data_dir, "BSR", "BSDS500", "data"),
                   os.path.join(args.data_dir, "BSDS500-master", "BSDS500", "data")):
        if is_bsds_root(folder):
            return folder
    for name in BSDS_LOCAL_ARCHIVES:
        archive = os.path.join(args.data_dir, name)
        if os.path.isfile(archive):
            try:
                return write_photos(archive_photos(archive), root)
            except ValueError as error:
                raise UserError(f"{archive}: {error}; delete it and run again") from None
    hint = (f"put one of the archives ({', '.join(BSDS_LOCAL_ARCHIVES)}) into "
            f"{os.path.abspath(args.data_dir)}/, or pass --bsds-dir a folder holding "
            f"images/train and images/test with the BSDS500 photos")
    if args.no_download:
        raise UserError(f"BSDS500 is missing and --no-download was given: {hint}")
    archive = download_first(BSDS_SOURCES, args.data_dir, BSDS_DOWNLOAD, check=archive_photos,
                             offline_hint=hint)
    write_photos(archive_photos(archive), root)
    os.remove(archive)  # the 400 photos MNIST-M needs are kept, the archive is not
    return root


def read_photos(root):
    from PIL import Image

    photos = {}
    for split in ("train", "test"):
        names = bsds_files(root, split)
        if not names:
            raise UserError(f"{os.path.join(root, 'images', split)} holds no photos")
        photos[split] = []
        for name in names:
            path = os.path.join(root, "images", split, name)
            try:
                photo = np.asarray(Image.open(path).convert("RGB"))
            except Exception:
                raise UserError(f"BSDS500 photo {path} cannot be read") from None
            if photo.shape[0] < 28 or photo.shape[1] < 28:
                raise UserError(f"BSDS500 photo {path} is smaller than 28x28")
            photos[split].append(photo)
    return photos


def check_mnistm_arrays(arrays, train_labels=None, test_labels=None):
    """Keys, dtypes, shapes and label range of MNIST-M arrays (and, for the built set, the
    labels of the MNIST digits it was built from). Raises ValueError with the first problem."""
    for split, expected in (("train", train_labels), ("test", test_labels)):
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            raise ValueError(f"it lacks {split}_images or {split}_labels")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (28, 28, 3):
            raise ValueError(f"{split}_images is {images.dtype} {images.shape}, not uint8 (N,28,28,3)")
        if labels.shape != (len(images),) or (len(labels) and int(labels.max()) > 9):
            raise ValueError(f"{split}_labels does not hold one digit 0-9 per image")
        if expected is not None and not np.array_equal(labels, expected):
            raise ValueError(f"{split}_labels differ from the MNIST labels")


def cached(path, build, check, what):
    """Arrays from the npz at `path` when it opens and passes `check`; else build() them (a
    truncated, foreign or stale cache is rebuilt) and try to save them there."""
    if os.path.isfile(path):
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
            check(arrays)
            return arrays, path
        except Exception as error:
            print(f"warning: {what} cache {path} cannot be used ({error}); rebuilding it", flush=True)
    arrays = build()
    check(arrays)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
        return arrays, path
    except OSError:
        print(f"warning: cannot write the {what} cache to {path} (read-only folder?); it is "
              f"kept in memory for this run; pass --cache-dir a writable folder to build it "
              f"only once", flush=True)
        return arrays, "memory"


def load_built_mnistm(args, mnist):
    (train_digits, train_labels), (test_digits, test_labels) = mnist
    root = find_bsds(args)
    key = hashlib.sha1()
    key.update(train_digits.numpy().tobytes())
    key.update(test_digits.numpy().tobytes())
    for split in ("train", "test"):
        for name in bsds_files(root, split):
            key.update(f"{split}/{name}:{os.path.getsize(os.path.join(root, 'images', split, name))}".encode())
    key.update(f"seed{args.mnistm_seed}".encode())
    path = os.path.join(args.cache_dir, "MNIST-M", f"mnistm_built_{key.hexdigest()[:12]}.npz")

    def build():
        train, test = make_mnistm(train_digits.numpy(), test_digits.numpy(), read_photos(root),
                                  args.mnistm_seed)
        return {"train_images": train, "train_labels": train_labels.numpy().astype(np.uint8),
                "test_images": test, "test_labels": test_labels.numpy().astype(np.uint8)}

    def check(arrays):
        check_mnistm_arrays(arrays, train_labels.numpy(), test_labels.numpy())

    arrays, source = cached(path, build, check, "MNIST-M")
    return arrays, {"kind": "built from BSDS500 (|patch - digit|, grey digits, 28x28 crops)",
                    "bsds_dir": os.path.abspath(root), "mnistm_seed": args.mnistm_seed,
                    "cache": source if source == "memory" else os.path.abspath(source),
                    "bsds_matches_official_release":
                        photo_fingerprint(folder_photos(root)) == BSDS_FINGERPRINT}


def read_official_split(root, split):
    """One split of the authors' layout: mnist_m_<split>/*.png and mnist_m_<split>_labels.txt
    with lines '00000000.png 5'. The 32x32 images are resized to 28x28 (Pillow bilinear with
    antialiasing: the whole digit is kept, as the Figure 4(a) network needs 28x28 inputs)."""
    from PIL import Image

    labels_file = os.path.join(root, f"mnist_m_{split}_labels.txt")
    folder = os.path.join(root, f"mnist_m_{split}")
    if not os.path.isfile(labels_file):
        raise UserError(f"{labels_file} is missing (official MNIST-M layout)")
    images, labels = [], []
    with open(labels_file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit() or not 0 <= int(parts[1]) <= 9:
                raise UserError(f"{labels_file} line {number}: expected '<name>.png <digit 0-9>', "
                                f"got {line.strip()!r}")
            path = os.path.join(folder, parts[0])
            try:
                image = Image.open(path).convert("RGB")
                if image.size != (28, 28):
                    image = image.resize((28, 28), Image.BILINEAR)
                images.append(np.asarray(image))
            except Exception:
                raise UserError(f"{labels_file} line {number}: image {path} is missing or "
                                f"unreadable") from None
            labels.append(int(parts[1]))
    if not images:
        raise UserError(f"{labels_file} lists no images")
    return np.stack(images), np.array(labels, dtype=np.uint8)


def load_official_mnistm(mnistm_dir, cache_dir):
    """The authors' mnist_m.tar.gz (extracted, or the archive itself, unpacked into
    --cache-dir) as uint8 arrays. No public copy is downloaded: the user supplies it."""
    def find_root():
        for root in (mnistm_dir, os.path.join(mnistm_dir, "mnist_m"),
                     os.path.join(cache_dir, "mnist_m")):
            if os.path.isdir(os.path.join(root, "mnist_m_train")):
                return root
        return None

    root = find_root()
    archive = os.path.join(mnistm_dir, "mnist_m.tar.gz")
    if root is None and os.path.isfile(archive):
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(cache_dir, filter="data")
        except Exception as error:
            raise UserError(f"{archive} is corrupt or truncated ({error})") from None
        root = find_root()
    if root is None:
        raise UserError(f"official MNIST-M not found: put mnist_m.tar.gz (or its extracted "
                        f"mnist_m/ folder) into {os.path.abspath(mnistm_dir)}/")
    key = hashlib.sha1()
    for split in ("train", "test"):
        labels_file = os.path.join(root, f"mnist_m_{split}_labels.txt")
        if os.path.isfile(labels_file):
            with open(labels_file, "rb") as f:
                key.update(f.read())
    path = os.path.join(cache_dir, "MNIST-M", f"mnistm_official_{key.hexdigest()[:12]}.npz")

    def build():
        train_images, train_labels = read_official_split(root, "train")
        test_images, test_labels = read_official_split(root, "test")
        return {"train_images": train_images, "train_labels": train_labels,
                "test_images": test_images, "test_labels": test_labels}

    arrays, source = cached(path, build, check_mnistm_arrays, "official MNIST-M")
    return arrays, {"kind": "official mnist_m.tar.gz, 32x32 resized to 28x28 (bilinear)",
                    "dir": os.path.abspath(root),
                    "cache": source if source == "memory" else os.path.abspath(source)}


def split_off_validation(images, labels, size):
    """(train images, train labels, validation images, validation labels): a fixed random
    `size` of the labelled training set held out (the same indices for MNIST and the MNIST-M
    built from it, so DANN sees neither version of a validation digit)."""
    held_out = np.zeros(len(images), dtype=bool)
    held_out[subsample(len(images), size, seed=0)] = True
    keep, held_out = torch.from_numpy(~held_out), torch.from_numpy(held_out)
    return images[keep], labels[keep], images[held_out], labels[held_out]


def load_data(args, device):
    """MNIST (grey, uint8 N,28,28) and MNIST-M (uint8 N,3,28,28) tensors on `device`: train,
    val (held out of train) and test for both domains, keyed source_* and target_*."""
    mnist = load_mnist(args.data_dir, download=not args.no_download)
    if args.mnistm == "build":
        arrays, info = load_built_mnistm(args, mnist)
    else:
        arrays, info = load_official_mnistm(args.mnistm_dir, args.cache_dir)
    domains = {"source": (*mnist[0], *mnist[1]),
               "target": (torch.from_numpy(arrays["train_images"]).permute(0, 3, 1, 2),
                          torch.from_numpy(arrays["train_labels"].astype(np.int64)),
                          torch.from_numpy(arrays["test_images"]).permute(0, 3, 1, 2),
                          torch.from_numpy(arrays["test_labels"].astype(np.int64)))}
    data = {}
    for domain, (train, train_labels, test, test_labels) in domains.items():
        if args.validation_size >= len(train):
            raise UserError(f"--validation-size {args.validation_size} leaves no {domain} "
                            f"training images (the set has {len(train)})")
        train, train_labels, val, val_labels = split_off_validation(
            train.contiguous(), train_labels.long(), args.validation_size)
        for split, images, labels in (("train", train, train_labels), ("val", val, val_labels),
                                      ("test", test.contiguous(), test_labels.long())):
            data[f"{domain}_{split}"], data[f"{domain}_{split}_labels"] = images, labels
            info[f"{domain}_{split}"] = len(images)
    return {k: v.to(device) for k, v in data.items()}, info


def as_input(images):
    """uint8 (N,28,28) grey or (N,3,28,28) colour -> float (N,3,28,28) in [0,1], stored
    channels-last (the layout the CPU convolutions run fastest in)."""
    x = images.float().div_(255)
    if x.dim() == 3:
        x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last)


def pixel_mean(data):
    """Per-channel mean of the union of the MNIST and MNIST-M training images: one mean for
    both domains and all three models (per-domain statistics would be a form of adaptation)."""
    grey = data["source_train"].double().mean() / 255
    colour = data["target_train"].double().mean(dim=(0, 2, 3)) / 255
    n_s, n_t = len(data["source_train"]), len(data["target_train"])
    return ((n_s * grey + n_t * colour) / (n_s + n_t)).float().cpu().tolist()


# =======================================================================================
# Model: the Figure 4(a) network
# =======================================================================================
class DANNNet(nn.Module):
    """Feature extractor conv5x5(32)-ReLU-pool-conv5x5(48)-ReLU-pool (768-d), label predictor
    100-100-10, domain classifier GRL-100-1. Takes images in [0,1] and subtracts the stored
    mean. Each max-pooling runs before its ReLU: the two commute (both are monotone, and the
    gradients agree too), so this is the same function with the ReLU on 4x fewer values."""

    def __init__(self, mean):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(3, 32, 5), nn.MaxPool2d(2, 2), nn.ReLU(inplace=True),
            nn.Conv2d(32, 48, 5), nn.MaxPool2d(2, 2), nn.ReLU(inplace=True), nn.Flatten())
        self.label_predictor = nn.Sequential(
            nn.Linear(768, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
        self.domain_classifier = nn.Sequential(nn.Linear(768, 100), nn.ReLU(), nn.Linear(100, 1))
        self.to(memory_format=torch.channels_last)

    def features(self, x):
        return self.feature_extractor(x - self.mean)

    def forward(self, x):
        return self.label_predictor(self.features(x))

    def last_hidden(self, x):
        """The input of the last layer (100-d), which the paper retrained with a linear SVM."""
        return self.label_predictor[:-1](self.features(x))

    def domain_logits(self, features, lambda_):
        """Domain classifier behind the gradient reversal layer: logit of 'target'."""
        return self.domain_classifier(grad_reverse(features, lambda_)).squeeze(1)


def load_model(path):
    """A trained model in eval mode: forward(x) -> (N,10) logits, features(x) -> (N,768), for
    x float (N,3,28,28) in [0,1]."""
    state = load_checkpoint(path, tuple(KINDS.values()))
    try:
        model = DANNNet(state["hparams"]["mean"])
    except (KeyError, TypeError, RuntimeError):
        raise UserError(f"weights file {path} lacks the pixel mean it was trained with") from None
    return load_weights(model, state, path).eval()


# =======================================================================================
# Losses and schedules (Section 5.2.2), and one training step
# =======================================================================================
def learning_rate(p, lr0=0.01):
    """lr_p = mu_0 / (1 + 10 p)^0.75, p = training progress in [0, 1]."""
    return lr0 / (1 + 10 * p) ** 0.75


def adaptation_lambda(p):
    """lambda_p = 2 / (1 + exp(-10 p)) - 1: 0 at the start, towards 1 at the end."""
    return 2 / (1 + math.exp(-10 * p)) - 1


def dann_losses(model, source, source_labels, target, lambda_):
    """Label loss on the source half; domain loss (logistic, source 0 / target 1) on both halves
    through the gradient reversal layer; and the domain classifier's accuracy."""
    features = model.features(torch.cat([source, target]))
    label_loss = F.cross_entropy(model.label_predictor(features[:len(source)]), source_labels)
    domain = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(features.device)
    logits = model.domain_logits(features, lambda_)
    domain_loss = F.binary_cross_entropy_with_logits(logits, domain)
    domain_accuracy = ((logits > 0).float() == domain).float().mean()
    return label_loss, domain_loss, domain_accuracy


def dann_step(model, optimizer, source, source_labels, target, lambda_):
    """One SGD step of DANN on a batch: labelled source images, unlabelled target images (float
    (N,3,28,28) in [0,1], see as_input). Returns the label loss, the domain loss and the domain
    classifier's accuracy on the batch; a NaN or infinite loss stops before the update."""
    label_loss, domain_loss, domain_accuracy = dann_losses(model, source, source_labels, target,
                                                           lambda_)
    check_finite(label_loss, "DANN label loss")
    check_finite(domain_loss, "DANN domain loss")
    optimizer.zero_grad(set_to_none=True)
    (label_loss + domain_loss).backward()
    optimizer.step()
    return label_loss.item(), domain_loss.item(), domain_accuracy.item()


def supervised_step(model, optimizer, images, labels, what):
    """One SGD step on labelled images of one domain (source only, train on target)."""
    label_loss = F.cross_entropy(model(images), labels)
    check_finite(label_loss, f"{what} label loss")
    optimizer.zero_grad(set_to_none=True)
    label_loss.backward()
    optimizer.step()
    return label_loss.item()


# =======================================================================================
# Training: one loop for the three models
# =======================================================================================
def epoch_batches(n, batch_size, steps, seed, epoch, stream):
    """(steps, batch_size) indices: a fresh permutation each epoch (repeated if the set is
    smaller than an epoch needs), from a generator of (seed, epoch, stream) so a resumed run
    sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2 + stream)
    repeats = math.ceil(steps * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(repeats)])
    return order[:steps * batch_size].view(steps, batch_size)


@torch.no_grad()
def embed(model, images, what="features", batch=1000):
    model.eval()
    fn = {"features": model.features, "hidden": model.last_hidden, "logits": model}[what]
    return torch.cat([fn(as_input(images[i:i + batch])) for i in range(0, len(images), batch)])


def predict(model, images):
    return embed(model, images, "logits").argmax(1).cpu()


def accuracy(model, images, labels):
    return float((predict(model, images) == labels.cpu()).float().mean())


@torch.no_grad()
def validation_accuracies(model, data, with_domain):
    """On the held-out labelled images: MNIST validation accuracy, MNIST-M validation accuracy
    (an oracle: unsupervised adaptation has no target labels) and, for DANN, the domain
    classifier's accuracy on the two validation sets together."""
    source, target = embed(model, data["source_val"]), embed(model, data["target_val"])
    result = {}
    for domain, features in (("source", source), ("target", target)):
        predicted = model.label_predictor(features).argmax(1)
        result[f"{domain}_val_accuracy"] = float(
            (predicted == data[f"{domain}_val_labels"]).float().mean())
    if with_domain:
        logits = model.domain_classifier(torch.cat([source, target])).squeeze(1)
        truth = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(logits.device)
        result["val_domain_accuracy"] = float(((logits > 0).float() == truth).float().mean())
    model.train()
    return result


def train_epoch(name, model, optimizer, data, args, seed, epoch):
    """One pass over the labelled training set; returns the mean losses of its steps."""
    labelled = "target" if name == "target_only" else "source"
    images, labels = data[f"{labelled}_train"], data[f"{labelled}_train_labels"]
    steps = len(images) // args.batch_size
    batches = epoch_batches(len(images), args.batch_size, steps, seed, epoch, 0).to(images.device)
    if name == "dann":
        target_batches = epoch_batches(len(data["target_train"]), args.batch_size, steps, seed,
                                       epoch, 1).to(images.device)
    sums = np.zeros(3)
    model.train()
    for i in range(steps):
        p = (epoch * steps + i) / (steps * args.epochs)  # training progress, 0 -> 1
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(p, args.lr)
        source, source_labels = as_input(images[batches[i]]), labels[batches[i]]
        if name == "dann":
            target = as_input(data["target_train"][target_batches[i]])
            sums += dann_step(model, optimizer, source, source_labels, target, adaptation_lambda(p))
        else:
            sums[0] += supervised_step(model, optimizer, source, source_labels, MODEL_TITLES[name])
    means = sums / steps
    progress = (epoch + 1) / args.epochs
    record = {"epoch": epoch + 1, "label_loss": means[0], "lr": learning_rate(progress, args.lr)}
    if name == "dann":
        record.update(domain_loss=means[1], domain_accuracy=means[2],
                      **{"lambda": adaptation_lambda(progress)})
    return record, steps


def train_model(name, seed, data, args, device, mean, progress, save_progress):
    """Train one model for args.epochs epochs, from `progress` (a saved state) when given.
    After every epoch: the validation accuracies, then save_progress(state). Returns the model
    and its record (history, seconds, images/s)."""
    seed_everything(seed)
    model = DANNNet(mean).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    record = {"model": name, "seed": seed, "epochs": args.epochs, "history": [],
              "train_seconds": 0.0, "validation_seconds": 0.0, "steps": 0,
              "images_per_step": args.batch_size * (2 if name == "dann" else 1)}
    if progress is not None:
        load_weights(model, progress, "the training state")
        optimizer.load_state_dict(progress["optimizer"])
        record = progress["record"]
        print(f"[{name} seed {seed}] resuming after epoch {len(record['history'])}", flush=True)
    for epoch in range(len(record["history"]), args.epochs):
        start = time.perf_counter()
        epoch_record, steps = train_epoch(name, model, optimizer, data, args, seed, epoch)
        record["train_seconds"] += time.perf_counter() - start
        record["steps"] += steps
        start = time.perf_counter()
        epoch_record.update(validation_accuracies(model, data, with_domain=name == "dann"))
        record["validation_seconds"] += time.perf_counter() - start
        record["history"].append(epoch_record)
        print(f"[{name} seed {seed}] " + ", ".join(
            f"{key} {value:.4g}" for key, value in epoch_record.items()), flush=True)
        save_progress(model=model.state_dict(), optimizer=optimizer.state_dict(), record=record)
        note_saved(f"epoch {epoch + 1} of {args.epochs} of {MODEL_TITLES[name]} seed {seed} is "
                   f"saved in {training_state_path(args.out)}; continue with --resume")
    record["images_per_second"] = (record["steps"] * record["images_per_step"]
                                   / max(record["train_seconds"], 1e-9))
    return model, record


def training_state_path(out):
    return os.path.join(out, "training_state.pt")


def weights_path(out, name, seed, first_seed):
    return os.path.join(out, f"{name}.pt" if seed == first_seed else f"{name}_seed{seed}.pt")


def train_all(args, data, device, mean, resumed):
    """Train every (model, seed) of the run, the headline model first. Each finished model's
    weights are written at once; training_state.pt holds the finished models and the epochs of
    the one in progress, so --resume continues exactly. Returns {(name, seed): (model, record)}."""
    state_path = training_state_path(args.out)
    settings = training_settings(args, exclude=NOT_TRAINING)
    finished = resumed["finished"] if resumed else {}
    in_progress = resumed.get("in_progress") if resumed else None
    trained = {}
    for name in sorted(args.models, key=TRAIN_ORDER.index):
        for seed in range(args.seed, args.seed + args.seeds):
            key, path = f"{name}_seed{seed}", weights_path(args.out, name, seed, args.seed)
            if key in finished:
                trained[(name, seed)] = (load_model(path).to(device), finished[key])
                continue
            progress = in_progress if in_progress and in_progress["key"] == key else None

            def save_progress(**state):
                save_training_state(state_path, settings, finished=finished,
                                    in_progress={"key": key, **state})

            model, record = train_model(name, seed, data, args, device, mean, progress,
                                        save_progress)
            hparams = {**settings, "model": name, "seed": seed, "mean": mean}
            save_checkpoint(path, KINDS[name], hparams, model, record=record)
            finished[key] = record
            save_training_state(state_path, settings, finished=finished, in_progress=None)
            note_saved(f"the weights of {', '.join(finished)} are saved in {args.out}/; "
                       f"continue with --resume")
            trained[(name, seed)] = (model, record)
    return dict(sorted(trained.items(), key=lambda kv: (MODELS.index(kv[0][0]), kv[0][1])))


# =======================================================================================
# Evaluation, once, after training: Table 2 and the linear SVM on the last hidden layer
# =======================================================================================
def svm_retrain(model, train_images, train_labels, tests, size, seed=0):
    """Retrain the last layer as the paper did: a linear SVM (standardised 100-d inputs,
    C = 1) on `size` labelled training images; returns the test accuracies."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    index = torch.from_numpy(subsample(len(train_images), size, seed)).to(train_images.device)
    svm = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=5000, random_state=0))
    svm.fit(embed(model, train_images[index], "hidden").cpu().numpy(),
            train_labels[index].cpu().numpy())
    return {domain: float(np.mean(svm.predict(embed(model, images, "hidden").cpu().numpy())
                                  == labels.cpu().numpy()))
            for domain, (images, labels) in tests.items()}


def evaluate(name, model, data, args):
    """MNIST and MNIST-M test accuracy of the network, and with --svm-retrain of the SVM."""
    tests = {"mnist": (data["source_test"], data["source_test_labels"]),
             "mnistm": (data["target_test"], data["target_test_labels"])}
    result = {f"{domain}_test_accuracy": accuracy(model, images, labels)
              for domain, (images, labels) in tests.items()}
    if args.svm_retrain:
        labelled = "target" if name == "target_only" else "source"
        svm = svm_retrain(model, data[f"{labelled}_train"], data[f"{labelled}_train_labels"],
                          tests, args.svm_train_size)
        result.update({f"svm_{domain}_test_accuracy": value for domain, value in svm.items()})
    return result


def summarize(values):
    values = np.asarray(values, dtype=float)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "n": int(len(values)),
            "values": [float(v) for v in values]}


def summarize_runs(runs):
    """{model: {accuracy name: mean, std, n, values}} over the seeds of each model."""
    summary = {}
    for name in MODELS:
        rows = [r for r in runs if r["model"] == name]
        if rows:
            summary[name] = {key: summarize([r[key] for r in rows]) for key in rows[0]
                             if key.endswith("test_accuracy")}
    return summary


def headline_numbers(metrics):
    """The numbers --eval-only recomputes, keyed by model and seed."""
    numbers = {f"{r['model']}_seed{r['seed']}": {k: v for k, v in r.items()
                                                  if k.endswith("test_accuracy")}
               for r in metrics["runs"]}
    numbers["figure5_domain_knn_accuracy"] = metrics.get("figure5_domain_knn_accuracy", {})
    return numbers


def domain_mixing(features, domains):
    """How separable the two domains are in a feature space: 5-fold cross-validated accuracy of
    a 5-nearest-neighbour domain classifier (0.5 = fully mixed, 1.0 = fully separated)."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = int(min(5, np.bincount(domains).min()))
    if folds < 2:
        return None
    return float(cross_val_score(KNeighborsClassifier(5), features, domains, cv=folds).mean())


def first_epoch_near_best(history, key="target_val_accuracy", tolerance=EPOCH_TOLERANCE):
    """(best value, its epoch, the first epoch within `tolerance` of it) of a history."""
    best = max(history, key=lambda h: h[key])
    near = next(h["epoch"] for h in history if h[key] >= best[key] - tolerance)
    return best[key], best["epoch"], near


# =======================================================================================
# Figures
# =======================================================================================
def plot_mnistm_samples(data, path, n=12):
    """MNIST digits above their MNIST-M versions, for the train and the test split."""
    import matplotlib.pyplot as plt

    rows = [as_input(data["source_train"][:n]), as_input(data["target_train"][:n]),
            as_input(data["source_test"][:n]), as_input(data["target_test"][:n])]
    if len(data["source_train"]) != len(data["target_train"]):  # official set: not paired
        rows = rows[1::2]
    fig, ax = plt.subplots(figsize=(n * 0.6, len(rows) * 0.7))
    ax.imshow(image_grid(torch.cat(rows).cpu(), nrow=n))
    ax.set_axis_off()
    ax.set_title("rows: MNIST train, MNIST-M train, MNIST test, MNIST-M test" if len(rows) == 4
                 else "rows: MNIST-M train, MNIST-M test", fontsize=8)
    save_figure(fig, path)


def plot_figure5(embeddings, domains, digits, path_domain, path_digits):
    """Figure 5: t-SNE of the 768-d features, blue = MNIST (source), red = MNIST-M (target),
    (a) non-adapted, (b) adapted; and the same points coloured by digit."""
    import matplotlib.pyplot as plt

    for path, labels, names, colors in (
            (path_domain, domains, ["MNIST (source)", "MNIST-M (target)"], ["blue", "red"]),
            (path_digits, digits, [str(d) for d in range(10)], None)):
        fig, axes = plt.subplots(1, len(embeddings), figsize=(6 * len(embeddings), 5.6),
                                 squeeze=False)
        for ax, (letter, (name, embedding)) in zip(axes[0], zip("abc", embeddings.items())):
            scatter_by_label(ax, embedding, labels, names, colors,
                             f"({letter}) {MODEL_TITLES[name]}", size=7)
        save_figure(fig, path)


def plot_curves(records, path):
    """Per epoch: label loss and (DANN) domain-classifier accuracy on the training batches and
    on the validation images, and the MNIST and MNIST-M validation accuracies."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    colors = {"source_only": "tab:blue", "dann": "tab:red", "target_only": "tab:green"}
    panels = [("label_loss", "label loss (training batches)"),
              ("domain_accuracy", "domain classifier accuracy\n(training batches; dashed: validation)"),
              ("source_val_accuracy", "MNIST validation accuracy"),
              ("target_val_accuracy", "MNIST-M validation accuracy (oracle)")]
    for ax, (key, title) in zip(axes, panels):
        for record in records:
            first = record["seed"] == min(r["seed"] for r in records if r["model"] == record["model"])
            for k, style in ((key, "-"), ("val_domain_accuracy", "--")):
                points = [(h["epoch"], h[k]) for h in record["history"] if h.get(k) is not None]
                if points and (style == "-" or key == "domain_accuracy"):
                    ax.plot(*zip(*points), style, marker="o", ms=3, color=colors[record["model"]],
                            alpha=1.0 if first else 0.35,
                            label=MODEL_TITLES[record["model"]] if first and style == "-" else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[1].axhline(0.5, color="grey", ls=":", lw=0.8)
    save_figure(fig, path)


def draw_figures(trained, data, args, folder):
    """MNIST-M samples, Figure 5 (first seed of source only and DANN), training curves and
    MNIST-M test confusion matrices, into `folder`. Returns the figure names and Figure 5's
    domain mixing."""
    figures, mixing = {"samples": "mnistm_samples.png"}, {}
    plot_mnistm_samples(data, os.path.join(folder, figures["samples"]))
    first = {}
    for (name, _), (model, _) in trained.items():
        first.setdefault(name, model)
    adapted = [n for n in ("source_only", "dann") if n in first]
    if adapted:
        source = torch.from_numpy(subsample(len(data["source_test"]), args.tsne_points, 0))
        target = torch.from_numpy(subsample(len(data["target_test"]), args.tsne_points, 1))
        domains = np.r_[np.zeros(len(source), int), np.ones(len(target), int)]
        digits = np.r_[data["source_test_labels"].cpu()[source].numpy(),
                       data["target_test_labels"].cpu()[target].numpy()]
        embeddings = {}
        for name in adapted:
            features = torch.cat([embed(first[name], data["source_test"][source.to(data["source_test"].device)]),
                                  embed(first[name], data["target_test"][target.to(data["target_test"].device)])]).cpu().numpy()
            embeddings[name] = tsne_embed(features, seed=0)
            mixing[name] = domain_mixing(features, domains)
        figures["figure5_domain"] = "figure5_tsne_domain.png"
        figures["figure5_digits"] = "figure5_tsne_digits.png"
        plot_figure5(embeddings, domains, digits, os.path.join(folder, figures["figure5_domain"]),
                     os.path.join(folder, figures["figure5_digits"]))
    records = [record for _, record in trained.values() if record and record.get("history")]
    if records:
        figures["curves"] = "training_curves.png"
        plot_curves(records, os.path.join(folder, figures["curves"]))
    figures["confusion"] = {}
    for name, model in first.items():
        confusion = classification_metrics(data["target_test_labels"].cpu().numpy(),
                                           predict(model, data["target_test"]).numpy(),
                                           [str(d) for d in range(10)])
        figures["confusion"][name] = f"confusion_mnistm_{name}.png"
        plot_confusion_matrix(confusion, os.path.join(folder, figures["confusion"][name]),
                              f"{MODEL_TITLES[name]} on MNIST-M test")
    return figures, mixing


# =======================================================================================
# Report: a template filled from metrics.json (and the runs kept in runs/)
# =======================================================================================
def cell(summary):
    if summary is None:
        return "—"
    if summary["n"] == 1:
        return f"{summary['mean']:.4f}"
    return f"{summary['mean']:.4f} ± {summary['std']:.4f} (n={summary['n']})"


def table2(summary, with_svm):
    keys = ["mnist_test_accuracy", "mnistm_test_accuracy"]
    head = ["Method", "MNIST test (ours)", "MNIST-M test (ours)"]
    if with_svm:
        keys += ["svm_mnist_test_accuracy", "svm_mnistm_test_accuracy"]
        head += ["MNIST test (ours, SVM last layer)", "MNIST-M test (ours, SVM last layer)"]
    head += ["MNIST-M (paper, JMLR 2016, Table 2)", "MNIST-M (paper, ICML 2015)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in MODELS:
        if name in summary:
            cells = [MODEL_TITLES[name]] + [cell(summary[name].get(k)) for k in keys]
            cells += [f"{PAPER[name]:.4f}", f"{PAPER_ICML2015[name]:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def runs_table(runs):
    lines = ["| model | seed | epochs | MNIST test | MNIST-M test | MNIST-M test (SVM) | final MNIST-M "
             "validation | training s | validation s | images/s |", "|" + "---|" * 10]
    for r in runs:
        t = r["training"]
        svm = f"{r['svm_mnistm_test_accuracy']:.4f}" if "svm_mnistm_test_accuracy" in r else "—"
        lines.append(f"| {MODEL_TITLES[r['model']]} | {r['seed']} | {t['epochs']} | "
                     f"{r['mnist_test_accuracy']:.4f} | {r['mnistm_test_accuracy']:.4f} | {svm} | "
                     f"{t['history'][-1]['target_val_accuracy']:.4f} | {t['train_seconds']:.0f} | "
                     f"{t['validation_seconds']:.0f} | {t['images_per_second']:.0f} |")
    return lines


def epoch_choice_section(runs_here, epochs):
    """The validation run that set the default epoch count: its per-epoch table and the
    count it points to, beside this run's count."""
    choice = dict(runs_here).get(EPOCH_CHOICE_RUN)
    if choice is None:
        return [f"No validation run is kept in runs/{EPOCH_CHOICE_RUN}/ beside this result.", ""]
    record = next(r["training"] for r in choice["runs"] if r["model"] == "dann")
    history = record["history"]
    best, best_epoch, near = first_epoch_near_best(history)
    source_best = max(history, key=lambda h: h["source_val_accuracy"])
    domain_low = min(history, key=lambda h: h["val_domain_accuracy"])
    lines = [f"One DANN run (seed {record['seed']}, {record['epochs']} epochs, "
             f"`{shown_command(choice['command'])}`) watched the held-out validation images after every epoch:", "",
             "| epoch | lr_p | lambda_p | domain acc. (training batches) | domain acc. (validation) "
             "| MNIST validation | MNIST-M validation (oracle) |", "|" + "---|" * 7]
    lines += [f"| {h['epoch']} | {h['lr']:.5f} | {h['lambda']:.3f} | {h['domain_accuracy']:.3f} | "
              f"{h['val_domain_accuracy']:.3f} | {h['source_val_accuracy']:.4f} | "
              f"{h['target_val_accuracy']:.4f} |" for h in history]
    ending = (f"after epoch {near} it gains less than {EPOCH_TOLERANCE}" if near < len(history)
              else "the curve comes within that distance only at the last epoch, so it had not "
                   "levelled off: the count is bounded by the run's length, not by the curve")
    lines += ["", f"Its best MNIST-M validation accuracy is {best:.4f} (epoch {best_epoch}); the "
              f"first epoch within {EPOCH_TOLERANCE} of it is epoch {near}: {ending}. lr_p and "
              f"lambda_p follow the progress p of the whole run, so epoch {near} of this run is "
              f"not a run of {near} epochs; the curve says where more training stops paying. "
              f"This run trains {epochs} epochs, "
              + ("the count this validation run points to." if epochs == near
                 else f"not the {near} this validation run points to.")
              + f" The validation run's own MNIST-M test accuracy, evaluated once after its "
              f"training: {choice['runs'][0]['mnistm_test_accuracy']:.4f}.",
              "", f"Without target labels one can only watch the other two columns (a low source "
              f"error and a high domain-classifier error are the signs of adaptation): the MNIST "
              f"validation accuracy peaks at epoch {source_best['epoch']} "
              f"({source_best['source_val_accuracy']:.4f}), and the domain classifier is weakest on "
              f"the validation images at epoch {domain_low['epoch']} "
              f"({domain_low['val_domain_accuracy']:.3f}; 0.5 is chance).", ""]
    return lines


def other_runs_section(runs_here, metrics):
    if not runs_here:
        return []
    lines = ["## Other runs kept beside this result", "",
             "| run | command | model, seed: MNIST-M test (SVM) | epochs | wall time |", "|---|---|---|---|---|"]
    for name, kept in runs_here:
        results = "; ".join(
            f"{MODEL_TITLES[r['model']]} {r['seed']}: {r['mnistm_test_accuracy']:.4f}"
            + (f" ({r['svm_mnistm_test_accuracy']:.4f})" if "svm_mnistm_test_accuracy" in r else "")
            for r in kept["runs"])
        lines.append(f"| runs/{name} | `{shown_command(kept['command'])}` | {results} | "
                     f"{kept['settings']['epochs']} | {kept['timings']['total_seconds'] / 60:.1f} min |")
    return lines + [""] + dann_seeds(metrics, runs_here)


def dann_seeds(metrics, runs_here):
    """Mean and spread of DANN over the seeds trained with this run's epoch count, here and in
    the kept runs (like with like: the same settings, other seeds)."""
    epochs = metrics["settings"]["epochs"]
    rows = [r for m in [metrics] + [m for _, m in runs_here] for r in m["runs"]
            if r["model"] == "dann" and r["training"]["epochs"] == epochs]
    if len(rows) < 2:
        return []
    lines = []
    for key, what in (("mnistm_test_accuracy", "softmax"), ("svm_mnistm_test_accuracy", "SVM last layer")):
        if all(key in r for r in rows):
            lines.append(f"{what} {cell(summarize([r[key] for r in rows]))}")
    return [f"DANN with this run's {epochs} epochs, seeds {', '.join(str(r['seed']) for r in rows)}: "
            f"MNIST-M test accuracy " + "; ".join(lines) + " (mean ± standard deviation).", ""]


def observations(metrics):
    """Sentences against the paper, each computed from this run's numbers. The paper's Table 2
    retrained every last layer with a linear SVM: with --svm-retrain, that column is compared."""
    summary = metrics["summary"]

    def mean(name, key="mnistm_test_accuracy"):
        return summary[name][key]["mean"] if name in summary and key in summary[name] else None

    def on_mnistm(name):
        svm = mean(name, "svm_mnistm_test_accuracy")
        return (f"{mean(name):.4f} on MNIST-M" + (f", {svm:.4f} with the last layer retrained by a "
                                                  f"linear SVM as in the paper" if svm is not None else "")
                + f" (paper {PAPER[name]})")

    def paper_like(name):
        svm = mean(name, "svm_mnistm_test_accuracy")
        return mean(name) if svm is None else svm

    parts = []
    source_only, dann, target_only = mean("source_only"), mean("dann"), mean("target_only")
    if source_only is not None:
        parts.append(f"Source only reaches {on_mnistm('source_only')} and "
                     f"{mean('source_only', 'mnist_test_accuracy'):.4f} on MNIST: the domain shift costs "
                     f"{mean('source_only', 'mnist_test_accuracy') - source_only:.2f} of accuracy.")
    if dann is not None:
        n = summary["dann"]["mnistm_test_accuracy"]["n"]
        parts.append(f"DANN reaches {on_mnistm('dann')}"
                     + (f", a mean over {n} seeds" if n > 1 else ", one seed")
                     + f": {'above' if paper_like('dann') > PAPER['dann'] else 'below'} the paper's "
                     f"figure"
                     + (f", {dann - source_only:+.4f} over source only" if source_only is not None else "")
                     + (f", closing {100 * (dann - source_only) / (target_only - source_only):.0f} % of "
                        f"the gap to train on target" if None not in (source_only, target_only)
                        and target_only > source_only else "")
                     + f", while keeping {mean('dann', 'mnist_test_accuracy'):.4f} on MNIST.")
    if target_only is not None:
        parts.append(f"Train on target, the upper bound, reaches {on_mnistm('target_only')}.")
    svm = {k: mean(k, "svm_mnistm_test_accuracy") - mean(k) for k in summary
           if mean(k, "svm_mnistm_test_accuracy") is not None}
    if svm:
        change = max(svm.values(), key=abs)
        parts.append("Retraining the last layer with a linear SVM "
                     + (f"changes the MNIST-M accuracy little (at most {change:+.3f}): the softmax layer "
                        "is already a linear classifier of the same features." if abs(change) < 0.02
                        else f"moves the MNIST-M accuracy by up to {change:+.3f}."))
    return parts + domain_observations(metrics)


def domain_observations(metrics):
    parts, mixing = [], metrics.get("figure5_domain_knn_accuracy") or {}
    if mixing.get("dann") is not None and mixing.get("source_only") is not None:
        mixed = mixing["dann"] < mixing["source_only"] - 0.1
        parts.append(f"Figure 5: a 5-nearest-neighbour domain classifier on the plotted 768-d "
                     f"features tells MNIST from MNIST-M with accuracy {mixing['source_only']:.3f} "
                     f"without adaptation and {mixing['dann']:.3f} with it (0.5 = fully mixed)"
                     + (": as in the paper's Figure 5, separate clouds without adaptation, much "
                        "more overlap with it." if mixed else ": the adapted features are not "
                        "clearly more mixed, unlike the paper's Figure 5."))
    dann = [r["training"]["history"][-1] for r in metrics["runs"] if r["model"] == "dann"]
    if dann:
        last = dann[0]
        parts.append(f"At the end of DANN training the domain classifier's accuracy is "
                     f"{last['domain_accuracy']:.3f} on the training batches and "
                     f"{last['val_domain_accuracy']:.3f} on the validation images (chance 0.5)"
                     + (": the features have become hard to tell apart." if last["val_domain_accuracy"] < 0.75
                        else ": the domain classifier still tells the domains apart."))
    return parts


def choices(metrics):
    """Where the paper is silent, what this run did (from its flags)."""
    s = metrics["settings"]
    steps = metrics["runs"][0]["training"]["steps"] // s["epochs"] if metrics["runs"] else 0
    return [
        f"MNIST-M ({metrics['data']['kind']}): 28x28 crops drawn uniformly from a uniformly chosen "
        f"photo, grey digits not binarised, |patch - digit| per channel; training digits over the "
        f"BSDS500 train photos, test digits over the test photos; construction seed "
        f"--mnistm-seed {s['mnistm_seed']}, independent of the training seed."
        if s["mnistm"] == "build" else f"MNIST-M: {metrics['data']['kind']}.",
        f"Validation: {s['validation_size']} labelled images held out of MNIST train and of MNIST-M "
        f"train (the same digits in both), never trained on; the training loop watches them every "
        f"epoch. The MNIST-M labels used there are an oracle that unsupervised adaptation does not "
        f"have: they set one number, the epoch count, and the MNIST-M test set is evaluated once, "
        f"after training.",
        f"{s['epochs']} epochs of {steps} steps, {s['batch_size']} labelled images a step (DANN "
        f"adds {s['batch_size']} target images); p = step / total steps drives lr_p (mu_0 = "
        f"{s['lr']}) and lambda_p; SGD momentum {s['momentum']}; the same for the three models.",
        "One per-channel mean over the union of the MNIST and MNIST-M training images is "
        "subtracted, the same for both domains and the three models.",
        "Domain loss: mean logistic loss over the images of a step, source = 0, target = 1, weight "
        "1; lambda_p only in the gradient reversal layer. Initialisation: PyTorch's defaults.",
        "Each max-pooling runs before its ReLU (the same function and gradients as the paper's "
        "order, computed on 4x fewer values), in PyTorch's channels-last layout.",
        (f"SVM: LinearSVC, C = 1, on standardised 100-d inputs of the last layer, trained on "
         f"{s['svm_train_size']} images of the model's labelled training set." if s["svm_retrain"]
         else "No SVM retraining (--svm-retrain not given)."),
        f"Figure 5: {s['tsne_points']} + {s['tsne_points']} test images, the same in both panels, "
        f"t-SNE (scikit-learn, PCA initialisation, perplexity 30) run on each model's features.",
    ]


def timings_section(metrics):
    t = metrics["timings"]
    total = t["total_seconds"]
    lines = ["## Timings", "",
             f"This run took {total / 60:.1f} minutes on {metrics['machine']['description']}"
             + (" (it was resumed: the stage times below cover its last part; the training "
                "times per model add up every part)." if metrics["resumed"] else
                ", in one uninterrupted run."), "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage.replace('_seconds', '').replace('_', ' ')} | {seconds:.1f} |"
              for stage, seconds in t.items() if stage != "total_seconds"]
    return lines + [f"| total | {total:.1f} |", ""]


def render_report(metrics, out):
    """report.md from metrics.json and the runs kept in <out>/runs/ alone."""
    s, figures, runs_here = metrics["settings"], metrics["figures"], other_runs(out)
    lines = ["# Question 3.2: DANN from MNIST to MNIST-M (Ganin et al., JMLR 2016, Section 5.2)", "",
             f"Command: `{shown_command(metrics['command'])}`", "",
             f"Machine: {metrics['machine']['description']}; device `{metrics['device']}`.", "",
             "## Table 2 (target = MNIST-M test accuracy)", ""]
    lines += table2(metrics["summary"], s["svm_retrain"])
    lines += ["", "Ours: the network's own softmax output"
              + (" and, as in the paper, the last layer retrained by a linear SVM" if s["svm_retrain"] else "")
              + ". Mean ± standard deviation (n-1) over the seeds named by n. The paper's numbers "
              "are its MNIST-M column (every method's last layer retrained by a linear SVM).", "",
              "Per model and seed (test sets evaluated once, after training):", ""]
    lines += runs_table(metrics["runs"]) + ["", "## Observations against the paper", ""]
    lines += [" ".join(observations(metrics)), "", "## The epoch count, chosen on validation data", ""]
    lines += epoch_choice_section(runs_here, s["epochs"])
    lines += other_runs_section([(n, m) for n, m in runs_here if n != EPOCH_CHOICE_RUN], metrics)
    lines += ["## MNIST-M", "", f"![MNIST and MNIST-M]({figures['samples']})", "",
              f"MNIST-M: {metrics['data']['target_train']} train / {metrics['data']['target_val']} "
              f"validation / {metrics['data']['target_test']} test images; MNIST "
              f"{metrics['data']['source_train']} / {metrics['data']['source_val']} / "
              f"{metrics['data']['source_test']}.", ""]
    if "figure5_domain" in figures:
        lines += ["## Figure 5: t-SNE of the feature-extractor output", "",
                  f"{s['tsne_points']} MNIST test + {s['tsne_points']} MNIST-M test images, 768-d "
                  "output of the feature extractor (the input of the gradient reversal layer); "
                  "blue = source (MNIST), red = target (MNIST-M).", "",
                  f"![Figure 5 by domain]({figures['figure5_domain']})", "",
                  f"The same embeddings coloured by digit:", "",
                  f"![Figure 5 by digit]({figures['figure5_digits']})", ""]
    if "curves" in figures:
        lines += ["## Training curves", "", "Per epoch: the mean label loss and the domain "
                  "classifier's accuracy on the training batches (dashed: on the validation "
                  "images), and the validation accuracies. Lighter lines are further seeds.", "",
                  f"![training curves]({figures['curves']})", ""]
    if figures.get("confusion"):
        lines += ["## Confusion matrices on MNIST-M test (first seed)", ""]
        lines += [f"![{name}]({path})" for name, path in figures["confusion"].items()] + [""]
    lines += timings_section(metrics)
    lines += ["## Choices where the paper is silent", ""] + [f"- {c}" for c in choices(metrics)]
    return "\n".join(lines) + "\n"


# =======================================================================================
# Main: train, evaluate once on the test sets, draw, write metrics.json and report.md
# =======================================================================================
def evaluate_all(trained, data, args):
    runs = []
    for (name, seed), (model, record) in trained.items():
        result = evaluate(name, model, data, args)
        runs.append({"model": name, "seed": seed, **result, "training": record})
        print(f"[{name} seed {seed}] test: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()),
              flush=True)
    return runs


def train_and_report(args, device, resumed):
    timings, start = {}, time.perf_counter()
    with stage(timings, "data_seconds"):
        data, data_info = load_data(args, device)
    mean = pixel_mean(data)
    with stage(timings, "training_seconds"):
        trained = train_all(args, data, device, mean, resumed)
    note_saved(f"every model is trained and saved in {args.out}/; --resume redoes the "
               f"evaluation and the figures from the saved weights")
    with stage(timings, "test_evaluation_seconds"):
        runs = evaluate_all(trained, data, args)
    with stage(timings, "figures_seconds"):
        figures, mixing = draw_figures(trained, data, args, args.out)
    timings["total_seconds"] = round(time.perf_counter() - start, 2)
    metrics = {"command": command_line(), "resumed": resumed is not None, "device": str(device),
               "machine": machine_info(device), "settings": vars(args), "data": data_info,
               "pixel_mean": mean, "timings": timings, "runs": runs,
               "summary": summarize_runs(runs), "figures": figures,
               "figure5_domain_knn_accuracy": mixing}
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    write_text(os.path.join(args.out, "report.md"), render_report(metrics, args.out))
    os.remove(training_state_path(args.out))  # the run is complete: nothing left to resume
    print("\n".join(table2(metrics["summary"], args.svm_retrain)))
    print(f"wrote {args.out}/ (report.md, metrics.json, figures, weights) in "
          f"{timings['total_seconds'] / 60:.1f} min")


def find_weights(path):
    """{(name, seed): file} from a weights file or a folder (name.pt, name_seed<k>.pt)."""
    if os.path.isfile(path):
        state = load_checkpoint(path, tuple(KINDS.values()))
        return {(state["hparams"]["model"], state["hparams"]["seed"]): path}
    if not os.path.isdir(path):
        raise UserError(f"--weights {path} does not exist")
    found = {}
    for name in MODELS:
        for file in [os.path.join(path, f"{name}.pt")] + sorted(
                glob.glob(os.path.join(path, f"{name}_seed*.pt"))):
            if os.path.isfile(file):
                found[(name, load_checkpoint(file, KINDS[name])["hparams"]["seed"])] = file
    if not found:
        raise UserError(f"--weights {path} is a folder without weights files (source_only.pt, "
                        f"dann.pt, target_only.pt); give the folder a run wrote, or one file")
    return found


def eval_only(args, parser, argv, device):
    """Recompute every number and figure from saved weights into <out>/eval/, and print each
    beside the value in the metrics.json saved with the weights."""
    weights = args.weights or args.out
    found = find_weights(weights)
    saved_path = os.path.join(weights if os.path.isdir(weights) else os.path.dirname(weights),
                              "metrics.json")
    saved = read_json(saved_path, "metrics file") if os.path.isfile(saved_path) else None
    given = given_flags(parser, argv)
    for key in EVAL_SETTINGS:  # split and evaluate the data as the saved run did
        if saved and key in saved["settings"] and key not in given:
            setattr(args, key, saved["settings"][key])
    eval_dir = prepare_out(os.path.join(args.out, "eval"))
    data, data_info = load_data(args, device)
    trained = {}
    for (name, seed), file in sorted(found.items(), key=lambda kv: (MODELS.index(kv[0][0]), kv[0][1])):
        trained[(name, seed)] = (load_model(file).to(device),
                                 load_checkpoint(file, KINDS[name]).get("record"))
    runs = [{"model": name, "seed": seed, **evaluate(name, model, data, args)}
            for (name, seed), (model, _) in trained.items()]
    figures, mixing = draw_figures(trained, data, args, eval_dir)
    metrics = {"command": command_line(), "weights": {f"{n}_seed{s}": f for (n, s), f in found.items()},
               "device": str(device), "machine": machine_info(device), "settings": vars(args),
               "data": data_info, "runs": runs, "summary": summarize_runs(runs),
               "figures": figures, "figure5_domain_knn_accuracy": mixing}
    write_json(os.path.join(eval_dir, "metrics.json"), metrics)
    print("\n".join(table2(metrics["summary"], args.svm_retrain)))
    if saved is None:
        print(f"no {saved_path} beside the weights: nothing to compare with")
    else:
        print(f"recomputed (saved in {saved_path}):")
        compare_with_committed(headline_numbers(metrics), headline_numbers(saved), eval_dir)
    print(f"wrote {eval_dir}/ (metrics.json, comparison.json, figures)")


def download_data(args):
    """--download-only: MNIST and BSDS500 into --data-dir, so later runs need no network."""
    load_mnist(args.data_dir, download=True)
    root = find_bsds(args)
    print(f"MNIST is in {os.path.join(args.data_dir, 'MNIST', 'raw')}/ and BSDS500 in {root}/")


def main(argv=None):
    parser = build_parser()
    args = parse_args(argv, parser)
    if args.report_only:
        report_only(args.out, render_report)
        return
    prepare_out(args.out)
    if args.download_only:
        download_data(args)
        return
    device = choose_device(args.device)
    if args.eval_only:
        eval_only(args, parser, argv, device)
        return
    resumed = (load_training_state(training_state_path(args.out), args, parser, argv)
               if args.resume else None)
    train_and_report(args, device, resumed)


if __name__ == "__main__":
    run_cli(main)
