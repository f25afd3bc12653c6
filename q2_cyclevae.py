"""Question 2: the Cycle-Consistent VAE (Jha, Anand, Singh & Veeravasarapu, ECCV 2018) on the
2D Sprites of Reed et al. (2015), with the character identity as the specified factor.

An image is encoded into an unspecified part z (variational, KL to N(0, I)) and a specified
part s (deterministic). Forward cycle: two frames of one character are reconstructed with their
s swapped. Reverse cycle: one z from the prior is decoded with the s of two arbitrary images;
the two re-encoded z means must agree, which keeps the identity out of z.

    python q2_cyclevae.py --data-dir DATA_DIR                  # the CPU default
    python q2_cyclevae.py --data-dir DATA_DIR --paper-scale    # the paper's sizes and schedule
    python q2_cyclevae.py --data-dir DATA_DIR --validation-only --out DIR  # a settings run
    python q2_cyclevae.py --data-dir DATA_DIR --eval-only      # recompute into outputs/q2/eval/
    python q2_cyclevae.py --report-only                        # re-render outputs/q2/report.md
    python q2_cyclevae.py --data-dir DATA_DIR --download-only  # fetch and convert the data only
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
from common import (UserError, check_finite, load_checkpoint, note_saved, positive_float,
                    positive_int, nonnegative_float, save_figure, stage, write_json)

SCRIPT, KIND = "q2_cyclevae.py", "q2-cyclevae"
IMAGE_SIZE = 60
LOGVAR_INIT = -5.0           # initial bias of the z log-variance head
REVERSE_CYCLE_COEF = 10.0    # the authors' weight; with its own Adam only "on" matters
VAL_PAIRS, VAL_EVERY = 1024, 0.5            # fixed validation pairs; validate every N epochs
CLASSIFIER_EPOCHS, CLASSIFIER_TRAIN_FRACTION = 30, 0.8
PREDICTOR_EPOCHS = 5
INTERPOLATION_STEPS, INTERPOLATION_PAIRS = 10, 500
ANIMATIONS = [f"{a}-{d}" for a in ("spellcast", "thrust", "walk", "slash", "shoot")
              for d in ("back", "left", "front", "right")] + ["hurt"]
PAPER_SCALE = {"z_dim": 512, "s_dim": 64, "width": 64, "kl_coef": 3.0, "epochs": 100.0,
               "lr": 1e-4, "lr_drop_epoch": 80.0, "warmup_epochs": 0.0}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(parser, "outputs/q2")
    add = parser.add_argument
    add("--z-dim", type=positive_int, default=8, help="size of z, unspecified (paper 512)")
    add("--s-dim", type=positive_int, default=8, help="size of s, specified (paper 64)")
    add("--width", type=positive_int, default=32, help="channels of the first conv (x2 a layer)")
    add("--batch-size", type=positive_int, default=64, help="pairs per step")
    add("--epochs", type=positive_float, default=6.0, help="epochs (training frames / batch steps)")
    add("--lr", type=positive_float, default=5e-4, help="Adam learning rate")
    add("--lr-drop-epoch", type=nonnegative_float, default=4.8, help="lr /10 from here (0 = never)")
    add("--reconstruction-coef", type=nonnegative_float, default=2.0)
    add("--kl-coef", type=nonnegative_float, default=1.0, help="authors' code: 3")
    add("--warmup-epochs", type=nonnegative_float, default=1.0,
        help="KL and reverse cycle off for the first half of this, then ramped up (0 = off)")
    add("--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="auto: bf16 autocast on a CPU with native bf16, float32 elsewhere")
    add("--paper-scale", action="store_true",
        help="z 512, s 64, width 64, KL weight 3, 100 epochs, lr 1e-4 /10 at 80, no warm-up "
             "(a flag given beside it wins)")
    add("--predictor-characters", type=int, default=0,
        help="train the prediction networks on this many training characters (0 = all)")
    add("--grids", type=positive_int, default=3, help="swap grids to draw")
    add("--no-download", action="store_true", help="never try to download")
    add("--download-only", action="store_true", help="fetch and convert the data, then stop")
    add("--validation-only", action="store_true",
        help="evaluate on the validation characters only (runs that choose settings)")
    return parser


def parse_args(parser, argv=None):
    args = common.parse(parser, argv)
    if args.paper_scale:  # the paper's settings replace the defaults; given flags still win
        for key, value in PAPER_SCALE.items():
            if key not in args.given:
                setattr(args, key, value)
    if args.predictor_characters < 0:
        parser.error("--predictor-characters must be 0 or more")
    return args


# --- Model: encoder x -> (z mean, z log-variance, s); decoder (z, s) -> image
class Encoder(nn.Module):
    """3x60x60 -> unspecified z (mean, log-variance) and specified s."""

    def __init__(self, z_dim, s_dim, width):
        super().__init__()
        w = width
        self.features = nn.Sequential(                                                # 3x60x60
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),                              # 30x30
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2),       # 15x15
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2),   # 8x8
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1), nn.BatchNorm2d(8 * w), nn.LeakyReLU(0.2),   # 4x4
            nn.Flatten())
        self.z_mu = nn.Linear(8 * w * 16, z_dim)
        self.z_logvar = nn.Linear(8 * w * 16, z_dim)
        self.s = nn.Linear(8 * w * 16, s_dim)
        # A small initial posterior variance: with unit noise on near-zero means the decoder
        # first learns to ignore z, and the KL then collapses it for good.
        nn.init.constant_(self.z_logvar.bias, LOGVAR_INIT)

    def forward(self, x):
        h = self.features(x)
        return self.z_mu(h), self.z_logvar(h), self.s(h)


class Decoder(nn.Module):
    """(unspecified z, specified s) -> 3x60x60 image in [0, 1]."""

    def __init__(self, z_dim, s_dim, width):
        super().__init__()
        w = self.width = width
        self.project = nn.Linear(z_dim + s_dim, 8 * w * 16)
        self.deconv = nn.Sequential(
            nn.BatchNorm2d(8 * w), nn.ReLU(),
            nn.ConvTranspose2d(8 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), nn.ReLU(),  # 8x8
            nn.ConvTranspose2d(4 * w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),  # 15
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),          # 30x30
            nn.ConvTranspose2d(w, 3, 4, 2, 1), nn.Sigmoid())                              # 60x60

    def forward(self, z, s):
        h = self.project(torch.cat([z, s], dim=1)).view(-1, 8 * self.width, 4, 4)
        return self.deconv(h)


class CycleVAE(nn.Module):
    def __init__(self, z_dim, s_dim, width):
        super().__init__()
        self.encoder = Encoder(z_dim, s_dim, width)
        self.decoder = Decoder(z_dim, s_dim, width)

    def encode(self, x):
        """x float (N,3,60,60) in [0,1] -> (unspecified z mean, its log-variance, specified s)."""
        return self.encoder(x)

    def decode(self, z, s):
        return self.decoder(z, s)


def model_hparams(args):
    return {"z_dim": args.z_dim, "s_dim": args.s_dim, "width": args.width}


def build_model(hparams):
    return CycleVAE(hparams["z_dim"], hparams["s_dim"], hparams["width"])


def load_model(path, device="cpu"):
    """The trained model from a weights file, in eval mode."""
    state = load_checkpoint(path, KIND)
    try:
        model = build_model(state["hparams"])
    except (KeyError, TypeError):
        raise UserError(f"weights file {path} does not say how to rebuild its model") from None
    return common.load_weights(model, state, path).to(device).eval()


# --- Losses: forward cycle (swap s within a same-identity pair, KL on z), reverse cycle
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
    kl = (kl_divergence(mu1.float(), logvar1.float(), x1)
          + kl_divergence(mu2.float(), logvar2.float(), x2))
    return reconstruction, kl


def reverse_cycle_loss(model, z, xa, xb):
    """One z from the prior decoded with the (detached) s of two arbitrary images; the two
    re-encoded z means must agree (L1). Only the re-encoding needs a graph."""
    with torch.no_grad():
        sa, sb = model.encode(xa)[2], model.encode(xb)[2]
        xa_generated, xb_generated = model.decode(z, sa), model.decode(z, sb)
    return F.l1_loss(model.encode(xa_generated)[0].float(), model.encode(xb_generated)[0].float())


@contextmanager
def frozen_batch_norm_statistics(model):
    """Batch norm normalises with the batch's statistics, but its running statistics (used
    at evaluation) do not move: momentum 0."""
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
    """Reverse-cycle gradients reach the encoder's parameters only; its batches (z from the
    prior, generated images) stay out of the batch-norm statistics, which describe real data."""
    z = torch.randn(len(xa), model.encoder.z_mu.out_features, device=xa.device)
    with frozen_batch_norm_statistics(model):
        reverse = reverse_cycle_loss(model, z, xa, xb)
    (coef * reverse).backward(inputs=list(model.encoder.parameters()))
    return reverse


# --- Training step and loop
def native_bf16():
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
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
    """ONE step on a batch (x1, x2, xa, xb): the forward cycle updates encoder and decoder on
    the pairs (x1, x2), then the reverse cycle updates the encoder on (xa, xb). `warmup` in
    [0, 1] scales the KL weight and the reverse cycle's learning rate."""
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
    forward_optimizer.step()
    forward_optimizer.zero_grad(set_to_none=True)
    for group in reverse_optimizer.param_groups:  # Adam ignores a constant factor on a loss
        group["lr"] = forward_optimizer.param_groups[0]["lr"] * warmup
    with autocast(x1.device, args.precision):
        reverse = reverse_cycle_backward(model, xa, xb, REVERSE_CYCLE_COEF)
    check_finite(reverse, "reverse-cycle loss")
    reverse_optimizer.step()
    reverse_optimizer.zero_grad(set_to_none=True)
    return {"reconstruction": reconstruction.item(), "kl": kl.item(),
            "reverse_cycle": reverse.item()}


def sample_pairs(rng, characters, n_frames, size):
    """(character, first frame, second frame): two random frames of one random character."""
    return (rng.integers(0, characters, size), rng.integers(0, n_frames, size),
            rng.integers(0, n_frames, size))


def make_batch(frames, rng, size, device):
    """frames: uint8 (characters, frames, 3, 60, 60) of the training characters -> x1, x2
    (pairs of one character) and xa, xb (arbitrary frames), float in [0, 1], channels-last."""
    n_chars, n_frames = frames.shape[:2]
    chars, first, second = sample_pairs(rng, n_chars, n_frames, size)
    any_a = rng.integers(0, n_chars, size), rng.integers(0, n_frames, size)
    any_b = rng.integers(0, n_chars, size), rng.integers(0, n_frames, size)
    picks = [(chars, first), (chars, second), any_a, any_b]
    return [to_images(frames[torch.from_numpy(c), torch.from_numpy(f)]).to(device)
            .contiguous(memory_format=torch.channels_last) for c, f in picks]


def schedule(step, epoch_steps, args):
    """(learning rate, warm-up factor): lr / 10 from --lr-drop-epoch on; the KL weight and the
    reverse cycle off for the first half of --warmup-epochs, then ramped up linearly."""
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
    """Batch-norm running statistics recomputed as exact averages over forward-cycle batches
    of training pairs (the running averages lag behind the weights)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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


def validate_and_save(model, optimizers, rng, progress, loop, args, device):
    """Validation objective; keep the best weights; save the whole training state."""
    result = validation_objective(model, loop["val_pairs"], args, device)
    history = progress["history"]
    history["val_step"].append(progress["step"])
    for key in ("objective", "reconstruction", "kl"):
        history[f"val_{key}"].append(result[key])
    if result["objective"] < progress["best_objective"]:
        progress["best_objective"] = result["objective"]
        progress["best_state"] = {k: t.detach().cpu().clone()
                                  for k, t in model.state_dict().items()}
    finished = progress["step"] == loop["total_steps"]
    common.save_training_state(loop["path"], common.settings_of(args), loop["data"], finished,
                               model=model.state_dict(),
                               forward_optimizer=optimizers[0].state_dict(),
                               reverse_optimizer=optimizers[1].state_dict(),
                               batch_rng=rng.bit_generator.state, **progress)
    note_saved(f"step {progress['step']} is saved in {loop['path']}; continue with the same "
               f"command and --resume" if not finished else "training finished, but its "
               "weights were not saved yet; run it again")
    print(f"  validation objective {result['objective']:.5f} "
          f"(best {progress['best_objective']:.5f})", flush=True)


def plan(data, args, out):
    """Steps of an epoch (training frames / batch, as in the authors' code), of the run, and
    the fixed validation pairs; a run shorter than one step is refused."""
    train_frames = data["frames"][data["splits"]["train"]]
    epoch_steps = max(1, train_frames.shape[0] * train_frames.shape[1] // args.batch_size)
    total_steps = int(round(args.epochs * epoch_steps))
    if total_steps < 1:
        raise UserError(f"--epochs {args.epochs:g} is less than one step (an epoch is "
                        f"{epoch_steps} steps); give at least {1 / epoch_steps:.2g}")
    return {"train_frames": train_frames, "epoch_steps": epoch_steps, "total_steps": total_steps,
            "val_pairs": validation_pairs(data["frames"][data["splits"]["val"]], VAL_PAIRS,
                                          args.seed + 1),
            "path": os.path.join(out, "training_state.pt"), "data": data["fingerprint"]}


def train(model, data, args, device, out, resumed=None):
    """Both cycles, validating every VAL_EVERY epochs; returns the history and a summary. The
    model ends with the best validation weights and recomputed batch-norm statistics."""
    loop = plan(data, args, out)
    epoch_steps, total_steps = loop["epoch_steps"], loop["total_steps"]
    optimizers = make_optimizers(model, args.lr)
    rng, progress = np.random.default_rng(args.seed), new_progress()
    if resumed:
        model.load_state_dict(resumed["model"])
        for optimizer, key in zip(optimizers, ("forward_optimizer", "reverse_optimizer")):
            optimizer.load_state_dict(resumed[key])
        rng.bit_generator.state = resumed["batch_rng"]
        progress = {k: resumed[k] for k in progress}
        print(f"resumed at step {progress['step']} of {total_steps}", flush=True)
    save_every = max(1, int(round(VAL_EVERY * epoch_steps)))
    log_every = max(1, min(50, save_every))
    running = {"reconstruction": [], "kl": [], "reverse_cycle": []}
    steps_before, seconds_before = progress["step"], progress["train_seconds"]
    start = last_log = time.perf_counter()
    while progress["step"] < total_steps:
        lr, warmup = schedule(progress["step"], epoch_steps, args)
        for group in optimizers[0].param_groups:
            group["lr"] = lr
        batch = make_batch(loop["train_frames"], rng, args.batch_size, device)
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
            validate_and_save(model, optimizers, rng, progress, loop, args, device)
    model.load_state_dict(progress["best_state"])
    recalibrate_batch_norm(model, loop["train_frames"], np.random.default_rng(args.seed + 2),
                           device)
    return progress["history"], summary(progress, loop, args, steps_before, seconds_before)


def summary(progress, loop, args, steps_before, seconds_before):
    history, steps_run = progress["history"], progress["step"] - steps_before
    return {"steps": progress["step"], "steps_per_epoch": loop["epoch_steps"],
            "epochs": round(progress["step"] / loop["epoch_steps"], 3),
            "best_val_objective": progress["best_objective"],
            "best_val_step": history["val_step"][int(np.argmin(history["val_objective"]))],
            "train_seconds": round(progress["train_seconds"], 1),
            "steps_per_s": round(steps_run / max(progress["train_seconds"] - seconds_before,
                                                 1e-9), 2),
            "pairs_per_step": args.batch_size, "precision": args.precision,
            "steps_timed": steps_run}


# --- Evaluation: partition classifiers, decoded images re-recognised, prediction networks
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
    """An MLP 256-256 (ReLU) on standardized inputs, Adam; returns the function applying it."""
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


def fit_classifier(x, labels, seed, what):
    """Cross-entropy MLP; returns features -> predicted labels."""
    labels = np.asarray(labels, dtype=np.int64)
    apply = fit_network(x, labels, int(labels.max()) + 1, F.cross_entropy, seed,
                        CLASSIFIER_EPOCHS, what)
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
    """group[c, f] = the first character whose frame f is pixel-identical to c's (weapon twins
    share about half their frames), size[c, f] = how many characters share it."""
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


def partition_classifiers(z, s, identity, pose, is_train, seed):
    """Table 1 of the paper plus pose: train / held-out accuracy of an MLP reading identity
    and pose from z and from s. Returns the accuracies and the fitted classifiers."""
    results, classifiers = {}, {}
    for part, features in (("z", z), ("s", s)):
        for task, labels in (("identity", identity), ("pose", pose)):
            name = f"{task}_from_{part}"
            classify = fit_classifier(features[is_train], labels[is_train], seed,
                                      f"{name} classifier")
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


def other_character_partners(identity, rng, rounds=1000):
    """For each held-out frame, a random held-out frame of another character."""
    partner = rng.permutation(len(identity))
    clash = np.nonzero(identity[partner] == identity)[0]
    for _ in range(rounds):
        if not len(clash):
            return partner
        partner[clash] = rng.integers(0, len(identity), len(clash))
        clash = clash[identity[partner[clash]] == identity[clash]]
    raise UserError("the swaps need frames of at least two characters in each of the "
                    "validation and test splits")


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


def sharpness(model, held, seed, classifiers, device):
    """Reconstruction MSE and the recognition rates of decoded images: reconstructions
    Dec(z, s); swaps Dec(z of a frame, s of another character's frame), which should show the
    second character in the first frame's pose; and the far end points of the interpolations
    from a to b (identity of b with z of a; pose of b with s of a)."""
    z, s, identity, pose = held["z"], held["s"], held["identity"], held["pose"]
    reconstructions = decode_latents(model, z, s, device)
    rng = np.random.default_rng(seed + 11)
    partner = other_character_partners(identity, rng)
    swaps = decode_latents(model, z, s[partner], device)
    a = rng.choice(len(z), min(INTERPOLATION_PAIRS, len(z)), replace=False)
    b = other_character_partners(identity, rng)[a]
    vary_s, vary_z = interpolation_rows(model, z[a], s[a], z[b], s[b], INTERPOLATION_STEPS,
                                        device)
    ends = torch.cat([vary_s[:, -1], vary_z[:, -1]])
    rates = lambda images, ids, poses: recognition_rates(  # noqa: E731
        model, images, ids, poses, classifiers, device)
    results = {
        "reconstruction_mse": float(F.mse_loss(reconstructions, to_images(held["frames"]))),
        "recognised": {
            "reconstructions": rates(reconstructions, identity, pose),
            "swaps": rates(swaps, identity[partner], pose),
            "interpolation_ends": rates(ends, np.concatenate([identity[b], identity[a]]),
                                        np.concatenate([pose[a], pose[b]]))}}
    return results, reconstructions


def prediction_networks(model, held, encoded_train, seed, classifiers, device):
    """z -> s and s -> z prediction networks (MSE) trained on the training characters'
    encodings; on held-out frames Dec(z, s predicted from z) and Dec(z predicted from s, s)
    are re-encoded and classified: if z held the identity, the first would show the right
    character; if s held the pose, the second would show the right pose."""
    z_train, s_train = encoded_train
    z_to_s = fit_network(z_train, torch.as_tensor(s_train), s_train.shape[1], F.mse_loss, seed,
                         PREDICTOR_EPOCHS, "z -> s prediction network")
    s_to_z = fit_network(s_train, torch.as_tensor(z_train), z_train.shape[1], F.mse_loss,
                         seed + 1, PREDICTOR_EPOCHS, "s -> z prediction network")
    z, s = held["z"], held["s"]
    s_predicted, z_predicted = z_to_s(z).numpy(), s_to_z(s).numpy()
    with_predicted_s = decode_latents(model, z, s_predicted, device)
    with_predicted_z = decode_latents(model, z_predicted, s, device)
    rates = [recognition_rates(model, images, held["identity"], held["pose"], classifiers,
                               device) for images in (with_predicted_s, with_predicted_z)]
    results = {"trained_on_frames": int(len(z_train)), "epochs": PREDICTOR_EPOCHS,
               "evaluated_on_frames": int(len(z)),
               "identity_recognised_decode_z_predicted_s": rates[0]["identity"],
               "pose_recognised_decode_predicted_z_s": rates[1]["pose"],
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
    tested on the rest (the held-out frames), then the decoded images and the prediction
    networks on those held-out frames. Returns the numbers and what the figures need."""
    frames = data["frames"][data["splits"][split]]            # (chars, F, 3, 60, 60) uint8
    n_chars, n_frames = frames.shape[:2]
    flat = frames.reshape(-1, 3, 60, 60)
    z, s = encode_frames(model, flat, device)
    identity = np.repeat(np.arange(n_chars), n_frames)
    pose = np.tile(np.repeat(np.arange(len(data["anim_lengths"])), data["anim_lengths"]),
                   n_chars)
    is_train = classifier_split(n_chars, n_frames, CLASSIFIER_TRAIN_FRACTION, args.seed)
    accuracies, classifiers = partition_classifiers(z, s, identity, pose, is_train, args.seed)
    accuracies.update(chance_and_ceiling(frames, identity, pose, is_train))
    held_out = np.nonzero(~is_train)[0]
    held = {"frames": flat[held_out], "z": z[held_out], "s": s[held_out],
            "identity": identity[held_out], "pose": pose[held_out]}
    sharp, reconstructions = sharpness(model, held, args.seed, classifiers, device)
    predictions, predicted_images = prediction_networks(model, held, encoded_train, args.seed,
                                                        classifiers, device)
    numbers = {"characters": int(n_chars), "classifier_train_frames": int(is_train.sum()),
               "held_out_frames": int(len(held_out)), "classifiers": accuracies, **sharp,
               "prediction_networks": predictions}
    return numbers, {"held": held, "reconstructions": reconstructions,
                     "predicted": predicted_images, "classifiers": classifiers}


def measure(model, data, args, device, out, timings):
    """The validation numbers and, unless --validation-only, the test numbers and figures."""
    results, grids = {}, []
    with stage(timings, "evaluation"):
        encoded_train = encode_training_characters(model, data, args, device)
        results["validation"], _ = evaluate(model, data, "val", args, device, encoded_train)
        if not args.validation_only:
            results["test"], drawn = evaluate(model, data, "test", args, device, encoded_train)
    if not args.validation_only:
        with stage(timings, "figures"):
            grids = draw_evaluation_figures(model, data, drawn, args, out, device)
    return results, grids


CHECKS = (  # (name, the number from one split's results, ">=" or "<=", threshold)
    ("identity from s / twin ceiling", lambda r: r["classifiers"]["identity_from_s"]
     ["test_accuracy"] / r["classifiers"]["identity_twin_ceiling"], ">=", 0.90),
    ("identity from z", lambda r: r["classifiers"]["identity_from_z"]["test_accuracy"],
     "<=", 0.15),
    ("pose from z", lambda r: r["classifiers"]["pose_from_z"]["test_accuracy"], ">=", 0.70),
    ("pose from s", lambda r: r["classifiers"]["pose_from_s"]["test_accuracy"], "<=", 0.30),
    ("reconstruction MSE", lambda r: r["reconstruction_mse"], "<=", 0.0030),
    ("identity of reconstructions recognised",
     lambda r: r["recognised"]["reconstructions"]["identity"], ">=", 0.90),
    ("pose of reconstructions recognised", lambda r: r["recognised"]["reconstructions"]["pose"],
     ">=", 0.90),
    ("identity of swaps recognised", lambda r: r["recognised"]["swaps"]["identity"], ">=", 0.90),
    ("pose of swaps recognised", lambda r: r["recognised"]["swaps"]["pose"], ">=", 0.90),
    ("identity of Dec(z, s predicted from z) recognised", lambda r: r["prediction_networks"]
     ["identity_recognised_decode_z_predicted_s"], "<=", 0.15),
    ("pose of Dec(z predicted from s, s) recognised", lambda r: r["prediction_networks"]
     ["pose_recognised_decode_predicted_z_s"], "<=", 0.30))


def checks_of(results):
    """The targets of the default run, judged on each split's numbers."""
    return [common.check(f"{split}: {name}", value(results[split]), f"{op} {limit:g}",
                         value(results[split]) >= limit if op == ">="
                         else value(results[split]) <= limit)
            for split in ("validation", "test") if split in results
            for name, value, op, limit in CHECKS]


# --- Figures
def grid_figure(rows, path, title, row_names, wrong=None, cell=0.8):
    """rows: lists of (3,60,60) float tensors (None = empty); wrong[i][j] frames a cell red."""
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 1.2, cell * n_rows + 0.6),
                             squeeze=False)
    for i, j in np.ndindex(n_rows, n_cols):
        ax, image = axes[i][j], rows[i][j] if j < len(rows[i]) else None
        ax.set_xticks([])
        ax.set_yticks([])
        if image is None:
            ax.axis("off")
            continue
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        bad = wrong is not None and wrong[i][j]
        for spine in ax.spines.values():
            spine.set_color("red" if bad else "0.6")
            spine.set_linewidth(3 if bad else 0.5)
        if j == 0:
            ax.set_ylabel(row_names[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    save_figure(fig, path)


@torch.no_grad()
def draw_swap_grids(model, frames, data, args, out, device, side=8):
    """The paper's layout, test characters: the top row gives s (identity, one shared frame),
    the first column gives z; cell (i, j) = Dec(z of row i, s of column j). The first grid
    takes one frame of each of 8 animations spread over the sheet, the others random ones."""
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
        z_images = to_images(frames[z_chars, z_frames])
        s_images = to_images(frames[s_chars, np.full(side, s_frame)])
        z, s = model.encode(z_images.to(device))[0], model.encode(s_images.to(device))[2]
        cells = model.decode(z.repeat_interleave(side, 0), s.repeat(side, 1)).cpu()
        cells = cells.view(side, side, 3, 60, 60)
        rows = [[None] + list(s_images)] + [[z_images[i]] + list(cells[i]) for i in range(side)]
        names.append(f"swap_grid_{g + 1}.png")
        grid_figure(rows, os.path.join(out, names[-1]),
                    "Style transfer, test characters: top row gives s (identity), first column "
                    "gives z (pose); cell = Dec(z of row, s of column)",
                    [""] + [ANIMATIONS[a] if len(lengths) == len(ANIMATIONS) else f"anim {a}"
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
    vary_s, vary_z = interpolation_rows(model, z_a, s_a, z_b, s_b, INTERPOLATION_STEPS, device)
    rows, names = [], []
    for p in range(pairs):
        a, b = images_a[p], images_b[p]
        rows += [[a] + list(vary_s[p]) + [b], [a] + list(vary_z[p]) + [b]]
        names += [f"pair {p + 1}: s a->b", f"pair {p + 1}: z a->b"]
    grid_figure(rows, os.path.join(out, "interpolation.png"),
                "Interpolation between test images a (left) and b (right): specified s with z "
                "of a fixed, unspecified z with s of a fixed", names)


def draw_evaluation_figures(model, data, drawn, args, out, device):
    """Reconstructions, prediction networks, swap grids and interpolations, test characters."""
    held, classifiers = drawn["held"], drawn["classifiers"]
    originals = to_images(held["frames"])
    show = np.sort(np.random.default_rng(args.seed + 5).choice(len(originals),
                                                                min(10, len(originals)), False))
    grid_figure([list(originals[show]), list(drawn["reconstructions"][show])],
                os.path.join(out, "reconstructions.png"),
                "Test characters: originals (top) and Dec(z mean, s) (bottom)",
                ["original", "reconstruction"])
    with_predicted_s, with_predicted_z = (images[show] for images in drawn["predicted"])
    s_s = encode_frames(model, to_uint8(with_predicted_s), device)[1]
    z_z = encode_frames(model, to_uint8(with_predicted_z), device)[0]
    wrong = [[False] * len(show),
             list(classifiers["identity_from_s"](s_s) != held["identity"][show]),
             list(classifiers["pose_from_z"](z_z) != held["pose"][show])]
    grid_figure([list(originals[show]), list(with_predicted_s), list(with_predicted_z)],
                os.path.join(out, "prediction_networks.png"),
                "rows: original | Dec(z, s predicted from z) | Dec(z predicted from s, s); red "
                "= identity (row 2) / pose (row 3) classified wrong",
                ["original", "Dec(z, f(z))", "Dec(g(s), s)"], wrong=wrong)
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
    for ax in axes:
        ax.set_xlabel("step")
        ax.axvspan(0, round(args.warmup_epochs * epoch_steps), color="0.9",
                   label="warm-up (KL, reverse cycle ramped)")
        ax.axvline(round(args.lr_drop_epoch * epoch_steps), color="0.5", ls="--", lw=1,
                   label="lr / 10")
    axes[2].legend(fontsize=7)
    save_figure(fig, path)


# --- The report: one template filled from metrics.json and runs/*/metrics.json
REPORT = """# Question 2: Cycle-Consistent VAE on the 2D Sprites (Jha et al., ECCV 2018)

Command: `{command}`  
Machine: {machine[description]}; arithmetic: {settings[precision]} (bf16 = autocast for \
convolutions and matrix products, float32 weights, optimiser and losses; fp32 = float32 throughout)

Specified factor s = character identity, unspecified factor z = everything else (mostly the \
pose). The test numbers and every picture come from the {data[characters][test]} **test \
characters** of Reed et al.'s split, unseen in training. The weights kept are those with the \
best forward-cycle objective on fixed pairs of frames of the {data[characters][val]} \
**validation characters**; {data[characters][train]} characters train the model. Other \
settings were tried in the runs of the table at the end. Runs that scored the test characters \
as well: {tested_runs}.

## Settings

| setting | this run | paper / authors' code |
|---|---|---|
| z / s size | {settings[z_dim]} / {settings[s_dim]} | 512 / 64 and 1024 / 512 |
| channels of the first conv (x2 per layer) | {settings[width]} | not published for Sprites |
| batch (pairs) | {settings[batch_size]} | 64 |
| training | {training[epochs]:g} epochs = {training[steps]} steps (epoch = \
{training[steps_per_epoch]} steps) | 100 epochs |
| Adam lr; epoch of its /10 drop (0 = none) | {settings[lr]:g}; {settings[lr_drop_epoch]:g} \
| 1e-4; 80 |
| loss weights reconstruction / reverse / KL | {settings[reconstruction_coef]:g} / 10 / \
{settings[kl_coef]:g} | 2 / 10 / 3 |

## Training

![training curves](training_curves.png)

Best validation objective at step {training[best_val_step]} of {training[steps]}; \
{training[steps_per_s]:.2f} steps/s over the {training[steps_timed]} steps this command ran \
(a step reads 4 x {settings[batch_size]} real frames).

## Reconstructions and how recognisable decoded images are

![reconstructions](reconstructions.png)

Each decoded image is saved as uint8, re-encoded, and judged by the classifiers of the partition \
table below (trained on real frames): identity from s, pose from z. A swap is Dec(z of a frame, \
s of a frame of another character) and should show the second character in the first frame's \
pose; the interpolation end points are the far ends of the rows from a to b.

| characters | reconstruction MSE | reconstructions: identity / pose recognised | swaps | \
interpolation end points |
|---|---|---|---|---|
{recognition_rows}

On real held-out frames the same classifiers read the identity from s at \
{results[test][classifiers][identity_from_s][test_accuracy]:.1%} and the pose from z at \
{results[test][classifiers][pose_from_z][test_accuracy]:.1%} (test characters).

## Style transfer (swap grids)

Top row: the image that gives s (identity); first column: the image that gives z; cell (i, j) \
= Dec(z of row i, s of column j). Rows are labelled with the animation of the z image.

{swap_grid_images}

## Interpolation

![interpolation](interpolation.png)

Odd rows: s interpolated from image a to image b with z of a fixed; even rows: z interpolated \
with s of a fixed.

## Classifiers on each partition (Table 1 layout, test characters)

| model | z train | z test | s train | s test |
|---|---|---|---|---|
| Jha et al. 2018, Table 1: Cycle-VAE 512/64 | 11.55 % | 11.47 % | 98.53 % | 97.16 % |
| Jha et al. 2018, Table 1: Cycle-VAE 1024/512 | 11.27 % | 11.61 % | 98.13 % | 97.22 % |
| Jha et al. 2018, Table 1: Mathieu et al. 512/64 | 12.05 % | 11.98 % | 99.18 % | 96.75 % |
{partition_rows}

Protocol (the paper does not publish its own, so its rows are quoted, not matched): an MLP \
256-256 (ReLU, Adam 1e-3, 30 epochs) on standardized z means or s; per test character a fixed \
random 0.8 of its frames train it, the rest ({results[test][held_out_frames]} frames) test it. \
Identity = which of the {results[test][characters]} test characters (chance \
{results[test][classifiers][identity_chance]:.1%}); pixel-identical frames of different \
characters ({results[test][classifiers][identity_pairs_sharing_a_frame]} pairs share a frame: \
weapon twins) cap it at {results[test][classifiers][identity_twin_ceiling]:.1%}. Pose = the 21 \
animations (chance {results[test][classifiers][pose_chance]:.1%}).

## Prediction networks z -> s and s -> z

![prediction networks](prediction_networks.png)

MLPs 256-256 trained with MSE (5 epochs) on the encodings of \
{results[test][prediction_networks][trained_on_frames]} frames of training characters, applied \
to the {results[test][prediction_networks][evaluated_on_frames]} held-out test frames; the \
decoded images are re-encoded and classified as above (red frames: wrong). Dec(z, s predicted \
from z) shows the right character in \
{results[test][prediction_networks][identity_recognised_decode_z_predicted_s]:.1%} of the \
frames, Dec(z predicted from s, s) the right pose in \
{results[test][prediction_networks][pose_recognised_decode_predicted_z_s]:.1%} (chance \
{results[test][classifiers][identity_chance]:.1%} / \
{results[test][classifiers][pose_chance]:.1%}). \
Relative MSE of the predictions (1 = no better than the mean): z -> s \
{results[test][prediction_networks][z_to_s_relative_mse]:.3f}, s -> z \
{results[test][prediction_networks][s_to_z_relative_mse]:.3f}.

## Checks (the targets of the default run)

{checks}

## Runs with other settings

Each run's command is the one its settings imply; its numbers are on the validation characters. \
"test scored" gives the test characters a run also evaluated ("-": none). The runs differ in \
machine and arithmetic as well as in their flags.

{runs}

## Choices where the paper is silent (this run's flags)

- Architecture for 60x60x3 (no Sprites code was published): 4 strided convs ({settings[width]} \
channels doubling per layer, kernels 4/4/3/4, stride 2, batch norm, LeakyReLU 0.2) to 4x4, linear \
heads for the z mean, the z log-variance (bias initialised to -5) and s; the decoder mirrors it \
with transposed convs, ReLU and a sigmoid.
- Losses as in the authors' MNIST code: MSE of both swapped reconstructions, KL summed and \
divided by B*C*H*W, L1 between the re-encoded z means; the reverse cycle uses s without \
gradient and its own Adam over the encoder's parameters, so its weight only turns it on (Adam \
takes the same step, up to its epsilon, for any positive factor on a loss).
- Warm-up: the KL weight and the reverse cycle's step are 0 for the first half of \
{settings[warmup_epochs]:g} epochs and rise linearly to their full value over the second half.
- Pairs: a random training character and two independent random frames of it; the reverse \
cycle takes two further batches of arbitrary training frames.
- Model selection: the forward-cycle objective (z = mean) on 1024 fixed pairs of the \
validation characters every 0.5 epochs; the best weights are kept, then their batch-norm \
statistics are recomputed as averages over 50 batches of 128 training pairs.
- Pose = the 21 animations (action x direction); the frame index is not classified.
"""
RUN_COLUMNS = [("machine", "machine.description", "{}"), ("precision", "settings.precision", "{}"),
               ("test scored", "results.test.characters", "{} characters")] + [
    (header, f"results.validation.{key}", "{:.1%}") for header, key in (
        ("reconstructions identity", "recognised.reconstructions.identity"),
        ("swaps identity", "recognised.swaps.identity"), ("swaps pose", "recognised.swaps.pose"),
        ("identity from s", "classifiers.identity_from_s.test_accuracy"),
        ("identity from z", "classifiers.identity_from_z.test_accuracy"),
        ("pose from z", "classifiers.pose_from_z.test_accuracy"),
        ("pose from s", "classifiers.pose_from_s.test_accuracy"))] + [
    ("reconstruction MSE", "results.validation.reconstruction_mse", "{:.4f}")]


def render_report(metrics, out):
    """report.md from metrics.json and runs/*/metrics.json alone."""
    r, names = metrics["results"], sorted(os.listdir(os.path.join(out, "runs"))) \
        if os.path.isdir(os.path.join(out, "runs")) else []
    tested = [n for n in names if "test" in common.read_metrics(
        os.path.join(out, "runs", n, "metrics.json"), SCRIPT)["results"]]
    rates = lambda n: " | ".join(f"{n['recognised'][k]['identity']:.1%} / "  # noqa: E731
                                 f"{n['recognised'][k]['pose']:.1%}"
                                 for k in ("reconstructions", "swaps", "interpolation_ends"))
    c = {k: v for k, v in r["test"]["classifiers"].items() if isinstance(v, dict)}
    return common.fill(
        REPORT, metrics, tested_runs=", ".join(f"`{n}`" for n in tested) or "none",
        command=common.shown_command(metrics["command"]),
        recognition_rows="\n".join(
            f"| {split} ({r[key]['held_out_frames']} held-out frames) | "
            f"{r[key]['reconstruction_mse']:.4f} | {rates(r[key])} |"
            for split, key in (("test", "test"), ("validation", "validation"))),
        partition_rows="\n".join(
            f"| this run, {task} | " + " | ".join(f"{c[f'{task}_from_{p}'][f'{w}_accuracy']:.1%}"
                                                for p in "zs" for w in ("train", "test")) + " |"
            for task in ("identity", "pose")),
        swap_grid_images="\n".join(f"![swap grid]({n})" for n in metrics["swap_grids"]),
        checks=common.checks_table(metrics["checks"]),
        runs=common.runs_table(out, SCRIPT, RUN_COLUMNS) or "No runs are stored beside this one.")


# --- Main
def load_data(args, timings):
    with stage(timings, "data"):
        data = load_sprites(args.data_dir, download=not args.no_download)
        # Kept in memory as uint8 (characters, frames, 3, 60, 60); converted per batch.
        data["frames"] = torch.from_numpy(data.pop("sprites")).permute(0, 1, 4, 2, 3).contiguous()
        data["fingerprint"] = common.fingerprint(data["frames"], *data["splits"].values())
    return data


def data_record(data, args):
    where = lambda path: path and "DATA_DIR/" + os.path.relpath(path, args.data_dir)  # noqa
    return {"cache": where(data["cache"]), "split_file": where(data["split_file"]),
            "characters": {k: int(len(v)) for k, v in data["splits"].items()},
            "frames_per_character": int(data["frames"].shape[1]),
            "fingerprint": data["fingerprint"]}


def eval_only(args, device):
    """Every number and figure again from the saved weights, written under OUT/eval/ only,
    each number compared with the committed metrics.json beside the weights."""
    weights = os.path.join(args.out, "cyclevae.pt")
    state = load_checkpoint(weights, KIND)
    model = load_model(weights, device)
    for key, value in state.get("settings", {}).items():  # evaluate as the run did
        if key not in args.given and hasattr(args, key):
            setattr(args, key, value)
    eval_dir = common.prepare_out(os.path.join(args.out, "eval"))
    committed = os.path.join(args.out, "metrics.json")
    committed = common.read_metrics(committed, SCRIPT) if os.path.isfile(committed) else None
    timings = {}
    data = load_data(args, timings)
    results, grids = measure(model, data, args, device, eval_dir, timings)
    metrics = common.record(SCRIPT, args, device, data_record(data, args), timings,
                            checks_of(results), results, training=state.get("training"),
                            swap_grids=grids)
    write_json(os.path.join(eval_dir, "metrics.json"), metrics)
    if committed:
        common.compare_with_committed(metrics, committed, eval_dir)
    print(f"wrote {eval_dir}/metrics.json and the figures there")


def main(argv=None):
    args = parse_args(build_parser(), argv)
    if args.report_only:
        return common.report_only(args.out, SCRIPT, render_report)
    device = common.choose_device(args.device)
    common.data_folder(args.data_dir)
    if args.download_only:
        data = load_sprites(args.data_dir)
        return print(f"the sprites are ready: {data['cache']} and {data['split_file']}")
    common.prepare_out(args.out)
    if args.eval_only:
        return eval_only(args, device)
    timings = {}
    data = load_data(args, timings)
    state_path = os.path.join(args.out, "training_state.pt")
    resumed = (common.load_training_state(state_path, args, data["fingerprint"])
               if args.resume else None)
    if not resumed:
        args.precision = resolve_precision(args.precision, device)
        common.seed_everything(args.seed)
    with torch.random.fork_rng(devices=[]):  # the same training RNG, fresh or resumed
        model = build_model(model_hparams(args)).to(device).to(memory_format=torch.channels_last)
    with stage(timings, "training"):
        history, summary = train(model, data, args, device, args.out, resumed)
    weights = os.path.join(args.out, "cyclevae.pt")
    common.save_checkpoint(weights, KIND, model_hparams(args), model, history=history,
                           training=summary, settings=common.settings_of(args))
    note_saved(f"the trained weights are saved in {weights}; evaluate them with --eval-only")
    with stage(timings, "figures"):
        plot_history(history, os.path.join(args.out, "training_curves.png"),
                     summary["steps_per_epoch"], args)
    model = load_model(weights, device)  # what --eval-only will see, bit for bit
    results, grids = measure(model, data, args, device, args.out, timings)
    metrics = common.record(SCRIPT, args, device, data_record(data, args), timings,
                            checks_of(results), results, training=summary, swap_grids=grids)
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    if not args.validation_only:  # a settings run is a row of its parent's runs table
        common.write_text(os.path.join(args.out, "report.md"), render_report(metrics, args.out))
    print(f"wrote {args.out}/metrics.json" + ("" if args.validation_only else " and report.md"))


# Data: Reed et al.'s 2D Sprites, as ../shared holds them (DATA_DIR/sprites_reed2015_uint8.npz
# with original/sprites_splits.mat) or as their archive unpacks (DATA_DIR/data/sprites/*.mat,
# converted once into that npz). DATA_DIR may also be the folder above sprites_reed2015/.
ARCHIVE = "nips2015-analogy-data.tar.gz"
SPRITES_SOURCES = (  # tried in this order
    "http://www-personal.umich.edu/~reedscot/files/nips2015-analogy-data.tar.gz",
    "http://www.scottreed.info/files/nips2015-analogy-data.tar.gz")
ARCHIVE_MD5 = "4e866a7919c1beedf53964e6f7a23686"  # as recorded by nmichlo/disent
KNOWN_MD5 = {"sprites_splits.mat": "5e0a46fba80e68846ed63d3b1e1b05d8",  # checked after unpacking
             "sprites_0.mat": "82b83d27b1935222f3c5441c846cfa49",
             "sprites_1.mat": "cbb7acd1cbebcec1086c6c2b5c18ecd3"}
CACHE_NAME = "sprites_reed2015_uint8.npz"
CACHE_KEYS = ("sprites", "masks", "labels", "anim_lengths", "anim_offsets")
SPLIT_NAME = "sprites_splits.mat"
FOLDERS = (os.path.join("data", "sprites"), "original")  # where the .mat files may be


class CacheError(UserError):
    """A cache that cannot be used; rebuilt from the .mat files when they are there."""


def to_images(frames):
    """uint8 (..., 3, 60, 60) tensor -> float in [0, 1]; done per batch, the data stay uint8."""
    return frames.float().div_(255)


def to_uint8(images):
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def read_splits(path):
    """Reed's split: 1-based ids in trainidx / validx / testidx -> 0-based arrays, checked."""
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
    if min(len(splits["val"]), len(splits["test"])) < 2:
        raise UserError(f"split file {path} names fewer than two validation or test "
                        f"characters; the swaps need two")
    return splits


def read_character_mat(path):
    """One character: a MATLAB v7.3 (HDF5) file with cell arrays `sprites` / `masks` (one
    float64 (frames, 10800) / (frames, 3600) array in [0,1] per animation) and 7 `labels`.
    Returns uint8 frames (n,60,60,3), masks (n,60,60), labels (7,), animation lengths."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            cells = {key: [np.asarray(f[ref], dtype=np.float64)
                           for ref in np.asarray(f[key]).ravel()] for key in ("sprites", "masks")}
            labels = np.asarray(f["labels"], dtype=np.float64).ravel()
    except Exception as error:
        raise UserError(f"{path} is not a readable MATLAB v7.3 sprite file with sprites, masks "
                        f"and labels ({type(error).__name__})") from None
    lengths, side = [a.shape[0] for a in cells["sprites"]], IMAGE_SIZE
    if (len(labels) != 7 or [m.shape[0] for m in cells["masks"]] != lengths
            or any(a.ndim != 2 or a.shape[1] != 3 * side * side for a in cells["sprites"])
            or any(m.ndim != 2 or m.shape[1] != side * side for m in cells["masks"])):
        raise UserError(f"{path} does not have the expected layout (cells of frames x 10800 "
                        f"sprites, frames x 3600 masks, 7 labels)")
    # MATLAB stores each 60x60x3 frame column-major: h5py sees (channel, column, row).
    frames = np.rint(255 * np.concatenate(cells["sprites"])).reshape(-1, 3, side, side)
    masks = np.rint(255 * np.concatenate(cells["masks"])).reshape(-1, side, side)
    return (frames.transpose(0, 3, 2, 1).astype(np.uint8),
            masks.transpose(0, 2, 1).astype(np.uint8), labels.astype(np.uint8),
            np.array(lengths, dtype=np.int16))


def convert_originals(folder, n_characters):
    """sprites_0.mat ... sprites_<n-1>.mat -> the arrays of the uint8 cache."""
    if folder is None or not all(os.path.isfile(os.path.join(folder, f"sprites_{i}.mat"))
                                 for i in range(n_characters)):
        where = folder or "the data folder"
        missing = [i for i in range(n_characters) if folder is None or not os.path.isfile(
            os.path.join(folder, f"sprites_{i}.mat"))]
        raise UserError(f"{len(missing)} of the {n_characters} character files are missing in "
                        f"{where}/ (sprites_{missing[0]}.mat first); put all of sprites_0.mat "
                        f"... sprites_{n_characters - 1}.mat there (data/sprites/ of {ARCHIVE})")
    print(f"converting {n_characters} .mat files in {folder} into a uint8 cache ...", flush=True)
    parts = [read_character_mat(os.path.join(folder, f"sprites_{i}.mat"))
             for i in range(n_characters)]
    lengths = parts[0][3]
    for i, part in enumerate(parts):
        if not np.array_equal(part[3], lengths):
            raise UserError(f"{folder}/sprites_{i}.mat has animations of {part[3].tolist()} "
                            f"frames, the other characters {lengths.tolist()}")
    return {"sprites": np.stack([p[0] for p in parts]), "masks": np.stack([p[1] for p in parts]),
            "labels": np.stack([p[2] for p in parts]), "anim_lengths": lengths,
            "anim_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int16)}


def load_cache(path, split_path, n_characters):
    """A uint8 cache, its keys, types and shapes checked; the split file must fit it."""
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
    if (sprites.dtype != np.uint8 or sprites.ndim != 5 or sprites.shape[2:] != (60, 60, 3)
            or data["labels"].shape != (len(sprites), 7) or lengths.ndim != 1
            or int(np.sum(lengths)) != sprites.shape[1]
            or offsets.tolist() != [0] + np.cumsum(lengths).tolist()):
        raise CacheError(f"cache {path} does not hold uint8 sprites (characters, frames, 60, 60, "
                         f"3) with matching labels and animation lengths")
    if len(sprites) < n_characters:
        raise UserError(f"split file {split_path} names character {n_characters} (1-based), "
                        f"but the data in {path} have {len(sprites)} characters: the split file "
                        f"does not belong to these data")
    return data


def download_sprites(root):
    """Reed et al.'s archive from the first source that works; its data/sprites/ folder moves
    into root/data/sprites only once every known md5 matches."""
    from torchvision.datasets.utils import calculate_md5

    def check(path):
        try:
            with tarfile.open(path, "r:gz") as tar:
                names = {m.name.lstrip("./") for m in tar.getmembers()}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise ValueError(f"not a readable .tar.gz ({type(error).__name__})") from None
        if f"data/sprites/{SPLIT_NAME}" not in names:
            raise ValueError(f"no data/sprites/{SPLIT_NAME} inside")

    archive = common.download_first(SPRITES_SOURCES, root, ARCHIVE, md5=ARCHIVE_MD5, check=check,
                                    offline_hint=offline_hint(root))
    staging = os.path.join(root, ".nips2015-extract.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        common.extract(archive, staging)
        folder = os.path.join(staging, "data", "sprites")
        for name, md5 in KNOWN_MD5.items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or calculate_md5(path) != md5:
                os.remove(archive)
                raise UserError(f"{archive} failed its checksum ({name}); it was deleted, run "
                                f"again to download it anew or {offline_hint(root)}")
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        os.replace(folder, os.path.join(root, "data", "sprites"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def offline_hint(root):
    return (f"put Reed et al.'s data/sprites/ folder (from {ARCHIVE}: sprites_0.mat ... "
            f"sprites_671.mat and {SPLIT_NAME}) into {root}/, or the archive itself")


def locate(root):
    """(split file, folder holding sprites_0.mat), each None where absent."""
    found = lambda name: next((os.path.join(root, d) for d in FOLDERS  # noqa: E731
                               if os.path.isfile(os.path.join(root, d, name))), None)
    split_dir = found(SPLIT_NAME)
    return split_dir and os.path.join(split_dir, SPLIT_NAME), found("sprites_0.mat")


def load_sprites(data_dir, download=True):
    """The whole dataset as uint8 arrays plus Reed's split (0-based character ids): the cache
    if it is there and sound, else the .mat files (converted once into the cache), else the
    archive (downloaded)."""
    nested = os.path.join(data_dir, "sprites_reed2015")  # a data folder shared by all scripts
    root = os.path.abspath(nested if os.path.isdir(nested) else data_dir)
    split_path, mat_dir = locate(root)
    if split_path is None and mat_dir is None and download:
        download_sprites(root)
        split_path, mat_dir = locate(root)
    if split_path is None:
        raise UserError(f"{SPLIT_NAME} is missing: {offline_hint(root)} (a {CACHE_NAME} cache "
                        f"may replace the .mat files, not the split file)")
    splits = read_splits(split_path)
    n_characters = int(max(ids.max() for ids in splits.values())) + 1
    cache, data = os.path.join(root, CACHE_NAME), None
    try:
        data = load_cache(cache, split_path, n_characters) if os.path.isfile(cache) else None
    except CacheError as error:
        if mat_dir is None:
            raise UserError(f"{error}; delete it to rebuild it from the .mat files, or copy "
                            f"it again") from None
        print(f"{error}: rebuilding it", flush=True)
    if data is None:
        data = convert_originals(mat_dir, n_characters)
        try:
            common.atomic_write(cache, lambda tmp: np.savez_compressed(open(tmp, "wb"), **data))
            print(f"cache written to {cache}", flush=True)
        except OSError:
            print(f"{root} is read-only: the .mat files are converted again next time")
            cache = None
        data.pop("masks")
    data.update(splits=splits, cache=cache, split_file=split_path)
    return data


if __name__ == "__main__":
    common.run_cli(main)
