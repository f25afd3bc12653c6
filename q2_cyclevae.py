"""Question 2: the Cycle-Consistent VAE (Jha, Anand, Singh & Veeravasarapu, ECCV 2018) on the
2D Sprites of Reed et al. (2015), with the character identity as the specified factor.

The image is split into an unspecified part z (variational, KL to N(0, I)) and a specified
part s (deterministic). Forward cycle: two frames of the same character are reconstructed with
their s swapped. Reverse cycle: one z from the prior is decoded with the s of two arbitrary
images; the two re-encoded z means must agree, which keeps identity out of z.

    python q2_cyclevae.py --data-dir ../shared/data/sprites_reed2015     # CPU default, < 1 h
    python q2_cyclevae.py --paper-scale --device cuda ...                 # the paper's scale
    python q2_cyclevae.py --eval-only --weights outputs/q2/cyclevae.pt   # figures and numbers
"""
import argparse
import hashlib
import os
import shutil
import signal
import tarfile
import time
import urllib.request
import zipfile
import zlib
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (UserError, add_common_args, check_finite, choose_device, command_line,
                    load_checkpoint, load_weights, nonnegative_float,
                    positive_float, positive_int, run_cli, save_checkpoint, save_figure,
                    seed_everything, stage, write_json, write_text)
from common import machine_info

import matplotlib.pyplot as plt  # noqa: E402  (common.py has selected the Agg backend)

KIND = "q2-cyclevae"
TRAINING_SETTINGS = ("batch_size", "epochs", "lr", "lr_drop_epoch", "reconstruction_coef",
                     "reverse_cycle_coef", "kl_coef", "warmup_epochs", "reverse_update", "seed")
TRAIN_KIND = "q2-cyclevae-training-state"

# ---------------------------------------------------------------------------------------
# Data: Reed et al.'s nips2015-analogy-data.tar.gz, data/sprites/sprites_<i>.mat (v7.3)
# ---------------------------------------------------------------------------------------
SPRITES_URL = "http://www-personal.umich.edu/~reedscot/files/nips2015-analogy-data.tar.gz"
ARCHIVE = "nips2015-analogy-data.tar.gz"
DOWNLOAD_TIMEOUT_S = 10  # a dead mirror or no network fails in seconds, not minutes
# The archive's own checksum is not published; these are the md5 sums of three of its files
# (byte-identical copies checked for this project), verified after extraction.
KNOWN_MD5 = {"sprites_splits.mat": "5e0a46fba80e68846ed63d3b1e1b05d8",
             "sprites_0.mat": "82b83d27b1935222f3c5441c846cfa49",
             "sprites_1.mat": "cbb7acd1cbebcec1086c6c2b5c18ecd3"}
CACHE_NAME = "sprites_uint8.npz"               # what this script writes once
SHARED_CACHE_NAME = "sprites_reed2015_uint8.npz"  # the same content under another name
CACHE_KEYS = ("sprites", "masks", "labels", "anim_lengths", "anim_offsets")
SPLIT_NAME = "sprites_splits.mat"
ANIMATIONS = [f"{a}-{d}" for a in ("spellcast", "thrust", "walk", "slash", "shoot")
              for d in ("back", "left", "front", "right")] + ["hurt"]
ATTRIBUTES = ["body", "sex", "hair", "armour", "arm", "greaves", "weapon"]  # order unchecked
IMAGE_SIZE = 60
LOGVAR_INIT = -5.0  # initial bias of the z log-variance head


def sprite_dirs(data_dir):
    """Folders where the original character files may be: the archive's layout first."""
    return [os.path.join(data_dir, "data", "sprites"), os.path.join(data_dir, "sprites"),
            data_dir]


def find_split_file(data_dir):
    for folder in sprite_dirs(data_dir) + [os.path.join(data_dir, "original")]:
        path = os.path.join(folder, SPLIT_NAME)
        if os.path.isfile(path):
            return path
    return None


def read_splits(path):
    """Reed's split: 1-based character ids in trainidx / validx / testidx -> 0-based arrays."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        splits = {name: np.asarray(mat[key], dtype=np.int64).ravel() - 1
                  for name, key in (("train", "trainidx"), ("val", "validx"), ("test", "testidx"))}
    except Exception:
        raise UserError(f"split file {path} is not the expected MATLAB file with trainidx, "
                        f"validx and testidx") from None
    if any(len(ids) == 0 or ids.min() < 0 for ids in splits.values()):
        raise UserError(f"split file {path} has empty splits or ids below 1 (they are 1-based)")
    return splits


def read_character_mat(path):
    """One character of the original data: a MATLAB v7.3 (HDF5) file with cell arrays
    `sprites` and `masks` (one float64 (frames, 10800) / (frames, 3600) array in [0,1] per
    animation) and `labels` (7 attributes). Returns uint8 frames (n,60,60,3), masks (n,60,60),
    labels (7,) and the animation lengths."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            cells = {}
            for key in ("sprites", "masks"):
                refs = np.asarray(f[key]).ravel()
                cells[key] = [np.asarray(f[ref], dtype=np.float64) for ref in refs]
            labels = np.asarray(f["labels"], dtype=np.float64).ravel()
    except Exception as error:
        raise UserError(f"{path} is not a readable MATLAB v7.3 sprite file with sprites, masks "
                        f"and labels ({type(error).__name__})") from None
    lengths = [a.shape[0] for a in cells["sprites"]]
    side = IMAGE_SIZE
    if (len(labels) != 7 or [m.shape[0] for m in cells["masks"]] != lengths
            or any(a.ndim != 2 or a.shape[1] != 3 * side * side for a in cells["sprites"])
            or any(m.ndim != 2 or m.shape[1] != side * side for m in cells["masks"])):
        raise UserError(f"{path} does not have the expected layout (cells of frames x 10800 "
                        f"sprites, frames x 3600 masks, 7 labels)")
    frames = np.concatenate(cells["sprites"])
    masks = np.concatenate(cells["masks"])
    # MATLAB stores each 60x60x3 frame column-major: h5py sees (channel, column, row).
    frames = np.rint(255 * frames).reshape(-1, 3, side, side).transpose(0, 3, 2, 1)
    masks = np.rint(255 * masks).reshape(-1, side, side).transpose(0, 2, 1)
    return (frames.astype(np.uint8), masks.astype(np.uint8), labels.astype(np.uint8),
            np.array(lengths, dtype=np.int16))


def convert_originals(folder, n_characters):
    """Read sprites_0.mat ... sprites_<n-1>.mat into the arrays of the uint8 cache."""
    sprites, masks, labels, lengths = [], [], [], None
    for i in range(n_characters):
        path = os.path.join(folder, f"sprites_{i}.mat")
        frames, mask, label, anim = read_character_mat(path)
        if lengths is None:
            lengths = anim
        elif not np.array_equal(anim, lengths):
            raise UserError(f"{path} has animations of {anim.tolist()} frames, the other "
                            f"characters {lengths.tolist()}")
        sprites.append(frames)
        masks.append(mask)
        labels.append(label)
    return {"sprites": np.stack(sprites), "masks": np.stack(masks), "labels": np.stack(labels),
            "anim_lengths": lengths,
            "anim_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int16)}


def fallback_cache_path(data_dir):
    """Where the cache goes when the data folder is read-only: a per-folder user cache."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:12]
    return os.path.join(root, "q2_cyclevae", tag, CACHE_NAME)


def write_cache(data, data_dir):
    """Write the cache beside the data, or into the user cache when that folder is read-only."""
    from common import atomic_write

    for path in (os.path.join(data_dir, CACHE_NAME), fallback_cache_path(data_dir)):
        try:
            atomic_write(path, lambda tmp: np.savez_compressed(open(tmp, "wb"), **data))
            return path
        except OSError:
            continue
    return None


def load_cache(path, with_masks=False):
    """Read and check a uint8 cache (the keys and shapes of sprites_reed2015_uint8.npz)."""
    try:
        with np.load(path) as npz:
            missing = [k for k in CACHE_KEYS if k not in npz.files]
            if missing:
                raise UserError(f"cache {path} lacks the arrays {', '.join(missing)}; delete it "
                                f"to rebuild it from the .mat files")
            data = {k: npz[k] for k in CACHE_KEYS if with_masks or k != "masks"}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        raise UserError(f"cache {path} is truncated or corrupt; delete it to rebuild it from "
                        f"the .mat files or copy it again") from None
    sprites, lengths, offsets = data["sprites"], data["anim_lengths"], data["anim_offsets"]
    n = len(sprites)
    if (sprites.dtype != np.uint8 or sprites.ndim != 5 or sprites.shape[2:] != (60, 60, 3)
            or data["labels"].shape != (n, 7) or int(np.sum(lengths)) != sprites.shape[1]
            or len(offsets) != len(lengths) + 1 or offsets[-1] != sprites.shape[1]):
        raise UserError(f"cache {path} does not hold uint8 sprites (characters, frames, 60, 60, "
                        f"3) with matching labels and animation lengths")
    return data


def download_originals(data_dir):
    """Fetch Reed et al.'s archive and extract data/sprites/ into data_dir; False on failure."""
    archive = os.path.join(data_dir, ARCHIVE)
    try:
        os.makedirs(data_dir, exist_ok=True)
        if not os.path.isfile(archive):
            print(f"downloading {SPRITES_URL} ...", flush=True)
            with urllib.request.urlopen(SPRITES_URL, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                    open(archive + ".part", "wb") as out:
                shutil.copyfileobj(response, out)
            os.replace(archive + ".part", archive)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and
                       m.name.lstrip("./").startswith("data/sprites/") and ".." not in m.name]
            tar.extractall(data_dir, members=members)
    except Exception as error:  # no network, mirror down, disk full, bad archive
        print(f"download failed: {type(error).__name__}: {error}", flush=True)
        return False
    folder = os.path.join(data_dir, "data", "sprites")
    for name, md5 in KNOWN_MD5.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or hashlib.md5(open(path, "rb").read()).hexdigest() != md5:
            raise UserError(f"the downloaded {archive} failed its checksum ({name}); delete it "
                            f"and try again")
    return True


def load_sprites(data_dir, download=True):
    """The whole dataset as uint8 arrays plus Reed's split (0-based character ids).

    Looked up in this order: the cache sprites_uint8.npz (or sprites_reed2015_uint8.npz, the
    same content) in data_dir, the cache in the user cache folder, the original .mat files
    (converted once into the cache), Reed's archive (downloaded)."""
    data_dir = os.path.abspath(data_dir)
    nested = os.path.join(data_dir, "sprites_reed2015")  # a data folder shared by all scripts
    if find_split_file(data_dir) is None and find_split_file(nested) is not None:
        data_dir = nested
    split_path = find_split_file(data_dir)
    mat_dir = next((d for d in sprite_dirs(data_dir)
                    if os.path.isfile(os.path.join(d, "sprites_0.mat"))), None)
    if split_path is None and mat_dir is None and download:
        if download_originals(data_dir):
            split_path = find_split_file(data_dir)
            mat_dir = os.path.join(data_dir, "data", "sprites")
    if split_path is None:
        raise UserError(f"{SPLIT_NAME} is missing and could not be downloaded: put Reed et al.'s "
                        f"data/sprites/ folder (from {ARCHIVE}: sprites_0.mat ... sprites_671.mat "
                        f"and {SPLIT_NAME}) into {data_dir}/ (a {CACHE_NAME} cache may replace "
                        f"the .mat files, not the split file)")
    splits = read_splits(split_path)
    n_characters = int(max(ids.max() for ids in splits.values())) + 1

    caches = [os.path.join(data_dir, CACHE_NAME), os.path.join(data_dir, SHARED_CACHE_NAME),
              fallback_cache_path(data_dir)]
    cache = next((p for p in caches if os.path.isfile(p)), None)
    if cache is not None:
        data = load_cache(cache)
    else:
        if mat_dir is None:
            raise UserError(f"the sprite files are missing: put sprites_0.mat ... "
                            f"sprites_{n_characters - 1}.mat (data/sprites/ of {ARCHIVE}) "
                            f"beside {split_path}")
        missing = [i for i in range(n_characters)
                   if not os.path.isfile(os.path.join(mat_dir, f"sprites_{i}.mat"))]
        if missing:
            raise UserError(f"{len(missing)} of the {n_characters} character files are missing "
                            f"in {mat_dir}/ (sprites_{missing[0]}.mat first); put all of "
                            f"sprites_0.mat ... sprites_{n_characters - 1}.mat there")
        print(f"converting {n_characters} .mat files in {mat_dir} into a uint8 cache ...",
              flush=True)
        data = convert_originals(mat_dir, n_characters)
        cache = write_cache(data, data_dir)
        data.pop("masks")
        print(f"cache written to {cache}" if cache else "no writable place for the cache",
              flush=True)
    if len(data["sprites"]) < n_characters:
        raise UserError(f"{cache} holds {len(data['sprites'])} characters but {split_path} "
                        f"names character {n_characters}")
    data.update(splits=splits, cache=cache, split_file=split_path)
    return data


def pose_labels(anim_lengths):
    """Per frame: the animation (animation x direction, 21 classes) it belongs to."""
    return np.repeat(np.arange(len(anim_lengths)), anim_lengths)


def to_images(frames):
    """uint8 (..., 3, 60, 60) tensor -> float in [0, 1]; done per batch, the data stays uint8."""
    return frames.float().div_(255)


# ---------------------------------------------------------------------------------------
# Model: encoder -> (z mean, z log-variance, s); decoder (z, s) -> image
# ---------------------------------------------------------------------------------------
def norm_layer(channels, norm):
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.Identity()


class Encoder(nn.Module):
    def __init__(self, z_dim, s_dim, width, norm="batch"):
        super().__init__()
        w = width
        self.features = nn.Sequential(                                              # 3x60x60
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),                            # w x30x30
            nn.Conv2d(w, 2 * w, 4, 2, 1), norm_layer(2 * w, norm), nn.LeakyReLU(0.2),     # 15x15
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), norm_layer(4 * w, norm), nn.LeakyReLU(0.2),  # 8x8
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1), norm_layer(8 * w, norm), nn.LeakyReLU(0.2),  # 4x4
            nn.Flatten())
        self.z_mu = nn.Linear(8 * w * 16, z_dim)
        self.z_logvar = nn.Linear(8 * w * 16, z_dim)
        self.s = nn.Linear(8 * w * 16, s_dim)
        # Start with a small posterior variance: with unit noise on near-zero means the
        # decoder first learns to ignore z, and the KL then collapses it for good.
        nn.init.constant_(self.z_logvar.bias, LOGVAR_INIT)

    def forward(self, x):
        h = self.features(x)
        return self.z_mu(h), self.z_logvar(h), self.s(h)


class Decoder(nn.Module):
    def __init__(self, z_dim, s_dim, width, norm="batch"):
        super().__init__()
        w = width
        self.width = w
        self.project = nn.Linear(z_dim + s_dim, 8 * w * 16)
        self.deconv = nn.Sequential(
            norm_layer(8 * w, norm), nn.ReLU(),
            nn.ConvTranspose2d(8 * w, 4 * w, 4, 2, 1), norm_layer(4 * w, norm), nn.ReLU(),  # 8x8
            nn.ConvTranspose2d(4 * w, 2 * w, 3, 2, 1), norm_layer(2 * w, norm), nn.ReLU(),  # 15
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), norm_layer(w, norm), nn.ReLU(),        # 30x30
            nn.ConvTranspose2d(w, 3, 4, 2, 1), nn.Sigmoid())                              # 60x60

    def forward(self, z, s):
        h = self.project(torch.cat([z, s], dim=1)).view(-1, 8 * self.width, 4, 4)
        return self.deconv(h)


class CycleVAE(nn.Module):
    def __init__(self, z_dim, s_dim, width, norm="batch"):
        super().__init__()
        self.encoder = Encoder(z_dim, s_dim, width, norm)
        self.decoder = Decoder(z_dim, s_dim, width, norm)

    def encode(self, x):
        """x float (N,3,60,60) in [0,1] -> (z_mu, z_logvar, s)."""
        return self.encoder(x)

    def decode(self, z, s):
        return self.decoder(z, s)


def model_hparams(args):
    return {"z_dim": args.z_dim, "s_dim": args.s_dim, "width": args.width, "norm": args.norm}


def build_model(hparams):
    return CycleVAE(hparams["z_dim"], hparams["s_dim"], hparams["width"],
                    hparams.get("norm", "none"))


def load_model(path, device="cpu"):
    """The trained model from a weights file, in eval mode."""
    state = load_checkpoint(path, KIND)
    try:
        model = build_model(state["hparams"])
    except (KeyError, TypeError):
        raise UserError(f"weights file {path} does not say how to rebuild its model") from None
    return load_weights(model, state, path).to(device).eval()


# ---------------------------------------------------------------------------------------
# Losses: forward cycle (swap s within a same-identity pair, KL on z), reverse cycle
# ---------------------------------------------------------------------------------------
def reparameterize(mu, logvar):
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def kl_divergence(mu, logvar, x):
    """KL(q(z|x) || N(0,I)) summed, then divided by B*C*H*W as in the authors' code."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.numel()


def forward_cycle_losses(model, x1, x2):
    """Dec(z1, s2) ~ x1 and Dec(z2, s1) ~ x2 for two frames of the same character."""
    mu1, logvar1, s1 = model.encode(x1)
    mu2, logvar2, s2 = model.encode(x2)
    z1, z2 = reparameterize(mu1, logvar1), reparameterize(mu2, logvar2)
    reconstruction = F.mse_loss(model.decode(z1, s2), x1) + F.mse_loss(model.decode(z2, s1), x2)
    kl = kl_divergence(mu1, logvar1, x1) + kl_divergence(mu2, logvar2, x2)
    return reconstruction, kl


def reverse_cycle_loss(model, z, xa, xb):
    """One z from the prior decoded with the (detached) s of two arbitrary images; the two
    re-encoded z means must agree (L1)."""
    with torch.no_grad():
        sa, sb = model.encode(xa)[2], model.encode(xb)[2]
    mu_a = model.encode(model.decode(z, sa))[0]
    mu_b = model.encode(model.decode(z, sb))[0]
    return F.l1_loss(mu_a, mu_b)


@contextmanager
def frozen_batch_norm_statistics(model):
    """Batch norm still normalises with the batch's statistics, but the running statistics
    (used at evaluation) do not move: momentum 0."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum


def reverse_cycle_backward(model, xa, xb, coef):
    """Reverse-cycle gradients reach the encoder's parameters only: the decoder is run but
    receives no gradient, so it cannot move. Its batches (z from the prior, generated
    images) stay out of the batch-norm running statistics, which describe real data."""
    z = torch.randn(len(xa), model.encoder.z_mu.out_features, device=xa.device)
    with frozen_batch_norm_statistics(model):
        reverse = reverse_cycle_loss(model, z, xa, xb)
    (coef * reverse).backward(inputs=list(model.encoder.parameters()))
    return reverse


@torch.no_grad()
def recalibrate_batch_norm(model, frames, rng, device, batches=50, batch_size=128):
    """Recompute the batch-norm running statistics as exact averages over forward-cycle
    batches of training pairs (the running averages lag behind the weights)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for _ in range(batches):
        x1, x2, _, _ = make_batch(frames, rng, batch_size, device)
        forward_cycle_losses(model, x1, x2)
    for m in layers:
        m.momentum = 0.1
    model.eval()


def autocast(args):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=getattr(args, "precision", "fp32") == "bf16")


def training_step(model, optimizers, batch, args, warmup=1.0):
    """One step of each cycle: the forward cycle updates encoder and decoder, the reverse
    cycle the encoder only. As in the authors' code the reverse cycle has its own Adam over
    the encoder (--reverse-update separate); 'joint' sums both cycles into one Adam step.
    `warmup` in [0, 1] scales the KL weight and the reverse cycle's step (its learning rate
    when separate: Adam ignores a constant factor on the loss)."""
    forward_optimizer, reverse_optimizer = optimizers
    x1, x2, xa, xb = batch
    model.train()
    with autocast(args):
        reconstruction, kl = forward_cycle_losses(model, x1, x2)
    loss = args.reconstruction_coef * reconstruction + warmup * args.kl_coef * kl
    forward_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.reverse_update == "joint":
        with autocast(args):
            reverse = reverse_cycle_backward(model, xa, xb, warmup * args.reverse_cycle_coef)
        forward_optimizer.step()
    else:
        forward_optimizer.step()
        forward_optimizer.zero_grad(set_to_none=True)
        for group in reverse_optimizer.param_groups:
            group["lr"] = group["lr"] * warmup
        with autocast(args):
            reverse = reverse_cycle_backward(model, xa, xb, args.reverse_cycle_coef)
        reverse_optimizer.step()
        reverse_optimizer.zero_grad(set_to_none=True)
    return {"reconstruction": check_finite(reconstruction.item(), "reconstruction loss"),
            "kl": check_finite(kl.item(), "KL divergence"),
            "reverse_cycle": check_finite(reverse.item(), "reverse-cycle loss")}


# ---------------------------------------------------------------------------------------
# Batches: pairs of frames of the same character, plus two arbitrary batches
# ---------------------------------------------------------------------------------------
def sample_pairs(rng, characters, n_frames, size):
    """(character, frame1, frame2) index arrays: two random frames of one random character."""
    chars = rng.integers(0, characters, size)
    return chars, rng.integers(0, n_frames, size), rng.integers(0, n_frames, size)


def make_batch(frames, rng, size, device):
    """frames: uint8 tensor (characters, frames, 3, 60, 60) of the training characters."""
    n_chars, n_frames = frames.shape[:2]
    chars, f1, f2 = sample_pairs(rng, n_chars, n_frames, size)
    any_a = rng.integers(0, n_chars, size), rng.integers(0, n_frames, size)
    any_b = rng.integers(0, n_chars, size), rng.integers(0, n_frames, size)
    picks = [(chars, f1), (chars, f2), any_a, any_b]
    return [to_images(frames[torch.from_numpy(c), torch.from_numpy(f)]).to(device)
            .contiguous(memory_format=torch.channels_last) for c, f in picks]


@torch.no_grad()
def validation_loss(model, pairs, args, device, batch_size=256):
    """Forward-cycle objective on fixed validation pairs, z = mean (the selection criterion)."""
    model.eval()
    x1_all, x2_all = pairs
    total = {"reconstruction": 0.0, "kl": 0.0}
    for i in range(0, len(x1_all), batch_size):
        x1 = to_images(x1_all[i:i + batch_size]).to(device)
        x2 = to_images(x2_all[i:i + batch_size]).to(device)
        mu1, logvar1, s1 = model.encode(x1)
        mu2, logvar2, s2 = model.encode(x2)
        rec = F.mse_loss(model.decode(mu1, s2), x1) + F.mse_loss(model.decode(mu2, s1), x2)
        kl = kl_divergence(mu1, logvar1, x1) + kl_divergence(mu2, logvar2, x2)
        total["reconstruction"] += float(rec) * len(x1)
        total["kl"] += float(kl) * len(x1)
    n = len(x1_all)
    out = {k: v / n for k, v in total.items()}
    out["objective"] = args.reconstruction_coef * out["reconstruction"] + args.kl_coef * out["kl"]
    return out


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------
def train(model, data, args, device, out, timings):
    splits = data["splits"]
    train_frames = data["frames"][splits["train"]]
    val_frames = data["frames"][splits["val"]]
    n_train = train_frames.shape[0] * train_frames.shape[1]
    steps_per_epoch = args.epoch_steps or max(1, n_train // args.batch_size)
    total_steps = int(round(args.epochs * steps_per_epoch))
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
    drop_step = int(round(args.lr_drop_epoch * steps_per_epoch)) if args.lr_drop_epoch else None

    vrng = np.random.default_rng(args.seed + 1)
    chars, f1, f2 = sample_pairs(vrng, val_frames.shape[0], val_frames.shape[1],
                                 args.val_pairs)
    chars, f1, f2 = (torch.from_numpy(a) for a in (chars, f1, f2))
    val_pairs = (val_frames[chars, f1], val_frames[chars, f2])

    forward_optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    reverse_optimizer = torch.optim.Adam(model.encoder.parameters(), lr=args.lr,
                                         betas=(0.9, 0.999))
    optimizers = (forward_optimizer, reverse_optimizer)
    rng = np.random.default_rng(args.seed)
    history = {"step": [], "reconstruction": [], "kl": [], "reverse_cycle": [],
               "val_step": [], "val_objective": [], "val_reconstruction": [], "val_kl": []}
    step, best, best_state, train_seconds = 0, float("inf"), None, 0.0
    state_path = os.path.join(out, "training_state.pt")
    if args.resume:
        if not os.path.isfile(state_path):
            raise UserError(f"--resume: there is no {state_path} to resume from")
        state = load_checkpoint(state_path, TRAIN_KIND)
        if state["hparams"] != model_hparams(args):
            raise UserError(f"--resume: {state_path} was written with {state['hparams']}, "
                            f"not {model_hparams(args)}")
        load_weights(model, state, state_path)
        forward_optimizer.load_state_dict(state["forward_optimizer"])
        reverse_optimizer.load_state_dict(state["reverse_optimizer"])
        step, best, best_state = state["step"], state["best"], state["best_state"]
        history, train_seconds = state["history"], state["train_seconds"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step} of {total_steps}", flush=True)

    def save_state():
        save_checkpoint(state_path, TRAIN_KIND, model_hparams(args), model, step=step,
                        best=best, best_state=best_state, history=history,
                        train_seconds=train_seconds, rng=rng.bit_generator.state,
                        torch_rng=torch.get_rng_state(),
                        forward_optimizer=forward_optimizer.state_dict(),
                        reverse_optimizer=reverse_optimizer.state_dict())

    def validate():
        nonlocal best, best_state
        v = validation_loss(model, val_pairs, args, device)
        history["val_step"].append(step)
        for k in ("objective", "reconstruction", "kl"):
            history[f"val_{k}"].append(v[k])
        if v["objective"] < best:
            best = v["objective"]
            best_state = {k: t.detach().cpu().clone() for k, t in model.state_dict().items()}
        return v

    eval_every = max(1, int(round(steps_per_epoch * args.val_every)))
    log_every = max(1, min(50, total_steps // 40))
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    start, last_log = time.perf_counter(), time.perf_counter()
    started_at, first_step = train_seconds, step
    running = {"reconstruction": 0.0, "kl": 0.0, "reverse_cycle": 0.0}
    n_running = 0
    try:
        while step < total_steps:
            if args.time_limit_min and train_seconds >= 60 * args.time_limit_min:
                print(f"time limit of {args.time_limit_min} min reached at step {step}",
                      flush=True)
                break
            lr = args.lr / 10 if drop_step is not None and step >= drop_step else args.lr
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            # first half of the warm-up: forward cycle alone; second half: linear ramp
            warmup = (float(np.clip(2 * step / warmup_steps - 1, 0, 1)) if warmup_steps
                      else 1.0)
            batch = make_batch(train_frames, rng, args.batch_size, device)
            losses = training_step(model, optimizers, batch, args, warmup)
            step += 1
            for k, v in losses.items():
                running[k] += v
            n_running += 1
            train_seconds = started_at + time.perf_counter() - start
            if step % log_every == 0 or step == total_steps:
                history["step"].append(step)
                for k in running:
                    history[k].append(running[k] / n_running)
                now = time.perf_counter()
                rate = 2 * args.batch_size * n_running / max(now - last_log, 1e-9)
                print(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} "
                      f"rec {running['reconstruction'] / n_running:.5f} "
                      f"kl {running['kl'] / n_running:.5f} "
                      f"rev {running['reverse_cycle'] / n_running:.5f} "
                      f"| {rate:.0f} pair-images/s", flush=True)
                running = {k: 0.0 for k in running}
                n_running, last_log = 0, time.perf_counter()
            if step % eval_every == 0 or step == total_steps:
                v = validate()
                print(f"  validation objective {v['objective']:.5f} (best {best:.5f})",
                      flush=True)
                save_state()
    except KeyboardInterrupt:
        save_state()
        raise UserError(f"interrupted at step {step}: the training state is saved in "
                        f"{state_path}; continue with the same command and --resume") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not history["val_step"] or history["val_step"][-1] != step:
        validate()
        save_state()
    timings["train_seconds"] = round(train_seconds, 2)
    measured = step - first_step
    info = {"steps": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "epochs_done": round(step / steps_per_epoch, 3),
            "stopped_by_time_limit": step < total_steps,
            "best_val_objective": best,
            "best_val_step": history["val_step"][int(np.argmin(history["val_objective"]))],
            "train_images_per_s": round(2 * args.batch_size * measured
                                        / max(train_seconds - started_at, 1e-9), 1)}
    model.load_state_dict(best_state)
    recalibrate_batch_norm(model, train_frames, np.random.default_rng(args.seed + 2), device)
    return history, info


# ---------------------------------------------------------------------------------------
# Evaluation: encodings, classifiers, swap grids, interpolations, prediction networks
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def encode_all(model, frames, device, batch_size=500):
    """frames uint8 (n, 3, 60, 60) -> z means and s, float32 numpy."""
    model.eval()
    zs, ss = [], []
    for i in range(0, len(frames), batch_size):
        mu, _, s = model.encode(to_images(frames[i:i + batch_size]).to(device))
        zs.append(mu.cpu())
        ss.append(s.cpu())
    return torch.cat(zs).numpy(), torch.cat(ss).numpy()


@torch.no_grad()
def decode_all(model, z, s, device, batch_size=500):
    model.eval()
    out = [model.decode(torch.as_tensor(z[i:i + batch_size]).to(device),
                        torch.as_tensor(s[i:i + batch_size]).to(device)).cpu()
           for i in range(0, len(z), batch_size)]
    return torch.cat(out)


def mlp(d_in, d_out, hidden=256):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, d_out))


def fit_network(x, y, d_out, loss_fn, seed, epochs, batch_size=256, lr=1e-3):
    """A small MLP on standardized inputs (same seed, same network)."""
    torch.manual_seed(seed)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y)
    mean, std = x.mean(0), x.std(0) + 1e-6
    net = mlp(x.shape[1], d_out)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = loss_fn(net((x[idx] - mean) / std), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()

    def predict(features):
        with torch.no_grad():
            return net((torch.as_tensor(features, dtype=torch.float32) - mean) / std)
    return predict


def fit_classifier(x, y, n_classes, seed, epochs):
    predict = fit_network(x, np.asarray(y, dtype=np.int64), n_classes, F.cross_entropy, seed,
                          epochs)
    return lambda features: predict(features).argmax(1).numpy()


def classifier_split(n_chars, n_frames, fraction, seed):
    """Per character, a fixed random `fraction` of its frames for classifier training."""
    rng = np.random.default_rng(seed)
    is_train = np.zeros((n_chars, n_frames), dtype=bool)
    k = max(1, int(round(fraction * n_frames)))
    for c in range(n_chars):
        is_train[c, rng.permutation(n_frames)[:k]] = True
    return is_train.ravel()


def twin_groups(frames_u8):
    """For frames (chars, F, ...) uint8: group[c, f] = id of the set of characters whose frame f
    is pixel-identical (weapon twins share about half their frames)."""
    n_chars, n_frames = frames_u8.shape[:2]
    group = np.zeros((n_chars, n_frames), dtype=np.int64)
    size = np.zeros((n_chars, n_frames), dtype=np.int64)
    for f in range(n_frames):
        digests = [hashlib.md5(frames_u8[c, f].numpy().tobytes()).digest() for c in range(n_chars)]
        first = {}
        for c, d in enumerate(digests):
            first.setdefault(d, c)
        group[:, f] = [first[d] for d in digests]
        counts = {d: digests.count(d) for d in first}
        size[:, f] = [counts[d] for d in digests]
    return group, size


def identity_and_pose_classifiers(z, s, identity, pose, groups, sizes, is_train, seed, epochs):
    """Table 1 of the paper plus pose: train/test accuracy of an MLP from z and from s."""
    results, predictors = {}, {}
    for part, features in (("z", z), ("s", s)):
        for task, labels, n_classes in (("identity", identity, int(identity.max()) + 1),
                                        ("pose", pose, int(pose.max()) + 1)):
            predict = fit_classifier(features[is_train], labels[is_train], n_classes, seed,
                                     epochs)
            pred_train, pred_test = predict(features[is_train]), predict(features[~is_train])
            r = {"train_accuracy": float(np.mean(pred_train == labels[is_train])),
                 "test_accuracy": float(np.mean(pred_test == labels[~is_train]))}
            if task == "identity":
                # A prediction of a character whose frame is pixel-identical (a weapon twin)
                # cannot be told apart from the image; counted separately.
                test_groups = groups.ravel()[~is_train]
                frame_of = np.nonzero(~is_train)[0] % groups.shape[1]
                pred_group = groups[pred_test, frame_of]
                r["test_accuracy_twin_tolerant"] = float(np.mean(pred_group == test_groups))
            results[f"{task}_from_{part}"] = r
            predictors[f"{task}_from_{part}"] = predict
    test_labels = identity[~is_train]
    results["identity_chance"] = float(np.bincount(test_labels).max() / len(test_labels))
    results["identity_twin_ceiling"] = float(np.mean(1.0 / sizes.ravel()[~is_train]))
    results["identity_pairs_sharing_a_frame"] = int(len({tuple(sorted((c, int(g))))
                                                         for c, row in enumerate(groups)
                                                         for g in row if g != c}))
    pose_counts = np.bincount(pose[~is_train])
    results["pose_chance"] = float(pose_counts.max() / pose_counts.sum())
    return results, predictors


def bordered_grid_figure(rows, path, title, row_names=None, col_names=None, wrong=None,
                         corner_blank=False, cell=0.8):
    """rows: list of lists of (3,60,60) tensors (None = empty cell); wrong[i][j] draws a red
    frame around a cell."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 1.2, cell * n_rows + 0.6),
                             squeeze=False)
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = rows[i][j] if j < len(rows[i]) else None
            if image is None:
                ax.axis("off")
                continue
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            bad = wrong is not None and wrong[i][j]
            for spine in ax.spines.values():
                spine.set_color("red" if bad else "0.6")
                spine.set_linewidth(3 if bad else 0.5)
            if j == 0 and row_names:
                ax.set_ylabel(row_names[i], fontsize=7, rotation=0, ha="right", va="center")
            if i == 0 and col_names:
                ax.set_title(col_names[j], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    save_figure(fig, path)


def swap_grid(model, z_images, s_images, device):
    """Paper layout: the top row gives s (identity), the first column gives z; cell (i, j) =
    Dec(z of row i, s of column j)."""
    with torch.no_grad():
        z = model.encode(z_images.to(device))[0]
        s = model.encode(s_images.to(device))[2]
        n, m = len(z), len(s)
        cells = model.decode(z.repeat_interleave(m, 0), s.repeat(n, 1)).cpu().view(n, m, 3, 60, 60)
    rows = [[None] + list(s_images)]
    rows += [[z_images[i]] + list(cells[i]) for i in range(n)]
    return rows


def interpolation_rows(model, xa, xb, steps, device):
    """z fixed (from a) and s from a to b; s fixed (from a) and z from a to b."""
    with torch.no_grad():
        za, _, sa = model.encode(xa[None].to(device))
        zb, _, sb = model.encode(xb[None].to(device))
        t = torch.linspace(0, 1, steps, device=device)[:, None]
        vary_s = model.decode(za.expand(steps, -1), (1 - t) * sa + t * sb).cpu()
        vary_z = model.decode((1 - t) * za + t * zb, sa.expand(steps, -1)).cpu()
    return list(vary_s), list(vary_z)


def fit_predictors(z_train, s_train, seed, epochs):
    """Prediction networks z -> s and s -> z (MSE), trained on the training characters."""
    mse = lambda pred, target: F.mse_loss(pred, target)  # noqa: E731
    z_to_s = fit_network(z_train, torch.as_tensor(s_train), s_train.shape[1], mse, seed, epochs)
    s_to_z = fit_network(s_train, torch.as_tensor(z_train), z_train.shape[1], mse, seed + 1,
                         epochs)
    return (lambda z: z_to_s(z).numpy()), (lambda s: s_to_z(s).numpy())


def evaluate(model, data, args, device, out, timings, history=None):
    """Every figure and number that needs only the trained model (and the history, if any)."""
    splits = data["splits"]
    frames = data["frames"]
    n_frames = frames.shape[1]
    anim_lengths = data["anim_lengths"]
    poses = pose_labels(anim_lengths)
    test = frames[splits["test"]]
    n_test = len(splits["test"])
    metrics = {}

    with stage(timings, "encode_test_and_train"):
        z_test, s_test = encode_all(model, test.reshape(-1, 3, 60, 60), device)
        train_ids = splits["train"]
        if args.predictor_characters and args.predictor_characters < len(train_ids):
            train_ids = train_ids[:args.predictor_characters]
        parts = [encode_all(model, frames[ids].reshape(-1, 3, 60, 60), device)
                 for ids in np.array_split(train_ids, max(1, len(train_ids) // 50))]
        z_train = np.concatenate([p[0] for p in parts])
        s_train = np.concatenate([p[1] for p in parts])
    identity = np.repeat(np.arange(n_test), n_frames)
    pose = np.tile(poses, n_test)

    with stage(timings, "classifiers"):
        groups, sizes = twin_groups(test)
        is_train = classifier_split(n_test, n_frames, args.classifier_train_fraction, args.seed)
        classifiers, predictors = identity_and_pose_classifiers(
            z_test, s_test, identity, pose, groups, sizes, is_train, args.seed,
            args.classifier_epochs)
        metrics["classifiers"] = classifiers
        metrics["classifier_protocol"] = {
            "network": "MLP 256-256 ReLU on standardized features, Adam 1e-3, batch 256",
            "epochs": args.classifier_epochs, "characters": n_test,
            "train_fraction_per_character": args.classifier_train_fraction,
            "train_frames": int(is_train.sum()), "test_frames": int((~is_train).sum()),
            "identity_labels": f"the {n_test} test characters (weapon twins kept apart)",
            "pose_labels": f"{len(anim_lengths)} animations (action x direction)"}

    with stage(timings, "prediction_networks"):
        z_to_s, s_to_z = fit_predictors(z_train, s_train, args.seed, args.predictor_epochs)
        held = np.nonzero(~is_train)[0]
        x_held = test.reshape(-1, 3, 60, 60)[held]
        z_h, s_h = z_test[held], s_test[held]
        recon = decode_all(model, z_h, s_h, device)
        with_pred_s = decode_all(model, z_h, z_to_s(z_h).astype(np.float32), device)
        with_pred_z = decode_all(model, s_to_z(s_h).astype(np.float32), s_h, device)
        rz, rs = encode_all(model, (recon * 255).round().to(torch.uint8), device)
        pz_s, ps_s = encode_all(model, (with_pred_s * 255).round().to(torch.uint8), device)
        pz_z, ps_z = encode_all(model, (with_pred_z * 255).round().to(torch.uint8), device)
        true_id, true_pose = identity[held], pose[held]
        id_from_s, pose_from_z = predictors["identity_from_s"], predictors["pose_from_z"]
        wrong_id_pred_s = id_from_s(ps_s) != true_id
        wrong_pose_pred_z = pose_from_z(pz_z) != true_pose
        wrong_id_recon = id_from_s(rs) != true_id
        wrong_pose_recon = pose_from_z(rz) != true_pose
        partner = np.random.default_rng(args.seed + 11).permutation(len(held))
        other = identity[held][partner] != true_id
        swapped = decode_all(model, z_h[other], s_h[partner][other], device)
        sw_z, sw_s = encode_all(model, (swapped * 255).round().to(torch.uint8), device)
        metrics["swap_rates"] = {
            "identity_right": float(np.mean(id_from_s(sw_s) == true_id[partner][other])),
            "pose_right": float(np.mean(pose_from_z(sw_z) == true_pose[other])),
            "n": int(other.sum())}
        s_err = float(np.mean((z_to_s(z_h) - s_h) ** 2) / np.mean((s_h - s_train.mean(0)) ** 2))
        z_err = float(np.mean((s_to_z(s_h) - z_h) ** 2) / np.mean((z_h - z_train.mean(0)) ** 2))
        metrics["prediction_networks"] = {
            "trained_on_frames": int(len(z_train)), "epochs": args.predictor_epochs,
            "network": "MLP 256-256 ReLU, MSE, Adam 1e-3",
            "evaluated_on_frames": int(len(held)),
            "identity_wrong_rate_decode_z_predicted_s": float(wrong_id_pred_s.mean()),
            "pose_wrong_rate_decode_predicted_z_s": float(wrong_pose_pred_z.mean()),
            "identity_wrong_rate_reconstruction": float(wrong_id_recon.mean()),
            "pose_wrong_rate_reconstruction": float(wrong_pose_recon.mean()),
            "identity_chance_wrong_rate": 1 - classifiers["identity_chance"],
            "pose_chance_wrong_rate": 1 - classifiers["pose_chance"],
            "z_to_s_relative_mse": s_err, "s_to_z_relative_mse": z_err}
        rng = np.random.default_rng(args.seed + 7)
        show = np.sort(rng.choice(len(held), min(12, len(held)), replace=False))
        rows = [[x_held[i].float() / 255 for i in show], [with_pred_s[i] for i in show],
                [with_pred_z[i] for i in show]]
        wrong = [[False] * len(show), list(wrong_id_pred_s[show]), list(wrong_pose_pred_z[show])]
        bordered_grid_figure(
            rows, os.path.join(out, "prediction_networks.png"),
            "rows: original | Dec(z, s predicted from z) | Dec(z predicted from s, s); "
            "red = identity (row 2) / pose (row 3) classified wrong",
            row_names=["original", "Dec(z, f(z))", "Dec(g(s), s)"], wrong=wrong)

    with stage(timings, "figures"):
        x_test = test  # (chars, F, 3, 60, 60) uint8
        grid_rng = np.random.default_rng(args.seed + 3)
        grid_files = []
        n_side = 8
        for g in range(args.grids):
            s_chars = grid_rng.choice(n_test, n_side, replace=n_test < n_side)
            z_chars = grid_rng.choice(n_test, n_side, replace=n_test < n_side)
            if g == 0:  # one frame of each of 8 animations spread over the sheet
                anims = np.linspace(0, len(anim_lengths) - 1, n_side).round().astype(int)
            else:
                anims = grid_rng.choice(len(anim_lengths), n_side,
                                        replace=len(anim_lengths) < n_side)
            offsets = data["anim_offsets"]
            z_frames = [int(offsets[a] + grid_rng.integers(anim_lengths[a])) for a in anims]
            s_anim = int(grid_rng.integers(len(anim_lengths)))
            s_frame = int(offsets[s_anim] + grid_rng.integers(anim_lengths[s_anim]))
            z_images = to_images(x_test[z_chars, z_frames])
            s_images = to_images(x_test[s_chars, np.full(n_side, s_frame)])
            rows = swap_grid(model, z_images, s_images, device)
            name = f"swap_grid_{g + 1}.png"
            bordered_grid_figure(
                rows, os.path.join(out, name),
                f"Style transfer, test characters: top row gives s (identity), first column "
                f"gives z (pose); cell = Dec(z of row, s of column)",
                row_names=[""] + [ANIMATIONS[a] if len(anim_lengths) == 21 else f"anim {a}"
                                  for a in anims])
            grid_files.append(name)
        metrics["swap_grids"] = grid_files

        interp_rows, names = [], []
        for p in range(3):
            ca, cb = grid_rng.choice(n_test, 2, replace=n_test < 2)
            fa, fb = grid_rng.integers(n_frames, size=2)
            xa, xb = to_images(x_test[ca, fa]), to_images(x_test[cb, fb])
            vary_s, vary_z = interpolation_rows(model, xa, xb, args.interpolation_steps, device)
            interp_rows += [[xa] + vary_s + [xb], [xa] + vary_z + [xb]]
            names += [f"pair {p + 1}: s a->b", f"pair {p + 1}: z a->b"]
        bordered_grid_figure(interp_rows, os.path.join(out, "interpolation.png"),
                             "Interpolation between test images a (left) and b (right): "
                             "specified s with z of a fixed, unspecified z with s of a fixed",
                             row_names=names)

        show = np.random.default_rng(args.seed + 5).choice(len(held), min(10, len(held)),
                                                          replace=False)
        bordered_grid_figure([[x_held[i].float() / 255 for i in show], [recon[i] for i in show]],
                             os.path.join(out, "reconstructions.png"),
                             "Test characters: originals (top) and Dec(z mean, s) (bottom)",
                             row_names=["original", "reconstruction"])
        metrics["test_reconstruction_mse"] = float(F.mse_loss(recon, x_held.float() / 255))
        if history:
            steps_per_epoch = args.epoch_steps or max(1, len(splits["train"]) * n_frames
                                                      // args.batch_size)
            plot_history(history, os.path.join(out, "training_curves.png"),
                         int(round(args.warmup_epochs * steps_per_epoch)),
                         int(round(args.lr_drop_epoch * steps_per_epoch)) or None)
    return metrics


def plot_history(history, path, warmup_steps=0, drop_step=None):
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, title in zip(axes, ("reconstruction", "kl", "reverse_cycle"),
                              ("forward cycle: swap reconstruction MSE (x1 + x2)",
                               "KL(q(z|x)||N(0,I)) / (B*C*H*W), x1 + x2",
                               "reverse cycle: L1 of re-encoded z means")):
        ax.plot(history["step"], history[key])
        ax.set_title(title, fontsize=8)
    axes[3].plot(history["val_step"], history["val_objective"], marker="o")
    axes[3].set_title("validation characters: forward-cycle objective", fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        if warmup_steps:
            ax.axvspan(0, warmup_steps, color="0.9", label="warm-up (KL, reverse cycle ramped)")
        if drop_step:
            ax.axvline(drop_step, color="0.5", ls="--", lw=1, label="lr / 10")
    if warmup_steps or drop_step:
        axes[2].legend(fontsize=7)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
PAPER_TABLE = {"Cycle-VAE 512/64": {"z": (11.55, 11.47), "s": (98.53, 97.16)},
               "Cycle-VAE 1024/512": {"z": (11.27, 11.61), "s": (98.13, 97.22)},
               "Mathieu et al. 512/64": {"z": (12.05, 11.98), "s": (99.18, 96.75)}}


def targets(metrics):
    c = metrics["classifiers"]
    ceiling = c["identity_twin_ceiling"]
    return {"identity_from_s_vs_twin_ceiling >= 0.90":
            c["identity_from_s"]["test_accuracy"] / ceiling >= 0.90,
            "identity_from_z <= 0.15": c["identity_from_z"]["test_accuracy"] <= 0.15,
            "pose_from_z >= 0.70": c["pose_from_z"]["test_accuracy"] >= 0.70,
            "pose_from_s <= 0.30": c["pose_from_s"]["test_accuracy"] <= 0.30}


def write_report(metrics, args):
    c, p = metrics["classifiers"], metrics["prediction_networks"]
    t, tr = metrics["timings"], metrics.get("training", {})
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    n = metrics["data"]["characters"]
    lines = [
        "# Question 2: Cycle-Consistent VAE on the 2D Sprites (Jha et al., ECCV 2018)", "",
        f"Command: `{metrics['command']}`  ",
        f"Machine: {metrics['machine']}  ",
        f"Run: {metrics['run_note']}", ""] + ([f"**Note:** {args.note}", ""] if args.note
                                               else []) + [
        "Specified factor s = character identity, unspecified factor z = everything else "
        f"(mostly the pose). All evaluations use the {n['test']} **test characters** of Reed et "
        f"al.'s split, unseen in training; the model was selected on the {n['val']} validation "
        f"characters ({n['train']} training characters).", "",
        "## Settings", "",
        "| setting | this run | paper / authors' code |", "|---|---|---|",
        f"| z / s size | {args.z_dim} / {args.s_dim} | 512 / 64 and 1024 / 512 |",
        f"| channels (first conv) | {args.width} | not published for Sprites |",
        f"| batch (pairs) | {args.batch_size} | 64 |",
        f"| training | {tr.get('epochs_done', '-')} epochs = {tr.get('steps', '-')} steps "
        f"(epoch = {tr.get('steps_per_epoch', '-')} steps) | 100 epochs |",
        f"| Adam lr | {args.lr:g}, /10 at epoch {args.lr_drop_epoch:g} | 1e-4, /10 after 80 |",
        f"| loss weights rec / reverse / KL | {args.reconstruction_coef:g} / "
        f"{args.reverse_cycle_coef:g} / {args.kl_coef:g} | 2 / 10 / 3 |", "",
        "## Training", "",
        "![training curves](training_curves.png)", "",
        f"Training command: `{tr.get('command', metrics['command'])}`  ",
        f"Training wall time {tr.get('train_seconds', t.get('train_seconds', '-'))} s "
        f"(1-minute load average "
        f"before / after: {tr.get('load_average_1min_before_after', '-')}), "
        f"{tr.get('train_images_per_s', '-')} training images/s (each step encodes and "
        f"decodes 2 x batch images in the forward cycle and 2 x batch in the reverse cycle); "
        f"best validation objective at step {tr.get('best_val_step', '-')}.", "",
        "![reconstructions](reconstructions.png)", "",
        f"Test reconstruction MSE (z mean, s): {metrics['test_reconstruction_mse']:.5f}.", "",
        "## Style transfer (swap grids)", "",
        "Top row: the image that gives s (identity); first column: the image that gives z; "
        "cell (i, j) = Dec(z of row i, s of column j). Rows are labelled with the animation of "
        "the z image.", ""]
    lines += [f"![swap grid]({name})" for name in metrics["swap_grids"]]
    lines += [
        "", "## Interpolation", "", "![interpolation](interpolation.png)", "",
        "Odd rows: s interpolated from image a to image b with z of a fixed; even rows: z "
        "interpolated with s of a fixed.", "",
        "## Classifiers on each partition (Table 1 layout, test characters)", "",
        "| model | z train | z test | s train | s test |", "|---|---|---|---|---|"]
    for name, row in PAPER_TABLE.items():
        lines.append(f"| paper: {name} | {row['z'][0]} | {row['z'][1]} | {row['s'][0]} | "
                     f"{row['s'][1]} |")
    iz, is_ = c["identity_from_z"], c["identity_from_s"]
    lines += [f"| **this run, identity ({args.z_dim}/{args.s_dim})** | {pct(iz['train_accuracy'])} "
              f"| {pct(iz['test_accuracy'])} | {pct(is_['train_accuracy'])} | "
              f"{pct(is_['test_accuracy'])} |"]
    pz, ps = c["pose_from_z"], c["pose_from_s"]
    lines += [f"| this run, pose (21 animations) | {pct(pz['train_accuracy'])} | "
              f"{pct(pz['test_accuracy'])} | {pct(ps['train_accuracy'])} | "
              f"{pct(ps['test_accuracy'])} |", "",
              f"Identity: {metrics['classifier_protocol']['identity_labels']}; chance "
              f"{pct(c['identity_chance'])} %, ceiling imposed by pixel-identical weapon twins "
              f"{pct(c['identity_twin_ceiling'])} %. Counting a pixel-identical twin as right, "
              f"identity test accuracy is {pct(iz['test_accuracy_twin_tolerant'])} % from z and "
              f"{pct(is_['test_accuracy_twin_tolerant'])} % from s. Pose chance (largest class) "
              f"{pct(c['pose_chance'])} %.", "",
              f"Protocol (the paper does not publish its own): "
              f"{metrics['classifier_protocol']['network']}, "
              f"{metrics['classifier_protocol']['epochs']} epochs; per test character a fixed "
              f"random {args.classifier_train_fraction:g} of its frames train the classifier, "
              f"the rest test it ({metrics['classifier_protocol']['train_frames']} / "
              f"{metrics['classifier_protocol']['test_frames']} frames).", "",
              "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                      for k, v in metrics["targets"].items()) + ".", "",
              "## Prediction networks z -> s and s -> z", "",
              "![prediction networks](prediction_networks.png)", "",
              f"Trained on the encodings of {p['trained_on_frames']} frames of training "
              f"characters; evaluated on the {p['evaluated_on_frames']} held-out frames of the "
              f"test characters. Each decoded image is re-encoded and classified with the "
              f"classifiers above (identity from s, pose from z); red frames mark wrong ones.", "",
              "| decoded image | identity wrong | pose wrong |", "|---|---|---|",
              f"| Dec(z, s) (reconstruction) | {pct(p['identity_wrong_rate_reconstruction'])} % | "
              f"{pct(p['pose_wrong_rate_reconstruction'])} % |",
              f"| Dec(z, f(z)), s predicted from z | "
              f"{pct(p['identity_wrong_rate_decode_z_predicted_s'])} % | - |",
              f"| Dec(g(s), s), z predicted from s | - | "
              f"{pct(p['pose_wrong_rate_decode_predicted_z_s'])} % |",
              f"| chance | {pct(p['identity_chance_wrong_rate'])} % | "
              f"{pct(p['pose_chance_wrong_rate'])} % |", "",
              f"Relative MSE of the predictions (1 = no better than the mean): z -> s "
              f"{p['z_to_s_relative_mse']:.3f}, s -> z {p['s_to_z_relative_mse']:.3f}.", "",
              "How to read it: if z held the identity, a network could predict s from z and "
              "Dec(z, f(z)) would show the right character; if s held the pose, Dec(g(s), s) "
              "would show the right pose. High wrong rates (near chance) in the middle rows "
              "therefore mean that each partition lacks the other's factor, while the "
              "reconstruction row shows how often the classifiers fail on decoded images at "
              "all (their floor).", "",
              "## Observations against the paper", ""] + observations(metrics, args) + [
              "", "## What the default run trades against the paper", "",
              "The paper's scale (z 512 / s 64, 100 epochs of 89,000 frames, Adam 1e-4) is "
              "about 139,000 steps of 64 pairs; that is days on two CPU cores. The default "
              "keeps the method and the loss weights of the authors' code but uses small "
              "latents (z 8 / s 8: enough for 21 x ~9 poses and ~1,000 attribute "
              "combinations, see the choices below), a narrow convolutional network "
              "(16-32-64-128 channels), 5 "
              "epochs instead of 100 with a 5x larger learning rate (5e-4, /10 for the last "
              "fifth) and a warm-up: forward cycle alone for half an epoch, then the KL "
              "weight and the reverse cycle's learning rate ramped up over the next half. "
              "`--paper-scale` restores z 512 / s 64, 64-channel layers, 100 epochs, lr 1e-4 "
              "/10 at epoch 80 and no warm-up (for a GPU); `--z-dim 1024 --s-dim 512` gives "
              "the paper's second size.", "",
              "## Choices where the paper is silent", "",
              "- Architecture for 60x60x3 (no Sprites code was published): 4 strided convs "
              "(4x4/4x4/3x3/4x4, stride 2, batch norm, LeakyReLU 0.2) to 4x4, linear heads "
              "for z mean, z log-variance (bias initialised to -5) and s; the decoder mirrors "
              "it with transposed convs, batch norm, ReLU and a sigmoid. Without batch norm "
              "the net sat on the 'average sprite of this character' plateau, where z is "
              "useless and the KL and reverse cycle then collapsed it (checked in short "
              "runs).",
              "- Losses exactly as the authors' MNIST code: MSE (mean) reconstruction of both "
              "swapped pairs x 2, KL summed and divided by B*C*H*W x 3, L1 (mean) between the "
              "re-encoded z means x 10; the reverse cycle uses s computed without gradient "
              "(detached) and its own Adam over the encoder's parameters only.",
              "- Latent sizes of the CPU default (z 8 / s 8), measured in short runs on the "
              "real data (2 to 2.5 epochs): with s 16 a classifier read the pose from s (55 % "
              "on 21 animations), with s 8 it fell to 22 %; with z 16 the identity stayed "
              "readable from z (21-23 % on 100 characters), with z 8 it fell to 5 %. At this "
              "short training, spare dimensions keep what the losses do not push out (the "
              "forward cycle makes the pose in s useless to the decoder but does not remove "
              "it; the reverse cycle removes identity from z only slowly); small latents "
              "leave no room for it. How the paper's sizes separate after its 100 epochs "
              "(`--paper-scale`) was not measured here.",
              "- Pairs: a random training character, two independent random frames of it "
              "(any animation); the reverse cycle takes two further batches of arbitrary "
              "training frames. An epoch is (training frames / batch) steps, as the authors.",
              "- Warm-up (default run; `--warmup-epochs 0` is the authors' setting): with the "
              "full losses from step 0 the z means went to a constant within ~50 steps (KL "
              "and reverse loss 0, z unused). The reverse cycle has its own Adam, so its "
              "loss weight does not set its step size (Adam is invariant to a constant "
              "factor); the warm-up therefore scales its learning rate, and the KL weight.",
              "- Model selection: the forward-cycle objective (z = mean) on 1,024 fixed pairs "
              "of the validation characters, every --val-every epochs; the best state is "
              "kept, then its batch-norm running statistics are recomputed as exact averages "
              "over 50 forward-cycle batches of training pairs (the running averages lag "
              "behind the weights). The reverse cycle's batches (z from the prior, generated "
              "images) never enter the running statistics.",
              f"- Classifiers: see the protocol above; identity is the {n['test']}-way label "
              f"of the test characters. The ceiling is the expected accuracy of the best "
              f"classifier when pixel-identical frames of different test characters (weapon "
              f"twins, and a few other pairs that look alike in some frames: "
              f"{c['identity_pairs_sharing_a_frame']} pairs share at least one frame) are "
              f"guessed evenly.",
              "- Prediction networks: MLPs trained with MSE on z means and s of all training "
              "frames; decoded images are re-encoded and judged by the classifiers trained "
              "on real test frames.",
              "- Pose = the 21 animations (action x direction); the frame index is kept in "
              "the data but not classified.", ""]
    return "\n".join(lines)


def observations(metrics, args):
    c, p = metrics["classifiers"], metrics["prediction_networks"]
    iz, is_ = c["identity_from_z"]["test_accuracy"], c["identity_from_s"]["test_accuracy"]
    pz, ps = c["pose_from_z"]["test_accuracy"], c["pose_from_s"]["test_accuracy"]
    ceiling = c["identity_twin_ceiling"]
    return [
        f"- Identity from s: {100 * is_:.1f} % on held-out frames of unseen characters, "
        f"{100 * is_ / ceiling:.0f} % of the twin ceiling ({100 * ceiling:.1f} %); the paper "
        f"reports 97.2 % (its label set and protocol are not published).",
        f"- Identity from z: {100 * iz:.1f} % (chance {100 * c['identity_chance']:.1f} %; "
        f"paper 11.5 %). " + ("z carries little identity." if iz <= 0.15 else
                              "z still carries identity: the reverse cycle has not removed it "
                              "fully in this run."),
        f"- Pose from z {100 * pz:.1f} % against pose from s {100 * ps:.1f} % (chance "
        f"{100 * c['pose_chance']:.1f} %): " + (
            "the pose lives in z and hardly in s, as the forward cycle intends."
            if pz >= 0.7 and ps <= 0.3 else
            "z holds the pose, but s also keeps pose information that a classifier can read: "
            "the forward cycle only makes the pose in s useless to the decoder (s comes from "
            "another frame), it does not remove it; nothing in the objective asks s to be "
            "pose-invariant." if pz > ps else "the pose is not separated as intended."),
        f"- The identity classifier on z fits its training frames "
        f"({100 * c['identity_from_z']['train_accuracy']:.1f} %) far better than it "
        f"generalises ({100 * iz:.1f} %): what identity z holds is weak and frame-specific.",
        f"- Prediction networks: decoding z with the s predicted from z gives the wrong "
        f"identity in {100 * p['identity_wrong_rate_decode_z_predicted_s']:.1f} % of the "
        f"images (reconstructions: {100 * p['identity_wrong_rate_reconstruction']:.1f} %); "
        f"decoding the z predicted from s gives the wrong pose in "
        f"{100 * p['pose_wrong_rate_decode_predicted_z_s']:.1f} % (reconstructions: "
        f"{100 * p['pose_wrong_rate_reconstruction']:.1f} %).",
        "- The swap grids and interpolations are the qualitative check: along a row the "
        "identity (colours, hair, armour) should follow the column's top image while the "
        "pose stays that of the row's first image."]


# ---------------------------------------------------------------------------------------
# Arguments and main
# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, "outputs/q2")
    parser.add_argument("--z-dim", type=positive_int, default=8, help="size of z (paper 512)")
    parser.add_argument("--s-dim", type=positive_int, default=8, help="size of s (paper 64)")
    parser.add_argument("--width", type=positive_int, default=16,
                        help="channels of the first conv layer (x2 per layer)")
    parser.add_argument("--norm", choices=["batch", "none"], default="batch",
                        help="batch normalisation in the hidden layers, or none")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="pairs per step")
    parser.add_argument("--epochs", type=positive_float, default=5.0,
                        help="epochs (an epoch = training frames / batch steps)")
    parser.add_argument("--epoch-steps", type=positive_int, default=None,
                        help="override the steps of an epoch (tests, quick runs)")
    parser.add_argument("--lr", type=positive_float, default=5e-4, help="Adam learning rate")
    parser.add_argument("--lr-drop-epoch", type=nonnegative_float, default=4.0,
                        help="lr /10 from this epoch on (0 = never)")
    parser.add_argument("--reconstruction-coef", type=nonnegative_float, default=2.0)
    parser.add_argument("--reverse-cycle-coef", type=nonnegative_float, default=10.0)
    parser.add_argument("--kl-coef", type=nonnegative_float, default=3.0)
    parser.add_argument("--warmup-epochs", type=nonnegative_float, default=1.0,
                        help="KL and reverse cycle off for the first half of this many epochs, "
                             "then ramped up linearly (0 = off, as the authors); without it z "
                             "collapses to a constant early in training")
    parser.add_argument("--reverse-update", choices=["separate", "joint"], default="separate",
                        help="reverse cycle with its own Adam over the encoder (authors' code) "
                             "or summed with the forward cycle into one Adam step")
    parser.add_argument("--val-pairs", type=positive_int, default=1024,
                        help="fixed validation pairs for model selection")
    parser.add_argument("--val-every", type=positive_float, default=0.5,
                        help="validate every this many epochs")
    parser.add_argument("--time-limit-min", type=nonnegative_float, default=0,
                        help="stop training after this many minutes (0 = no limit)")
    parser.add_argument("--paper-scale", action="store_true",
                        help="z 512, s 64, width 64, 100 epochs, lr 1e-4 /10 at 80 (for a GPU)")
    parser.add_argument("--classifier-epochs", type=positive_int, default=30)
    parser.add_argument("--classifier-train-fraction", type=positive_float, default=0.8)
    parser.add_argument("--predictor-epochs", type=positive_int, default=5)
    parser.add_argument("--predictor-characters", type=int, default=0,
                        help="train the prediction networks on this many training characters "
                             "(0 = all)")
    parser.add_argument("--grids", type=positive_int, default=3, help="swap grids to draw")
    parser.add_argument("--interpolation-steps", type=positive_int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--validation-only", action="store_true")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/training_state.pt")
    parser.add_argument("--eval-only", action="store_true",
                        help="no training: figures and numbers from --weights")
    parser.add_argument("--weights", default=None, help="weights for --eval-only")
    parser.add_argument("--no-download", action="store_true", help="never try to download")
    parser.add_argument("--note", default="", help="a sentence for report.md and metrics.json "
                        "(say, why this run differs from the default)")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="with --eval-only: recompute the batch-norm statistics on "
                             "training pairs first and save the weights as OUT/cyclevae.pt "
                             "(for checkpoints whose statistics also saw reverse-cycle batches)")
    args = parser.parse_args(argv)
    if args.paper_scale:
        args.z_dim, args.s_dim, args.width = 512, 64, 64
        args.epochs, args.lr, args.lr_drop_epoch = 100.0, 1e-4, 80.0
        args.warmup_epochs = 0.0
    if args.classifier_train_fraction >= 1:
        parser.error("--classifier-train-fraction must be below 1")
    if args.interpolation_steps < 2:
        parser.error("--interpolation-steps must be at least 2")
    if args.eval_only and not args.weights:
        parser.error("--eval-only needs --weights PATH")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = args.out
    os.makedirs(out, exist_ok=True)
    timings = {}
    if args.eval_only:  # a bad weights file is reported before the data is read
        model = load_model(args.weights, device)
    with stage(timings, "load_data"):
        data = load_sprites(args.data_dir, download=not args.no_download)
        # Kept in memory as uint8 (characters, frames, 3, 60, 60); converted per batch.
        data["frames"] = torch.from_numpy(data.pop("sprites")).permute(0, 1, 4, 2, 3).contiguous()

    history, training = None, None
    if args.eval_only:
        state = load_checkpoint(args.weights, KIND)
        hp = state["hparams"]
        args.z_dim, args.s_dim, args.width = hp["z_dim"], hp["s_dim"], hp["width"]
        args.norm = hp.get("norm", "none")
        history, training = state.get("history"), state.get("training")
        for key in TRAINING_SETTINGS:  # the report describes how the weights were trained
            if key in state.get("settings", {}):
                setattr(args, key, state["settings"][key])
        run_note = f"--eval-only from {args.weights}"
        if state.get("recalibrated_batch_norm"):
            run_note += " (batch-norm statistics recomputed on training pairs after training)"
        if args.recalibrate_bn:
            recalibrate_batch_norm(model, data["frames"][data["splits"]["train"]],
                                   np.random.default_rng(args.seed + 2), device)
            save_checkpoint(os.path.join(out, "cyclevae.pt"), KIND, state["hparams"], model,
                            **{k: v for k, v in state.items()
                               if k not in ("kind", "hparams", "model", "recalibrated_batch_norm")},
                            recalibrated_batch_norm=True)
            run_note = f"--eval-only from {args.weights}, batch-norm statistics recomputed on "
            run_note += "training pairs first"
    else:
        model = build_model(model_hparams(args)).to(device).to(memory_format=torch.channels_last)
        load_before = os.getloadavg()[0]
        with stage(timings, "train"):
            history, training = train(model, data, args, device, out, timings)
        # the 2-core machine is shared: the load says how much of it this run had
        training["load_average_1min_before_after"] = [round(load_before, 2),
                                                      round(os.getloadavg()[0], 2)]
        training["train_seconds"] = timings["train_seconds"]
        training["command"] = (command_line() if argv is None
                               else "python q2_cyclevae.py " + " ".join(argv))
        save_checkpoint(os.path.join(out, "cyclevae.pt"), KIND, model_hparams(args), model,
                        history=history, training=training, settings=vars(args))
        run_note = (f"trained {training['epochs_done']} epochs"
                    + (" (stopped by --time-limit-min)" if training["stopped_by_time_limit"]
                       else ""))
    if args.validation_only:
        data["splits"] = dict(data["splits"], test=data["splits"]["val"])
    metrics = evaluate(model, data, args, device, out, timings, history)
    command = command_line() if argv is None else "python q2_cyclevae.py " + " ".join(argv)
    metrics.update(command=command, machine=machine_info(device)["description"], run_note=run_note, note=args.note,
                   settings=vars(args), timings=timings, training=training,
                   data={"cache": data["cache"], "split_file": data["split_file"],
                         "characters": {k: int(len(v)) for k, v in data["splits"].items()},
                         "frames_per_character": int(data["frames"].shape[1])})
    metrics["targets"] = targets(metrics)
    write_json(os.path.join(out, "metrics.json"), metrics)
    write_text(os.path.join(out, "report.md"), write_report(metrics, args))
    print(f"wrote {out}/metrics.json and report.md; targets: {metrics['targets']}")


if __name__ == "__main__":
    run_cli(main)
