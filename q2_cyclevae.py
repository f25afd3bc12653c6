"""Question 2: the Cycle-Consistent VAE (Jha, Anand, Singh & Veeravasarapu, ECCV 2018) on the
2D Sprites of Reed et al. (2015), with the character identity as the specified factor.

The image is split into an unspecified part z (variational, KL to N(0, I)) and a specified
part s (deterministic). Forward cycle: two frames of the same character are reconstructed with
their s swapped. Reverse cycle: one z from the prior is decoded with the s of two arbitrary
images; the two re-encoded z means must agree, which keeps identity out of z.

    python q2_cyclevae.py --data-dir DIR                  # the CPU default
    python q2_cyclevae.py --data-dir DIR --paper-scale    # the paper's sizes and schedule
    python q2_cyclevae.py --data-dir DIR --eval-only      # recompute into outputs/q2/eval/
    python q2_cyclevae.py --report-only                   # re-render outputs/q2/report.md
    python q2_cyclevae.py --data-dir DIR --download-only  # fetch and convert the data only
"""
import argparse
import hashlib
import os
import shutil
import tarfile
import time
import zipfile
import zlib
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (UserError, add_common_args, check_finite, choose_device, command_line,
                    load_checkpoint, load_weights, nonnegative_float, note_saved,
                    positive_float, positive_int, run_cli, save_checkpoint, save_figure,
                    seed_everything, stage, write_json)

KIND = "q2-cyclevae"
NOT_TRAINING = ("threads", "no_download", "download_only")  # flags a resume may change

# ---------------------------------------------------------------------------------------
# Data: Reed et al.'s nips2015-analogy-data.tar.gz, data/sprites/sprites_<i>.mat (v7.3)
# ---------------------------------------------------------------------------------------
ARCHIVE = "nips2015-analogy-data.tar.gz"
SPRITES_SOURCES = (  # tried in this order
    "http://www-personal.umich.edu/~reedscot/files/nips2015-analogy-data.tar.gz",
    "http://www.scottreed.info/files/nips2015-analogy-data.tar.gz")
ARCHIVE_MD5 = "4e866a7919c1beedf53964e6f7a23686"  # as recorded by nmichlo/disent
# The final check, whatever the source: md5 sums of three files of the archive.
KNOWN_MD5 = {"sprites_splits.mat": "5e0a46fba80e68846ed63d3b1e1b05d8",
             "sprites_0.mat": "82b83d27b1935222f3c5441c846cfa49",
             "sprites_1.mat": "cbb7acd1cbebcec1086c6c2b5c18ecd3"}
CACHE_NAME = "sprites_uint8.npz"                  # what this script writes once
SHARED_CACHE_NAME = "sprites_reed2015_uint8.npz"  # the same content under another name
CACHE_KEYS = ("sprites", "masks", "labels", "anim_lengths", "anim_offsets")
SPLIT_NAME = "sprites_splits.mat"
ANIMATIONS = [f"{a}-{d}" for a in ("spellcast", "thrust", "walk", "slash", "shoot")
              for d in ("back", "left", "front", "right")] + ["hurt"]
IMAGE_SIZE = 60
LOGVAR_INIT = -5.0  # initial bias of the z log-variance head


class CacheError(UserError):
    """A cache that cannot be used; rebuilt from the .mat files when they are there."""


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
    """Reed's split: 1-based character ids in trainidx / validx / testidx -> 0-based arrays,
    checked: none empty, ids from 1, no character in two splits."""
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
    every = np.concatenate(list(splits.values()))
    if len(np.unique(every)) != len(every):
        raise UserError(f"split file {path} names a character in two splits (or twice)")
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
    for path in (os.path.join(data_dir, CACHE_NAME), fallback_cache_path(data_dir)):
        try:
            common.atomic_write(path, lambda tmp: np.savez_compressed(open(tmp, "wb"), **data))
            return path
        except OSError:
            continue
    return None


def load_cache(path, n_characters):
    """Read a uint8 cache and check its keys, types and shapes against the split file."""
    try:
        with np.load(path) as npz:
            missing = [k for k in CACHE_KEYS if k not in npz.files]
            if missing:
                raise CacheError(f"cache {path} lacks the arrays {', '.join(missing)}")
            data = {k: npz[k] for k in CACHE_KEYS if k != "masks"}
    except CacheError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        raise CacheError(f"cache {path} is truncated or corrupt") from None
    sprites, lengths, offsets = data["sprites"], data["anim_lengths"], data["anim_offsets"]
    n = len(sprites)
    if (sprites.dtype != np.uint8 or sprites.ndim != 5 or sprites.shape[2:] != (60, 60, 3)
            or data["labels"].shape != (n, 7) or lengths.ndim != 1
            or int(np.sum(lengths)) != sprites.shape[1]
            or offsets.tolist() != [0] + np.cumsum(lengths).tolist()):
        raise CacheError(f"cache {path} does not hold uint8 sprites (characters, frames, 60, 60, "
                         f"3) with matching labels and animation lengths")
    if n < n_characters:
        raise CacheError(f"cache {path} holds {n} characters, the split file names "
                         f"{n_characters}")
    return data


def check_archive(path):
    """download_first's check: a gzip tar that holds data/sprites/sprites_splits.mat."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = {m.name.lstrip("./") for m in tar.getmembers()}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise ValueError(f"not a readable .tar.gz ({type(error).__name__})") from None
    if f"data/sprites/{SPLIT_NAME}" not in names:
        raise ValueError(f"no data/sprites/{SPLIT_NAME} inside")


def offline_hint(data_dir):
    return (f"put Reed et al.'s data/sprites/ folder (from {ARCHIVE}: sprites_0.mat ... "
            f"sprites_671.mat and {SPLIT_NAME}) into {data_dir}/, or the archive itself")


def download_sprites(data_dir):
    """Fetch Reed et al.'s archive from the first source that works, check it, and move its
    data/sprites/ folder into data_dir/data/sprites only once every known md5 matches."""
    archive = common.download_first(SPRITES_SOURCES, data_dir, ARCHIVE, md5=ARCHIVE_MD5,
                                    check=check_archive, offline_hint=offline_hint(data_dir))
    staging = os.path.join(data_dir, ".nips2015-extract.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        common.extract(archive, staging)
        folder = os.path.join(staging, "data", "sprites")
        for name, md5 in KNOWN_MD5.items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or file_md5(path) != md5:
                os.remove(archive)
                raise UserError(f"{archive} failed its checksum ({name}); it was deleted, run "
                                f"again to download it anew or {offline_hint(data_dir)}")
        os.makedirs(os.path.join(data_dir, "data"), exist_ok=True)
        os.replace(folder, os.path.join(data_dir, "data", "sprites"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(data_dir):
    """(folder, split file, folder of sprites_0.mat ...) with either present, or Nones."""
    nested = os.path.join(data_dir, "sprites_reed2015")  # a data folder shared by all scripts
    if find_split_file(data_dir) is None and find_split_file(nested) is not None:
        data_dir = nested
    mat_dir = next((d for d in sprite_dirs(data_dir)
                    if os.path.isfile(os.path.join(d, "sprites_0.mat"))), None)
    return data_dir, find_split_file(data_dir), mat_dir


def build_cache(data_dir, mat_dir, n_characters, split_path):
    """Convert the .mat files once into the uint8 cache (all of them must be there)."""
    if mat_dir is None:
        raise UserError(f"the sprite files are missing: put sprites_0.mat ... "
                        f"sprites_{n_characters - 1}.mat (data/sprites/ of {ARCHIVE}) beside "
                        f"{split_path}")
    missing = [i for i in range(n_characters)
               if not os.path.isfile(os.path.join(mat_dir, f"sprites_{i}.mat"))]
    if missing:
        raise UserError(f"{len(missing)} of the {n_characters} character files are missing in "
                        f"{mat_dir}/ (sprites_{missing[0]}.mat first); put all of sprites_0.mat "
                        f"... sprites_{n_characters - 1}.mat there")
    print(f"converting {n_characters} .mat files in {mat_dir} into a uint8 cache ...", flush=True)
    data = convert_originals(mat_dir, n_characters)
    cache = write_cache(data, data_dir)
    print(f"cache written to {cache}" if cache else "no writable place for the cache", flush=True)
    data.pop("masks")
    return data, cache


def load_sprites(data_dir, download=True):
    """The whole dataset as uint8 arrays plus Reed's split (0-based character ids).

    Looked up in this order: the cache sprites_uint8.npz (or sprites_reed2015_uint8.npz, the
    same content) in data_dir, the cache in the user cache folder, the original .mat files
    (converted once into the cache), Reed's archive (downloaded). A cache that is truncated
    or holds the wrong arrays is rebuilt from the .mat files when they are there."""
    data_dir, split_path, mat_dir = locate(os.path.abspath(data_dir))
    if split_path is None and mat_dir is None and download:
        download_sprites(data_dir)
        data_dir, split_path, mat_dir = locate(data_dir)
    if split_path is None:
        raise UserError(f"{SPLIT_NAME} is missing: {offline_hint(data_dir)} (a {CACHE_NAME} "
                        f"cache may replace the .mat files, not the split file)")
    splits = read_splits(split_path)
    n_characters = int(max(ids.max() for ids in splits.values())) + 1
    caches = [os.path.join(data_dir, CACHE_NAME), os.path.join(data_dir, SHARED_CACHE_NAME),
              fallback_cache_path(data_dir)]
    cache = next((p for p in caches if os.path.isfile(p)), None)
    try:
        data = load_cache(cache, n_characters) if cache else None
    except CacheError as error:
        if mat_dir is None:
            raise UserError(f"{error}; delete it to rebuild it from the .mat files, or copy "
                            f"it again") from None
        print(f"{error}: rebuilding it", flush=True)
        data = None
    if data is None:
        data, cache = build_cache(data_dir, mat_dir, n_characters, split_path)
    data.update(splits=splits, cache=cache, split_file=split_path)
    return data


def pose_labels(anim_lengths):
    """Per frame: the animation (action x direction, 21 classes) it belongs to."""
    return np.repeat(np.arange(len(anim_lengths)), anim_lengths)


def to_images(frames):
    """uint8 (..., 3, 60, 60) tensor -> float in [0, 1]; done per batch, the data stays uint8."""
    return frames.float().div_(255)


def to_uint8(images):
    """Decoded images back to the data's uint8 (what a saved picture holds)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------
# Model: encoder -> (z mean, z log-variance, s); decoder (z, s) -> image
# ---------------------------------------------------------------------------------------
def norm_layer(channels, norm):
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.Identity()


class Encoder(nn.Module):
    def __init__(self, z_dim, s_dim, width, norm="batch"):
        super().__init__()
        w = width
        self.features = nn.Sequential(                                                # 3x60x60
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),                              # 30x30
            nn.Conv2d(w, 2 * w, 4, 2, 1), norm_layer(2 * w, norm), nn.LeakyReLU(0.2),      # 15x15
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
    reconstruction = (F.mse_loss(model.decode(z1, s2).float(), x1)
                      + F.mse_loss(model.decode(z2, s1).float(), x2))
    kl = kl_divergence(mu1.float(), logvar1.float(), x1) + kl_divergence(mu2.float(),
                                                                         logvar2.float(), x2)
    return reconstruction, kl


def reverse_cycle_loss(model, z, xa, xb):
    """One z from the prior decoded with the (detached) s of two arbitrary images; the two
    re-encoded z means must agree (L1). Only the re-encoding depends on the encoder's
    parameters, so the decoding needs no graph."""
    with torch.no_grad():
        sa, sb = model.encode(xa)[2], model.encode(xb)[2]
        xa_generated, xb_generated = model.decode(z, sa), model.decode(z, sb)
    mu_a = model.encode(xa_generated)[0]
    mu_b = model.encode(xb_generated)[0]
    return F.l1_loss(mu_a.float(), mu_b.float())


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


def native_bf16():
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where bf16
    autocast is faster than float32; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return (("avx512_bf16" in flags or "amx_bf16" in flags)
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(choice, device):
    """--precision auto: bf16 autocast on a CPU with native bf16, float32 everywhere else."""
    if choice == "auto":
        return "bf16" if torch.device(device).type == "cpu" and native_bf16() else "fp32"
    return choice


def autocast(device, precision):
    """Convolutions and matrix products in bf16 (float32 weights, optimiser and losses)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def make_optimizers(model, lr):
    """As the authors' code: one Adam for the forward cycle (encoder and decoder), one for
    the reverse cycle (encoder only)."""
    return (torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999)),
            torch.optim.Adam(model.encoder.parameters(), lr=lr, betas=(0.9, 0.999)))


def training_step(model, optimizers, batch, args, warmup=1.0):
    """ONE training step on a batch (x1, x2, xa, xb): the forward cycle updates encoder and
    decoder on the pairs (x1, x2), then the reverse cycle updates the encoder on the
    arbitrary images (xa, xb). With --reverse-update joint both cycles are summed into one
    Adam step. `warmup` in [0, 1] scales the KL weight and the reverse cycle's step (its
    learning rate when separate: Adam ignores a constant factor on the loss)."""
    forward_optimizer, reverse_optimizer = optimizers
    x1, x2, xa, xb = batch
    model.train()
    with autocast(x1.device, args.precision):
        reconstruction, kl = forward_cycle_losses(model, x1, x2)
    check_finite(reconstruction, "reconstruction loss")
    check_finite(kl, "KL divergence")
    loss = args.reconstruction_coef * reconstruction + warmup * args.kl_coef * kl
    forward_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.reverse_update == "joint":
        with autocast(x1.device, args.precision):
            reverse = reverse_cycle_backward(model, xa, xb, warmup * args.reverse_cycle_coef)
        check_finite(reverse, "reverse-cycle loss")
        forward_optimizer.step()
    else:
        forward_optimizer.step()
        forward_optimizer.zero_grad(set_to_none=True)
        for group in reverse_optimizer.param_groups:
            group["lr"] = forward_optimizer.param_groups[0]["lr"] * warmup
        with autocast(x1.device, args.precision):
            reverse = reverse_cycle_backward(model, xa, xb, args.reverse_cycle_coef)
        check_finite(reverse, "reverse-cycle loss")
        reverse_optimizer.step()
        reverse_optimizer.zero_grad(set_to_none=True)
    return {"reconstruction": reconstruction.item(), "kl": kl.item(),
            "reverse_cycle": reverse.item()}


# ---------------------------------------------------------------------------------------
# Batches: pairs of frames of the same character, plus two arbitrary batches
# ---------------------------------------------------------------------------------------
def sample_pairs(rng, characters, n_frames, size):
    """(character, first frame, second frame) index arrays: two random frames of one random
    character each."""
    return (rng.integers(0, characters, size), rng.integers(0, n_frames, size),
            rng.integers(0, n_frames, size))


def make_batch(frames, rng, size, device):
    """frames: uint8 tensor (characters, frames, 3, 60, 60) of the training characters.
    Returns x1, x2 (pairs of one character) and xa, xb (arbitrary frames), float in [0, 1],
    channels-last in memory (faster convolutions on the CPU)."""
    n_chars, n_frames = frames.shape[:2]
    chars, first, second = sample_pairs(rng, n_chars, n_frames, size)
    any_a = rng.integers(0, n_chars, size), rng.integers(0, n_frames, size)
    any_b = rng.integers(0, n_chars, size), rng.integers(0, n_frames, size)
    picks = [(chars, first), (chars, second), any_a, any_b]
    return [to_images(frames[torch.from_numpy(c), torch.from_numpy(f)]).to(device)
            .contiguous(memory_format=torch.channels_last) for c, f in picks]


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------
def steps_per_epoch(args, n_train_frames):
    """An epoch is (training frames / batch) steps, as in the authors' code."""
    return args.epoch_steps or max(1, n_train_frames // args.batch_size)


def schedule(step, epoch_steps, args):
    """(learning rate, warm-up factor) at a step: lr / 10 from --lr-drop-epoch on; the KL
    weight and the reverse cycle off for the first half of --warmup-epochs, then ramped up
    linearly over the second half."""
    drop = args.lr_drop_epoch and step >= round(args.lr_drop_epoch * epoch_steps)
    warmup_steps = round(args.warmup_epochs * epoch_steps)
    warmup = float(np.clip(2 * step / warmup_steps - 1, 0, 1)) if warmup_steps else 1.0
    return (args.lr / 10 if drop else args.lr), warmup


def validation_pairs(frames, n_pairs, seed):
    """Fixed pairs of frames of the validation characters (uint8), for model selection."""
    chars, first, second = (torch.from_numpy(a) for a in sample_pairs(
        np.random.default_rng(seed), frames.shape[0], frames.shape[1], n_pairs))
    return frames[chars, first], frames[chars, second]


@torch.no_grad()
def validation_objective(model, pairs, args, device, batch_size=256):
    """The forward-cycle objective on the fixed validation pairs with z = mean (float32)."""
    model.eval()
    total = {"reconstruction": 0.0, "kl": 0.0}
    for i in range(0, len(pairs[0]), batch_size):
        x1, x2 = (to_images(p[i:i + batch_size]).to(device) for p in pairs)
        mu1, logvar1, s1 = model.encode(x1)
        mu2, logvar2, s2 = model.encode(x2)
        reconstruction = (F.mse_loss(model.decode(mu1, s2), x1)
                          + F.mse_loss(model.decode(mu2, s1), x2))
        kl = kl_divergence(mu1, logvar1, x1) + kl_divergence(mu2, logvar2, x2)
        total["reconstruction"] += float(reconstruction) * len(x1)
        total["kl"] += float(kl) * len(x1)
    result = {k: v / len(pairs[0]) for k, v in total.items()}
    result["objective"] = (args.reconstruction_coef * result["reconstruction"]
                           + args.kl_coef * result["kl"])
    check_finite(result["objective"], "validation objective")
    return result


@torch.no_grad()
def recalibrate_batch_norm(model, frames, rng, device, batches=50, batch_size=128):
    """Recompute the batch-norm running statistics as exact averages over forward-cycle
    batches of training pairs (the running averages lag behind the weights)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for _ in range(batches if layers else 0):
        x1, x2, _, _ = make_batch(frames, rng, batch_size, device)
        forward_cycle_losses(model, x1, x2)
    for m in layers:
        m.momentum = 0.1
    model.eval()


def new_progress():
    """What training carries from step to step, saved whole in the training state."""
    return {"step": 0, "best_objective": float("inf"), "best_state": None, "train_seconds": 0.0,
            "history": {"step": [], "reconstruction": [], "kl": [], "reverse_cycle": [],
                        "val_step": [], "val_objective": [], "val_reconstruction": [],
                        "val_kl": []}}


def log_losses(progress, running, total_steps, epoch_steps, seconds):
    """Append the mean training losses since the last entry to the history and print them."""
    history, step = progress["history"], progress["step"]
    history["step"].append(step)
    for key, values in running.items():
        history[key].append(float(np.mean(values)))
    print(f"step {step}/{total_steps} epoch {step / epoch_steps:.2f} "
          + " ".join(f"{k} {history[k][-1]:.5f}" for k in running)
          + f" | {len(running['kl']) / max(seconds, 1e-9):.1f} steps/s", flush=True)
    for values in running.values():
        values.clear()


def validate_and_save(model, optimizers, rng, progress, val_pairs, args, device, path):
    """Validation objective; keep the best weights; save the whole training state."""
    result = validation_objective(model, val_pairs, args, device)
    history = progress["history"]
    history["val_step"].append(progress["step"])
    for key in ("objective", "reconstruction", "kl"):
        history[f"val_{key}"].append(result[key])
    if result["objective"] < progress["best_objective"]:
        progress["best_objective"] = result["objective"]
        progress["best_state"] = {k: t.detach().cpu().clone()
                                  for k, t in model.state_dict().items()}
    common.save_training_state(path, common.training_settings(args, NOT_TRAINING), model=model.state_dict(),
                               forward_optimizer=optimizers[0].state_dict(),
                               reverse_optimizer=optimizers[1].state_dict(),
                               batch_rng=rng.bit_generator.state, **progress)
    note_saved(f"step {progress['step']} is saved in {path}; continue with the same command "
               f"and --resume")
    print(f"  validation objective {result['objective']:.5f} "
          f"(best {progress['best_objective']:.5f})", flush=True)


def train(model, data, args, device, out, resumed=None):
    """Train with both cycles, validating every --val-every epochs; returns the history and
    a summary. The model ends with the best validation weights and recomputed batch-norm
    statistics. `resumed` is a saved training state to continue from."""
    train_frames = data["frames"][data["splits"]["train"]]
    val_pairs = validation_pairs(data["frames"][data["splits"]["val"]], args.val_pairs,
                                 args.seed + 1)
    epoch_steps = steps_per_epoch(args, train_frames.shape[0] * train_frames.shape[1])
    total_steps = int(round(args.epochs * epoch_steps))
    optimizers = make_optimizers(model, args.lr)
    rng = np.random.default_rng(args.seed)
    progress = new_progress()
    if resumed:
        model.load_state_dict(resumed["model"])
        for optimizer, key in zip(optimizers, ("forward_optimizer", "reverse_optimizer")):
            optimizer.load_state_dict(resumed[key])
        rng.bit_generator.state = resumed["batch_rng"]
        progress = {k: resumed[k] for k in progress}
        print(f"resumed at step {progress['step']} of {total_steps}", flush=True)
    state_path = os.path.join(out, "training_state.pt")
    save_every = max(1, int(round(args.val_every * epoch_steps)))
    log_every = max(1, min(50, save_every))
    running = {"reconstruction": [], "kl": [], "reverse_cycle": []}
    steps_before, seconds_before = progress["step"], progress["train_seconds"]
    start = last_log = time.perf_counter()
    while progress["step"] < total_steps:
        lr, warmup = schedule(progress["step"], epoch_steps, args)
        for group in optimizers[0].param_groups:
            group["lr"] = lr
        batch = make_batch(train_frames, rng, args.batch_size, device)
        for key, value in training_step(model, optimizers, batch, args, warmup).items():
            running[key].append(value)
        progress["step"] += 1
        step = progress["step"]
        progress["train_seconds"] = seconds_before + time.perf_counter() - start
        saving = step % save_every == 0 or step == total_steps
        if step % log_every == 0 or saving:  # every save starts a fresh history entry
            log_losses(progress, running, total_steps, epoch_steps, time.perf_counter() - last_log)
            last_log = time.perf_counter()
        if saving:
            validate_and_save(model, optimizers, rng, progress, val_pairs, args, device,
                              state_path)
    steps_run = progress["step"] - steps_before
    seconds_run = progress["train_seconds"] - seconds_before
    model.load_state_dict(progress["best_state"])
    recalibrate_batch_norm(model, train_frames, np.random.default_rng(args.seed + 2), device)
    history = progress["history"]
    summary = {"steps": progress["step"], "steps_per_epoch": epoch_steps,
               "epochs": round(progress["step"] / epoch_steps, 3),
               "best_val_objective": progress["best_objective"],
               "best_val_step": history["val_step"][int(np.argmin(history["val_objective"]))],
               "train_seconds": round(progress["train_seconds"], 1),
               "steps_per_s": round(steps_run / max(seconds_run, 1e-9), 2),
               "pairs_per_step": args.batch_size, "precision": args.precision,
               "steps_timed": steps_run}
    return history, summary


# ---------------------------------------------------------------------------------------
# Evaluation: classifiers on each partition, sharpness of decoded images, prediction networks
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def encode_frames(model, frames, device, batch_size=500):
    """frames uint8 (n, 3, 60, 60) -> z means and s, float32 numpy."""
    model.eval()
    zs, ss = [], []
    for i in range(0, len(frames), batch_size):
        mu, _, s = model.encode(to_images(frames[i:i + batch_size]).to(device))
        zs.append(mu.cpu())
        ss.append(s.cpu())
    return torch.cat(zs).numpy(), torch.cat(ss).numpy()


@torch.no_grad()
def decode_latents(model, z, s, device, batch_size=500):
    """Dec(z, s) for numpy latents, float images (n, 3, 60, 60) in [0, 1] on the CPU."""
    model.eval()
    return torch.cat([model.decode(torch.as_tensor(z[i:i + batch_size]).to(device),
                                   torch.as_tensor(s[i:i + batch_size]).to(device)).cpu()
                      for i in range(0, len(z), batch_size)])


def fit_network(x, y, d_out, loss_fn, seed, epochs, what, batch_size=256, lr=1e-3):
    """An MLP 256-256 (ReLU) on standardized inputs, Adam; the same seed gives the same
    network. Returns the function that applies it."""
    torch.manual_seed(seed)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    mean, std = x.mean(0), x.std(0) + 1e-6
    net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, d_out))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=order).split(batch_size):
            loss = loss_fn(net((x[idx] - mean) / std), y[idx])
            check_finite(loss, f"{what} loss")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()

    def apply(features):
        with torch.no_grad():
            return net((torch.as_tensor(features, dtype=torch.float32) - mean) / std)
    return apply


def fit_classifier(x, labels, seed, epochs, what):
    """Cross-entropy MLP; returns features -> predicted labels."""
    labels = np.asarray(labels, dtype=np.int64)
    apply = fit_network(x, labels, int(labels.max()) + 1, F.cross_entropy, seed, epochs, what)
    return lambda features: apply(features).argmax(1).numpy()


def classifier_split(n_chars, n_frames, fraction, seed):
    """Per character, a fixed random `fraction` of its frames trains the classifiers."""
    rng = np.random.default_rng(seed)
    is_train = np.zeros((n_chars, n_frames), dtype=bool)
    k = max(1, int(round(fraction * n_frames)))
    for c in range(n_chars):
        is_train[c, rng.permutation(n_frames)[:k]] = True
    return is_train.ravel()


def twin_groups(frames_u8):
    """For frames (chars, F, ...) uint8: group[c, f] = the first character whose frame f is
    pixel-identical to c's (weapon twins share about half their frames), size[c, f] = how
    many characters share it."""
    n_chars, n_frames = frames_u8.shape[:2]
    group = np.zeros((n_chars, n_frames), dtype=np.int64)
    size = np.zeros((n_chars, n_frames), dtype=np.int64)
    for f in range(n_frames):
        digests = [hashlib.md5(frames_u8[c, f].numpy().tobytes()).digest() for c in range(n_chars)]
        first = {}
        for c, digest in enumerate(digests):
            first.setdefault(digest, c)
        group[:, f] = [first[d] for d in digests]
        size[:, f] = [digests.count(d) for d in digests]
    return group, size


def partition_classifiers(z, s, identity, pose, is_train, args):
    """Table 1 of the paper plus pose: train / held-out accuracy of an MLP reading identity
    and pose from z and from s. Returns the accuracies and the fitted classifiers."""
    results, classifiers = {}, {}
    for part, features in (("z", z), ("s", s)):
        for task, labels in (("identity", identity), ("pose", pose)):
            name = f"{task}_from_{part}"
            classify = fit_classifier(features[is_train], labels[is_train], args.seed,
                                      args.classifier_epochs, f"{name} classifier")
            results[name] = {
                "train_accuracy": float(np.mean(classify(features[is_train]) == labels[is_train])),
                "test_accuracy": float(np.mean(classify(features[~is_train]) == labels[~is_train]))}
            classifiers[name] = classify
    return results, classifiers


def chance_and_ceiling(frames, identity, pose, is_train):
    """Chance levels (largest class) and the identity ceiling set by pixel-identical frames
    of different characters (a tie between k of them is guessed right 1/k of the time)."""
    groups, sizes = twin_groups(frames)
    held_identity, held_pose = identity[~is_train], pose[~is_train]
    pairs = {tuple(sorted((c, int(g)))) for c, row in enumerate(groups) for g in row if g != c}
    return {"identity_chance": float(np.bincount(held_identity).max() / len(held_identity)),
            "pose_chance": float(np.bincount(held_pose).max() / len(held_pose)),
            "identity_twin_ceiling": float(np.mean(1.0 / sizes.ravel()[~is_train])),
            "identity_pairs_sharing_a_frame": len(pairs)}


def recognition_rates(model, images, identity, pose, classifiers, device):
    """How often the classifiers trained on real frames recognise decoded images, re-encoded
    as they would be saved (uint8): identity from s, pose from z."""
    z, s = encode_frames(model, to_uint8(images), device)
    return {"identity": float(np.mean(classifiers["identity_from_s"](s) == identity)),
            "pose": float(np.mean(classifiers["pose_from_z"](z) == pose)), "images": len(images)}


def other_character_partners(identity, rng):
    """For each held-out frame, a random held-out frame of another character."""
    partner = rng.permutation(len(identity))
    clash = np.nonzero(identity[partner] == identity)[0]
    while len(clash):
        partner[clash] = rng.integers(0, len(identity), len(clash))
        clash = clash[identity[partner[clash]] == identity[clash]]
    return partner


@torch.no_grad()
def interpolation_rows(model, za, sa, zb, sb, steps, device):
    """Decoded rows from a to b: s interpolated with z of a fixed, and z interpolated with s
    of a fixed; (pairs, steps, 3, 60, 60) each."""
    model.eval()
    t = torch.linspace(0, 1, steps)[None, :, None]
    za, sa, zb, sb = (torch.as_tensor(v)[:, None] for v in (za, sa, zb, sb))
    n, d_z, d_s = len(za), za.shape[2], sa.shape[2]
    vary_s = decode_latents(model, za.expand(-1, steps, -1).reshape(-1, d_z),
                            ((1 - t) * sa + t * sb).reshape(-1, d_s), device)
    vary_z = decode_latents(model, ((1 - t) * za + t * zb).reshape(-1, d_z),
                            sa.expand(-1, steps, -1).reshape(-1, d_s), device)
    return vary_s.view(n, steps, 3, 60, 60), vary_z.view(n, steps, 3, 60, 60)


def sharpness(model, held, args, classifiers, device):
    """Reconstruction MSE and the recognition rates of decoded images: reconstructions
    Dec(z, s); swaps Dec(z of a frame, s of another character's frame), which should show
    the second character in the first frame's pose (the swap-grid cells); and the far
    end points of the interpolations from a to b (identity b with z of a; pose b with s of a)."""
    z, s, identity, pose = held["z"], held["s"], held["identity"], held["pose"]
    reconstructions = decode_latents(model, z, s, device)
    rng = np.random.default_rng(args.seed + 11)
    partner = other_character_partners(identity, rng)
    swaps = decode_latents(model, z, s[partner], device)
    a = rng.choice(len(z), min(args.interpolation_pairs, len(z)), replace=False)
    b = other_character_partners(identity, rng)[a]
    vary_s, vary_z = interpolation_rows(model, z[a], s[a], z[b], s[b], args.interpolation_steps,
                                        device)
    ends = torch.cat([vary_s[:, -1], vary_z[:, -1]])
    results = {
        "reconstruction_mse": float(F.mse_loss(reconstructions, to_images(held["frames"]))),
        "recognised": {
            "reconstructions": recognition_rates(model, reconstructions, identity, pose,
                                                 classifiers, device),
            "swaps": recognition_rates(model, swaps, identity[partner], pose, classifiers,
                                       device),
            "interpolation_ends": recognition_rates(
                model, ends, np.concatenate([identity[b], identity[a]]),
                np.concatenate([pose[a], pose[b]]), classifiers, device)}}
    return results, reconstructions


def prediction_networks(model, held, encoded_train, args, classifiers, device):
    """z -> s and s -> z prediction networks (MSE), trained on the training characters'
    encodings; on held-out frames, Dec(z, s predicted from z) and Dec(z predicted from s, s)
    are re-encoded and classified: if z held the identity, the first would show the right
    character; if s held the pose, the second would show the right pose."""
    z_train, s_train = encoded_train
    mse = F.mse_loss
    z_to_s = fit_network(z_train, torch.as_tensor(s_train), s_train.shape[1], mse, args.seed,
                         args.predictor_epochs, "z -> s prediction network")
    s_to_z = fit_network(s_train, torch.as_tensor(z_train), z_train.shape[1], mse, args.seed + 1,
                         args.predictor_epochs, "s -> z prediction network")
    z, s = held["z"], held["s"]
    s_predicted, z_predicted = z_to_s(z).numpy(), s_to_z(s).numpy()
    with_predicted_s = decode_latents(model, z, s_predicted, device)
    with_predicted_z = decode_latents(model, z_predicted, s, device)
    identity_rate = recognition_rates(model, with_predicted_s, held["identity"], held["pose"],
                                      classifiers, device)["identity"]
    pose_rate = recognition_rates(model, with_predicted_z, held["identity"], held["pose"],
                                  classifiers, device)["pose"]
    results = {"trained_on_frames": int(len(z_train)), "epochs": args.predictor_epochs,
               "evaluated_on_frames": int(len(z)),
               "identity_recognised_decode_z_predicted_s": identity_rate,
               "pose_recognised_decode_predicted_z_s": pose_rate,
               "z_to_s_relative_mse": float(np.mean((s_predicted - s) ** 2)
                                            / np.mean((s - s_train.mean(0)) ** 2)),
               "s_to_z_relative_mse": float(np.mean((z_predicted - z) ** 2)
                                            / np.mean((z - z_train.mean(0)) ** 2))}
    return results, (with_predicted_s, with_predicted_z)


def encode_training_characters(model, data, args, device):
    """z means and s of the training characters' frames (for the prediction networks)."""
    ids = data["splits"]["train"]
    if args.predictor_characters:
        ids = ids[:args.predictor_characters]
    parts = [encode_frames(model, data["frames"][chunk].reshape(-1, 3, 60, 60), device)
             for chunk in np.array_split(ids, max(1, len(ids) // 50))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def evaluate(model, data, split, args, device, encoded_train):
    """Every number of one split ("val" or "test" characters, unseen in training): the
    classifiers on each partition, trained on a fixed share of each character's frames and
    tested on the rest (the held-out frames), then the sharpness of decoded images and the
    prediction networks on those held-out frames. Returns the numbers and what the figures
    need."""
    frames = data["frames"][data["splits"][split]]            # (chars, F, 3, 60, 60) uint8
    n_chars, n_frames = frames.shape[:2]
    flat = frames.reshape(-1, 3, 60, 60)
    z, s = encode_frames(model, flat, device)
    identity = np.repeat(np.arange(n_chars), n_frames)
    pose = np.tile(pose_labels(data["anim_lengths"]), n_chars)
    is_train = classifier_split(n_chars, n_frames, args.classifier_train_fraction, args.seed)
    accuracies, classifiers = partition_classifiers(z, s, identity, pose, is_train, args)
    accuracies.update(chance_and_ceiling(frames, identity, pose, is_train))
    held_out = np.nonzero(~is_train)[0]
    held = {"frames": flat[held_out], "z": z[held_out], "s": s[held_out],
            "identity": identity[held_out], "pose": pose[held_out]}
    sharp, reconstructions = sharpness(model, held, args, classifiers, device)
    predictions, predicted_images = prediction_networks(model, held, encoded_train, args,
                                                        classifiers, device)
    numbers = {"characters": int(n_chars), "classifier_train_frames": int(is_train.sum()),
               "held_out_frames": int(len(held_out)), "classifiers": accuracies, **sharp,
               "prediction_networks": predictions}
    numbers["targets"] = targets(numbers)
    return numbers, {"held": held, "reconstructions": reconstructions,
                     "predicted": predicted_images, "classifiers": classifiers}


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------
def bordered_grid_figure(rows, path, title, row_names=None, wrong=None, cell=0.8):
    """rows: lists of (3,60,60) float tensors (None = empty cell); wrong[i][j] draws a red
    frame around a cell."""
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 1.2, cell * n_rows + 0.6),
                             squeeze=False)
    for i, j in np.ndindex(n_rows, n_cols):
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
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    save_figure(fig, path)


@torch.no_grad()
def swap_grid(model, z_images, s_images, device):
    """The paper's layout: the top row gives s (identity), the first column gives z; cell
    (i, j) = Dec(z of row i, s of column j)."""
    z = model.encode(z_images.to(device))[0]
    s = model.encode(s_images.to(device))[2]
    n, m = len(z), len(s)
    cells = model.decode(z.repeat_interleave(m, 0), s.repeat(n, 1)).cpu().view(n, m, 3, 60, 60)
    return [[None] + list(s_images)] + [[z_images[i]] + list(cells[i]) for i in range(n)]


def draw_swap_grids(model, frames, data, args, out, device, side=8):
    """Swap grids of test characters: the first with one frame of each of 8 animations
    spread over the sheet, the others with random animations; s from one shared frame."""
    rng = np.random.default_rng(args.seed + 3)
    lengths, offsets = data["anim_lengths"], data["anim_offsets"]
    names = []
    for g in range(args.grids):
        s_chars, z_chars = (rng.choice(len(frames), side, replace=len(frames) < side)
                            for _ in range(2))
        animations = (np.linspace(0, len(lengths) - 1, side).round().astype(int) if g == 0 else
                      rng.choice(len(lengths), side, replace=len(lengths) < side))
        z_frames = [int(offsets[a] + rng.integers(lengths[a])) for a in animations]
        s_animation = int(rng.integers(len(lengths)))
        s_frame = int(offsets[s_animation] + rng.integers(lengths[s_animation]))
        rows = swap_grid(model, to_images(frames[z_chars, z_frames]),
                         to_images(frames[s_chars, np.full(side, s_frame)]), device)
        names.append(f"swap_grid_{g + 1}.png")
        bordered_grid_figure(
            rows, os.path.join(out, names[-1]),
            "Style transfer, test characters: top row gives s (identity), first column gives z "
            "(pose); cell = Dec(z of row, s of column)",
            row_names=[""] + [ANIMATIONS[a] if len(lengths) == len(ANIMATIONS) else f"anim {a}"
                              for a in animations])
    return names


@torch.no_grad()
def draw_interpolations(model, frames, args, out, device, pairs=3):
    """Interpolation rows for a few random pairs of test images (a left, b right)."""
    rng = np.random.default_rng(args.seed + 4)
    chars = rng.choice(len(frames), (pairs, 2), replace=len(frames) < 2 * pairs)
    picked = rng.integers(frames.shape[1], size=(pairs, 2))
    images_a, images_b = (to_images(frames[chars[:, k], picked[:, k]]) for k in (0, 1))
    z_a, _, s_a = (v.cpu().numpy() for v in model.encode(images_a.to(device)))
    z_b, _, s_b = (v.cpu().numpy() for v in model.encode(images_b.to(device)))
    vary_s, vary_z = interpolation_rows(model, z_a, s_a, z_b, s_b, args.interpolation_steps,
                                        device)
    rows, names = [], []
    for p in range(pairs):
        a, b = images_a[p], images_b[p]
        rows += [[a] + list(vary_s[p]) + [b], [a] + list(vary_z[p]) + [b]]
        names += [f"pair {p + 1}: s a->b", f"pair {p + 1}: z a->b"]
    bordered_grid_figure(rows, os.path.join(out, "interpolation.png"),
                         "Interpolation between test images a (left) and b (right): specified "
                         "s with z of a fixed, unspecified z with s of a fixed", row_names=names)


def draw_evaluation_figures(model, data, drawn, args, out, device):
    """Reconstructions, prediction networks, swap grids and interpolations, test characters."""
    held, classifiers = drawn["held"], drawn["classifiers"]
    originals = to_images(held["frames"])
    show = np.sort(np.random.default_rng(args.seed + 5).choice(len(originals),
                                                                min(10, len(originals)), False))
    bordered_grid_figure([list(originals[show]), list(drawn["reconstructions"][show])],
                         os.path.join(out, "reconstructions.png"),
                         "Test characters: originals (top) and Dec(z mean, s) (bottom)",
                         row_names=["original", "reconstruction"])
    with_predicted_s, with_predicted_z = (images[show] for images in drawn["predicted"])
    z_s, s_s = encode_frames(model, to_uint8(with_predicted_s), device)
    z_z, s_z = encode_frames(model, to_uint8(with_predicted_z), device)
    wrong = [[False] * len(show),
             list(classifiers["identity_from_s"](s_s) != held["identity"][show]),
             list(classifiers["pose_from_z"](z_z) != held["pose"][show])]
    bordered_grid_figure([list(originals[show]), list(with_predicted_s), list(with_predicted_z)],
                         os.path.join(out, "prediction_networks.png"),
                         "rows: original | Dec(z, s predicted from z) | Dec(z predicted from s, "
                         "s); red = identity (row 2) / pose (row 3) classified wrong",
                         row_names=["original", "Dec(z, f(z))", "Dec(g(s), s)"], wrong=wrong)
    test_frames = data["frames"][data["splits"]["test"]]
    names = draw_swap_grids(model, test_frames, data, args, out, device)
    draw_interpolations(model, test_frames, args, out, device)
    return names


def plot_history(history, path, epoch_steps, args):
    """Training losses and the validation objective, with the warm-up and the lr drop."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, title in zip(axes, ("reconstruction", "kl", "reverse_cycle"),
                              ("forward cycle: swap reconstruction MSE (x1 + x2)",
                               "KL(q(z|x)||N(0,I)) / (B*C*H*W), x1 + x2",
                               "reverse cycle: L1 of re-encoded z means")):
        ax.plot(history["step"], history[key])
        ax.set_title(title, fontsize=8)
    axes[3].plot(history["val_step"], history["val_objective"], marker="o")
    axes[3].set_title("validation characters: forward-cycle objective", fontsize=8)
    warmup_steps = round(args.warmup_epochs * epoch_steps)
    drop_step = round(args.lr_drop_epoch * epoch_steps)
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
# Targets and the report (a template filled from metrics.json and runs/*/metrics.json)
# ---------------------------------------------------------------------------------------
PAPER_TABLE = {"Cycle-VAE 512/64": {"z": (11.55, 11.47), "s": (98.53, 97.16)},
               "Cycle-VAE 1024/512": {"z": (11.27, 11.61), "s": (98.13, 97.22)},
               "Mathieu et al. 512/64": {"z": (12.05, 11.98), "s": (99.18, 96.75)}}
TRAINING_BUDGET_MIN = 30  # the default run is sized to train within this on 2 CPU cores
PARTITION_TARGETS = ("identity from s >= 0.90 of the twin ceiling", "identity from z <= 0.15",
                     "pose from z >= 0.70", "pose from s <= 0.30")


def targets(numbers):
    """The figures the default run aims at, judged on one split's numbers."""
    c, r = numbers["classifiers"], numbers["recognised"]
    accuracy = {k: c[k]["test_accuracy"] for k in ("identity_from_s", "identity_from_z",
                                                    "pose_from_z", "pose_from_s")}
    met = [accuracy["identity_from_s"] / c["identity_twin_ceiling"] >= 0.90,
           accuracy["identity_from_z"] <= 0.15, accuracy["pose_from_z"] >= 0.70,
           accuracy["pose_from_s"] <= 0.30]
    result = dict(zip(PARTITION_TARGETS, met))
    result["reconstruction MSE <= 0.0030"] = numbers["reconstruction_mse"] <= 0.0030
    for kind in ("reconstructions", "swaps"):
        for factor in ("identity", "pose"):
            result[f"{factor} of {kind} recognised >= 0.90"] = r[kind][factor] >= 0.90
    return result


def pct(value):
    return f"{100 * value:.1f} %"


def header_section(m):
    t, tr, n = m["timings"], m["training"], m["data"]["characters"]
    precision = {"bf16": "bf16 autocast (float32 weights and losses)", "fp32": "float32"}
    return [
        "# Question 2: Cycle-Consistent VAE on the 2D Sprites (Jha et al., ECCV 2018)", "",
        f"Command: `{common.shown_command(m['command'])}`  ",
        f"Machine: {m['machine']}; arithmetic: {precision[tr['precision']]}  ",
        f"Wall time of the whole run: {t['total_seconds'] / 60:.1f} min (training "
        f"{tr['train_seconds'] / 60:.1f} min).", "",
        "Specified factor s = character identity, unspecified factor z = everything else "
        f"(mostly the pose). The headline numbers and every picture come from the {n['test']} "
        f"**test characters** of Reed et al.'s split, unseen in training and evaluated once, "
        f"after training. The settings and the model were chosen on the {n['val']} "
        f"**validation characters** (the model: the best forward-cycle objective on their "
        f"frames during training; the settings: the validation runs at the end of this "
        f"report), whose numbers are shown beside the test numbers; {n['train']} characters "
        f"train the model.",
        ""]


def settings_section(m):
    a, tr = m["settings"], m["training"]
    return [
        "## Settings", "",
        "| setting | this run | paper / authors' code |", "|---|---|---|",
        f"| z / s size | {a['z_dim']} / {a['s_dim']} | 512 / 64 and 1024 / 512 |",
        f"| channels of the first conv (x2 per layer) | {a['width']} | not published for "
        f"Sprites |",
        f"| batch (pairs) | {a['batch_size']} | 64 |",
        f"| training | {tr['epochs']:g} epochs = {tr['steps']} steps (epoch = "
        f"{tr['steps_per_epoch']} steps) | 100 epochs |",
        f"| Adam lr | {a['lr']:g}" + (f", /10 from epoch {a['lr_drop_epoch']:g}"
                                     if a["lr_drop_epoch"] else "") + " | 1e-4, /10 after 80 |",
        f"| loss weights rec / reverse / KL | {a['reconstruction_coef']:g} / "
        f"{a['reverse_cycle_coef']:g} / {a['kl_coef']:g} | 2 / 10 / 3 |", ""]


def training_section(m):
    tr, batch = m["training"], m["settings"]["batch_size"]
    frames_per_s = 4 * batch * tr["steps_per_s"]
    return [
        "## Training", "", "![training curves](training_curves.png)", "",
        f"Training: {tr['train_seconds'] / 60:.1f} min, {tr['steps_per_s']:.2f} steps/s over "
        f"the {tr['steps_timed']} steps this command ran. A step reads {4 * batch} real "
        f"frames ({batch} pairs, i.e. {2 * batch} frames, for the forward cycle and two "
        f"batches of {batch} arbitrary frames for the reverse cycle), so {frames_per_s:.0f} "
        f"real frames/s; it also decodes {2 * batch} swapped reconstructions and {2 * batch} "
        f"images from the prior. Best validation objective at step {tr['best_val_step']} of "
        f"{tr['steps']}.", ""]


def recognition_row(name, numbers):
    r = numbers["recognised"]
    return (f"| {name} | {numbers['reconstruction_mse']:.4f} | "
            + " | ".join(f"{pct(r[k]['identity'])} / {pct(r[k]['pose'])}"
                         for k in ("reconstructions", "swaps", "interpolation_ends")) + " |")


def sharpness_section(m):
    test = m["test"]
    r, sharp = test["recognised"], test["targets"]
    sharp_keys = [k for k in sharp if k not in PARTITION_TARGETS]
    verdict = ("meets every sharpness target (reconstruction MSE <= 0.0030, identity and "
               "pose of reconstructions and swaps recognised >= 90 %)"
               if all(sharp[k] for k in sharp_keys) else
               "misses these sharpness targets: " + ", ".join(k for k in sharp_keys
                                                              if not sharp[k]))
    return [
        "## Reconstructions and how recognisable decoded images are", "",
        "![reconstructions](reconstructions.png)", "",
        "Each decoded image is saved as uint8, re-encoded, and judged by the classifiers of "
        "the partition table below (trained on real frames): identity from s, pose from z. A "
        "swap is Dec(z of a frame, s of a frame of another character) and should show the "
        "second character in the first frame's pose (a swap-grid cell); the interpolation end "
        "points are the far ends of the rows from a to b (identity of b with z of a, pose of b "
        "with s of a).", "",
        "| characters | reconstruction MSE | reconstructions: identity / pose recognised | "
        "swaps | interpolation end points |", "|---|---|---|---|---|",
        recognition_row(f"test ({test['held_out_frames']} held-out frames)", test),
        recognition_row(f"validation ({m['validation']['held_out_frames']} held-out frames)",
                        m["validation"]), "",
        f"On the test characters the run {verdict}. Real held-out frames, for comparison: "
        f"identity from s {pct(test['classifiers']['identity_from_s']['test_accuracy'])}, pose "
        f"from z {pct(test['classifiers']['pose_from_z']['test_accuracy'])}; swaps "
        f"{pct(r['swaps']['identity'])} / {pct(r['swaps']['pose'])}.", ""]


def pictures_section(m):
    lines = ["## Style transfer (swap grids)", "",
             "Top row: the image that gives s (identity); first column: the image that gives z; "
             "cell (i, j) = Dec(z of row i, s of column j). Rows are labelled with the animation "
             "of the z image.", ""]
    lines += [f"![swap grid]({name})" for name in m["swap_grids"]]
    return lines + [
        "", "## Interpolation", "", "![interpolation](interpolation.png)", "",
        "Odd rows: s interpolated from image a to image b with z of a fixed; even rows: z "
        "interpolated with s of a fixed.", ""]


def classifier_section(m):
    c, a, test = m["test"]["classifiers"], m["settings"], m["test"]
    acc = lambda key, which: pct(c[key][f"{which}_accuracy"])  # noqa: E731
    lines = ["## Classifiers on each partition (Table 1 layout, test characters)", "",
             "| model | z train | z test | s train | s test |", "|---|---|---|---|---|"]
    lines += [f"| Jha et al. 2018, Table 1: {name} | {row['z'][0]} % | {row['z'][1]} % | "
              f"{row['s'][0]} % | {row['s'][1]} % |" for name, row in PAPER_TABLE.items()]
    lines += [f"| **this run, identity ({a['z_dim']}/{a['s_dim']})** | "
              f"{acc('identity_from_z', 'train')} | {acc('identity_from_z', 'test')} | "
              f"{acc('identity_from_s', 'train')} | {acc('identity_from_s', 'test')} |",
              f"| this run, pose ({len(ANIMATIONS)} animations) | {acc('pose_from_z', 'train')} | "
              f"{acc('pose_from_z', 'test')} | {acc('pose_from_s', 'train')} | "
              f"{acc('pose_from_s', 'test')} |", "",
              f"Protocol (the paper does not publish its own, so its rows are quoted, not "
              f"matched): an MLP 256-256 (ReLU, Adam 1e-3, {a['classifier_epochs']} epochs) on "
              f"standardized z means or s; per test character a fixed random "
              f"{a['classifier_train_fraction']:g} of its frames train it, the rest "
              f"({test['held_out_frames']} frames) test it. Identity = which of the "
              f"{test['characters']} test characters (chance {pct(c['identity_chance'])}); "
              f"pixel-identical frames of different characters ({c['identity_pairs_sharing_a_frame']} "
              f"pairs share a frame: weapon twins) cap it at {pct(c['identity_twin_ceiling'])}. "
              f"Pose = the {len(ANIMATIONS)} animations (chance {pct(c['pose_chance'])}).", ""]
    return lines + ["## What the numbers say", ""] + judgements(m["test"]) + [""]


def judgements(numbers):
    """Sentences decided by the numbers; every branch is reachable."""
    c = numbers["classifiers"]
    id_s, id_z = c["identity_from_s"]["test_accuracy"], c["identity_from_z"]["test_accuracy"]
    pose_z, pose_s = c["pose_from_z"]["test_accuracy"], c["pose_from_s"]["test_accuracy"]
    share = id_s / c["identity_twin_ceiling"]
    lines = [f"- Identity from s: {pct(id_s)}, {100 * share:.0f} % of the twin ceiling: "
             + ("s holds the identity." if share >= 0.90 else
                "s misses part of the identity (target: 90 % of the ceiling)."),
             f"- Identity from z: {pct(id_z)} (chance {pct(c['identity_chance'])}): "
             + ("z carries little identity." if id_z <= 0.15 else
                "z still carries identity; the reverse cycle has not removed it (target: at "
                "most 15 %).")]
    if pose_z >= 0.70 and pose_s <= 0.30:
        pose = "the pose lives in z and hardly in s, as the forward cycle intends."
    elif pose_z >= 0.70:
        pose = ("z holds the pose, but a classifier also reads it from s: the forward cycle "
                "makes the pose in s useless to the decoder without removing it.")
    else:
        pose = "z does not hold the pose well (target: at least 70 %)."
    lines.append(f"- Pose from z {pct(pose_z)}, from s {pct(pose_s)} (chance "
                 f"{pct(c['pose_chance'])}): {pose}")
    return lines


def prediction_section(m):
    p, chance = m["test"]["prediction_networks"], m["test"]["classifiers"]
    identity_low = p["identity_recognised_decode_z_predicted_s"] <= 0.15
    pose_low = p["pose_recognised_decode_predicted_z_s"] <= 0.30
    return [
        "## Prediction networks z -> s and s -> z", "",
        "![prediction networks](prediction_networks.png)", "",
        f"MLPs 256-256 trained with MSE ({p['epochs']} epochs) on the encodings of "
        f"{p['trained_on_frames']} frames of training characters, applied to the "
        f"{p['evaluated_on_frames']} held-out test frames; the decoded images are re-encoded "
        f"and classified as above (red frames: wrong).", "",
        "| decoded image | identity recognised | pose recognised |", "|---|---|---|",
        recognition_row_short("Dec(z, s), reconstruction", m["test"]["recognised"]
                              ["reconstructions"]),
        f"| Dec(z, f(z)), s predicted from z | "
        f"{pct(p['identity_recognised_decode_z_predicted_s'])} | - |",
        f"| Dec(g(s), s), z predicted from s | - | "
        f"{pct(p['pose_recognised_decode_predicted_z_s'])} |",
        f"| chance | {pct(chance['identity_chance'])} | {pct(chance['pose_chance'])} |", "",
        f"Relative MSE of the predictions (1 = no better than the mean): z -> s "
        f"{p['z_to_s_relative_mse']:.3f}, s -> z {p['s_to_z_relative_mse']:.3f}. "
        + ("The s predicted from z rarely gives the right character (at most 15 %): z holds "
           "little of the identity. " if identity_low else
           "The s predicted from z often gives the right character (above 15 %): z holds "
           "identity that a network can read. ")
        + ("The z predicted from s rarely gives the right pose (at most 30 %): s holds little "
           "of the pose." if pose_low else
           "The z predicted from s often gives the right pose (above 30 %): s holds pose that "
           "a network can read."), ""]


def recognition_row_short(name, rates):
    return f"| {name} | {pct(rates['identity'])} | {pct(rates['pose'])} |"


SWEPT = ("z_dim", "s_dim", "width", "norm", "batch_size", "epochs", "lr", "lr_drop_epoch",
         "warmup_epochs", "reconstruction_coef", "reverse_cycle_coef", "kl_coef",
         "reverse_update", "precision", "seed")


def differing_settings(settings, reference):
    """The training flags in which `settings` differs from `reference`, as flags."""
    return " ".join(f"--{k.replace('_', '-')} {settings.get(k)}" for k in SWEPT
                    if settings.get(k) != reference.get(k)) or "none"


def validation_row(name, m, this_run):
    """One row of the runs table; training minutes only for runs on this run's machine."""
    v, c = m["validation"], m["validation"]["classifiers"]
    r = v["recognised"]
    acc = {k: c[k]["test_accuracy"] for k in ("identity_from_s", "identity_from_z",
                                               "pose_from_z", "pose_from_s")}
    machine = m.get("machine", "not recorded")
    minutes = (f"{m['training']['train_seconds'] / 60:.1f}"
               if machine == this_run.get("machine") else "-")
    return (f"| {name} | {differing_settings(m['settings'], this_run['settings'])} | "
            f"{machine.split(',')[0]} | {minutes} | {v['reconstruction_mse']:.4f} | "
            f"{pct(r['reconstructions']['identity'])} / {pct(r['reconstructions']['pose'])} | "
            f"{pct(r['swaps']['identity'])} / {pct(r['swaps']['pose'])} | "
            f"{100 * acc['identity_from_s'] / c['identity_twin_ceiling']:.0f} % | "
            f"{pct(acc['identity_from_z'])} | {pct(acc['pose_from_z'])} | "
            f"{pct(acc['pose_from_s'])} |")


def runs_section(m, runs):
    """The validation runs stored in runs/<name>/metrics.json, beside this run's own
    validation numbers, and which of them did best."""
    lines = ["## Validation runs: how the settings were chosen", "",
             f"Each run was trained by this script with the flags shown "
             f"(`runs/<name>/metrics.json`); the table gives its numbers on the "
             f"{m['data']['characters']['val']} validation characters only, the only numbers "
             f"that chose settings. Columns as above; the first row is this run. Training "
             f"minutes are given for runs on this run's machine only: times on other machines "
             f"do not compare.",
             "", "| run | flags that differ from this run | machine | training min | "
             "reconstruction MSE | reconstructions identity / pose | swaps identity / pose | "
             "identity from s / twin ceiling | identity from z | pose from z | pose from s |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             validation_row("this run", m, m)]
    lines += [validation_row(name, run, m) for name, run in runs]
    same_machine = [("this run", m)] + [(f"`{name}`", run) for name, run in runs
                                        if run.get("machine") == m.get("machine")]
    meeting = [(run["validation"]["recognised"]["swaps"]["identity"], -i, name,
                run["training"]["train_seconds"] / 60)
               for i, (name, run) in enumerate(same_machine)
               if all(run["validation"]["targets"][k] for k in PARTITION_TARGETS)]
    keeping = [row for row in meeting if row[3] <= TRAINING_BUDGET_MIN]
    if not runs:
        lines += ["", "No validation runs are stored beside this run."]
    elif keeping:
        swaps, _, name, _ = max(keeping)
        lines += ["", f"Of the runs on this run's machine that meet the four partition targets "
                      f"on the validation characters and trained for at most "
                      f"{TRAINING_BUDGET_MIN} minutes (this run included), {name} has its "
                      f"swaps' identity recognised most often ({pct(swaps)})."]
        longer = [row for row in meeting if row[3] > TRAINING_BUDGET_MIN and row[0] > swaps]
        if longer:
            swaps, _, name, minutes = max(longer)
            lines[-1] += (f" Trained for longer, {name} reaches {pct(swaps)} "
                          f"({minutes:.1f} minutes of training).")
    else:
        lines += ["", "None of the runs on this run's machine meets all four partition targets "
                      f"on the validation characters within {TRAINING_BUDGET_MIN} minutes of "
                      f"training."]
    return lines + [""]


def choices_section(m):
    a = m["settings"]
    w = a["width"]
    norm = "batch norm" if a["norm"] == "batch" else "no normalisation"
    warm = a["warmup_epochs"]
    return [
        "## Choices where the paper is silent (this run's flags)", "",
        f"- Architecture for 60x60x3 (no Sprites code was published): 4 strided convs "
        f"({w}-{2 * w}-{4 * w}-{8 * w} channels, kernels 4/4/3/4, stride 2, {norm}, LeakyReLU "
        f"0.2) to 4x4, linear heads for the z mean, the z log-variance (bias initialised to "
        f"{LOGVAR_INIT:g}) and s; the decoder mirrors it with transposed convs, ReLU and a "
        f"sigmoid.",
        f"- Losses as in the authors' MNIST code: MSE of both swapped reconstructions x "
        f"{a['reconstruction_coef']:g}, KL summed and divided by B*C*H*W x {a['kl_coef']:g}, "
        f"L1 between the re-encoded z means x {a['reverse_cycle_coef']:g}"
        + ("" if (a["reconstruction_coef"], a["reverse_cycle_coef"], a["kl_coef"]) == (2, 10, 3)
           else " (the authors' weights are 2 / 10 / 3)") + "; the reverse cycle "
        f"uses s without gradient and "
        + ("its own Adam over the encoder's parameters (so its weight only turns it on or "
           "off: Adam takes the same step, up to its epsilon, for any positive factor on a loss)."
           if a["reverse_update"] == "separate"
           else "is summed with the forward cycle into one Adam step."),
        ("- Warm-up: the KL weight and the reverse cycle's step are 0 for the first "
         f"{warm / 2:g} epochs and reach their full value linearly at epoch {warm:g}."
         if warm else "- No warm-up (the authors' setting)."),
        "- Arithmetic: " + ("bf16 autocast for the convolutions and matrix products, float32 "
                            "weights, optimiser and losses." if m["training"]["precision"] ==
                            "bf16" else "float32 throughout."),
        "- Pairs: a random training character and two independent random frames of it; the "
        "reverse cycle takes two further batches of arbitrary training frames.",
        f"- Model selection: the forward-cycle objective (z = mean) on {a['val_pairs']} fixed "
        f"pairs of the validation characters every {a['val_every']:g} epochs; the best weights "
        f"are kept, then their batch-norm statistics are recomputed as averages over 50 "
        f"batches of 128 training pairs.",
        "- Pose = the 21 animations (action x direction); the frame index is not classified.",
        ""]


def render_report(metrics, out):
    """report.md from metrics.json and runs/*/metrics.json alone."""
    runs = common.other_runs(out)
    if "test" not in metrics:  # a --validation-only run
        return "\n".join(header_section(metrics)[:5] + [
            "Validation-only run: the test characters were not used.", "",
            "| run | flags that differ | machine | training min | reconstruction MSE | "
            "reconstructions identity / pose | swaps identity / pose | identity from s / twin "
            "ceiling | identity from z | pose from z | pose from s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            validation_row("this run", metrics, metrics), ""])
    sections = [header_section, settings_section, training_section, sharpness_section,
                pictures_section, classifier_section, prediction_section]
    lines = [line for section in sections for line in section(metrics)]
    return "\n".join(lines + runs_section(metrics, runs) + choices_section(metrics))


# ---------------------------------------------------------------------------------------
# Arguments and main
# ---------------------------------------------------------------------------------------
PAPER_SCALE = {"z_dim": 512, "s_dim": 64, "width": 64, "kl_coef": 3.0, "epochs": 100.0,
               "lr": 1e-4, "lr_drop_epoch": 80.0, "warmup_epochs": 0.0}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser, "outputs/q2")
    add = parser.add_argument
    add("--z-dim", type=positive_int, default=8, help="size of z (paper 512)")
    add("--s-dim", type=positive_int, default=8, help="size of s (paper 64)")
    add("--width", type=positive_int, default=32, help="channels of the first conv (x2 a layer)")
    add("--norm", choices=["batch", "none"], default="batch", help="normalisation in hidden layers")
    add("--batch-size", type=positive_int, default=64, help="pairs per step")
    add("--epochs", type=positive_float, default=6.0, help="epochs (training frames / batch steps)")
    add("--epoch-steps", type=positive_int, default=None, help="override the steps of an epoch")
    add("--lr", type=positive_float, default=5e-4, help="Adam learning rate")
    add("--lr-drop-epoch", type=nonnegative_float, default=4.8, help="lr /10 from here (0 = never)")
    add("--reconstruction-coef", type=nonnegative_float, default=2.0)
    add("--reverse-cycle-coef", type=nonnegative_float, default=10.0,
        help="with --reverse-update separate only 0 (off) differs from the default")
    add("--kl-coef", type=nonnegative_float, default=1.0, help="authors' code: 3")
    add("--warmup-epochs", type=nonnegative_float, default=1.0,
        help="KL and reverse cycle off for the first half of this, then ramped up (0 = off)")
    add("--reverse-update", choices=["separate", "joint"], default="separate",
        help="reverse cycle with its own Adam over the encoder (authors' code) or one joint step")
    add("--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="auto: bf16 autocast on a CPU with native bf16, float32 elsewhere")
    add("--val-pairs", type=positive_int, default=1024, help="fixed validation pairs")
    add("--val-every", type=positive_float, default=0.5, help="validate and save every N epochs")
    add("--paper-scale", action="store_true",
        help="z 512, s 64, width 64, KL weight 3, 100 epochs, lr 1e-4 /10 at 80, no warm-up "
             "(a flag given beside it wins)")
    add("--classifier-epochs", type=positive_int, default=30)
    add("--classifier-train-fraction", type=positive_float, default=0.8)
    add("--predictor-epochs", type=positive_int, default=5)
    add("--predictor-characters", type=int, default=0,
        help="train the prediction networks on this many training characters (0 = all)")
    add("--grids", type=positive_int, default=3, help="swap grids to draw")
    add("--interpolation-steps", type=positive_int, default=10)
    add("--interpolation-pairs", type=positive_int, default=500,
        help="pairs whose interpolation end points are classified")
    add("--threads", type=positive_int, default=None, help="CPU threads for PyTorch")
    add("--weights", default=None, help="weights for --eval-only (default OUT/cyclevae.pt)")
    add("--no-download", action="store_true", help="never try to download")
    add("--download-only", action="store_true", help="fetch and convert the data, then stop")
    add("--validation-only", action="store_true",
        help="evaluate on the validation characters only (runs that choose settings)")
    return parser


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    if args.paper_scale:  # the paper's settings replace the defaults; given flags still win
        given = common.given_flags(parser, argv)
        for key, value in PAPER_SCALE.items():
            if key not in given:
                setattr(args, key, value)
    if args.classifier_train_fraction >= 1:
        parser.error("--classifier-train-fraction must be below 1")
    if args.interpolation_steps < 2:
        parser.error("--interpolation-steps must be at least 2")
    if args.predictor_characters < 0:
        parser.error("--predictor-characters must be 0 or more")
    if (args.reverse_update == "separate"
            and args.reverse_cycle_coef not in (0, parser.get_default("reverse_cycle_coef"))):
        parser.error("--reverse-cycle-coef changes nothing with --reverse-update separate: the "
                     "reverse cycle's own Adam takes the same step, up to its epsilon, for any "
                     "positive factor on its loss; give 0 to turn it off, or --reverse-update "
                     "joint to weigh it against the forward cycle")
    return args


def load_data(args, timings):
    with stage(timings, "load_data"):
        data = load_sprites(args.data_dir, download=not args.no_download)
        # Kept in memory as uint8 (characters, frames, 3, 60, 60); converted per batch.
        data["frames"] = torch.from_numpy(data.pop("sprites")).permute(0, 1, 4, 2, 3).contiguous()
    return data


def measure(model, data, args, device, out, timings):
    """The validation numbers and, unless --validation-only, the test numbers and figures."""
    with stage(timings, "encode_training_characters"):
        encoded_train = encode_training_characters(model, data, args, device)
    metrics = {}
    with stage(timings, "evaluate_validation"):
        metrics["validation"], _ = evaluate(model, data, "val", args, device, encoded_train)
    if not args.validation_only:
        with stage(timings, "evaluate_test"):
            metrics["test"], drawn = evaluate(model, data, "test", args, device, encoded_train)
        with stage(timings, "figures"):
            metrics["swap_grids"] = draw_evaluation_figures(model, data, drawn, args, out, device)
    return metrics


def describe(args, argv, data, device, timings, start):
    timings["total_seconds"] = round(time.perf_counter() - start, 1)
    return {"command": command_line() if argv is None else "python q2_cyclevae.py "
            + " ".join(argv), "machine": common.machine_info(device)["description"],
            "settings": vars(args), "timings": timings,
            "data": {"cache": data["cache"], "split_file": data["split_file"],
                     "characters": {k: int(len(v)) for k, v in data["splits"].items()},
                     "frames_per_character": int(data["frames"].shape[1])}}


def eval_only(args, parser, argv, device, start):
    """Every number and figure again from saved weights, written under OUT/eval/ only, each
    number printed beside the one committed with the weights."""
    weights = args.weights or os.path.join(args.out, "cyclevae.pt")
    state = load_checkpoint(weights, KIND)
    model = load_model(weights, device)
    given = common.given_flags(parser, argv)
    for key, value in state.get("settings", {}).items():  # evaluate as the run did
        if key not in given and hasattr(args, key):
            setattr(args, key, value)
    eval_dir = os.path.join(args.out, "eval")
    common.prepare_out(eval_dir)
    timings = {}
    data = load_data(args, timings)
    metrics = measure(model, data, args, device, eval_dir, timings)
    metrics.update(describe(args, argv, data, device, timings, start), weights=weights,
                   training=state.get("training"))
    write_json(os.path.join(eval_dir, "metrics.json"), metrics)
    committed = os.path.join(os.path.dirname(os.path.abspath(weights)), "metrics.json")
    if os.path.isfile(committed):
        keys = [k for k in ("validation", "test") if k in metrics]
        common.compare_with_committed({k: metrics[k] for k in keys},
                                      common.read_json(committed, "the committed metrics"),
                                      eval_dir)
    print(f"wrote {eval_dir}/metrics.json and the figures there")


def main(argv=None):
    start = time.perf_counter()
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.report_only:
        return common.report_only(args.out, render_report)
    device = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.download_only:
        data = load_sprites(args.data_dir)
        return print(f"the sprites are ready: {data['cache']} and {data['split_file']}")
    common.prepare_out(args.out)
    if args.eval_only:
        return eval_only(args, parser, argv, device, start)
    state_path = os.path.join(args.out, "training_state.pt")
    resumed = common.load_training_state(state_path, args, parser, argv) if args.resume else None
    if not resumed:
        args.precision = resolve_precision(args.precision, device)
        seed_everything(args.seed)
    with torch.random.fork_rng(devices=[]):  # the same training RNG, fresh or resumed
        model = build_model(model_hparams(args)).to(device).to(memory_format=torch.channels_last)
    timings = {}
    data = load_data(args, timings)
    with stage(timings, "train"):
        history, summary = train(model, data, args, device, args.out, resumed)
    summary["command"] = command_line() if argv is None else "python q2_cyclevae.py " + " ".join(argv)
    weights = os.path.join(args.out, "cyclevae.pt")
    save_checkpoint(weights, KIND, model_hparams(args), model, history=history,
                    training=summary, settings=common.training_settings(args, NOT_TRAINING))
    note_saved(f"the trained weights are saved in {weights}; evaluate them with --eval-only")
    plot_history(history, os.path.join(args.out, "training_curves.png"),
                 summary["steps_per_epoch"], args)
    model = load_model(weights, device)  # what --eval-only will see, bit for bit
    metrics = measure(model, data, args, device, args.out, timings)
    metrics.update(describe(args, argv, data, device, timings, start), training=summary)
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    common.write_text(os.path.join(args.out, "report.md"), render_report(metrics, args.out))
    print(f"wrote {args.out}/metrics.json and report.md")


if __name__ == "__main__":
    run_cli(main)
