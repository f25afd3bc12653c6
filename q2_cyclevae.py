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
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (UserError, check_finite, load_checkpoint, note_saved, plt, positive_float,
                    positive_int, nonnegative_float, save_figure, stage, write_json)

SCRIPT, KIND = "q2_cyclevae.py", "q2-cyclevae"
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
    add("--width", type=positive_int, default=32, help="channels of the first conv")
    add("--batch-size", type=positive_int, default=64, help="pairs per step")
    add("--epochs", type=positive_float, default=6.0)
    add("--lr", type=positive_float, default=5e-4)
    add("--lr-drop-epoch", type=nonnegative_float, default=4.8, help="lr /10 from here (0: never)")
    add("--reconstruction-coef", type=nonnegative_float, default=2.0)
    add("--kl-coef", type=nonnegative_float, default=1.0)
    add("--warmup-epochs", type=nonnegative_float, default=1.0, help="KL, reverse cycle ramped up")
    add("--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="auto: bf16 autocast on a CPU with native bf16")
    add("--paper-scale", action="store_true", help="the settings of PAPER_SCALE; given flags win")
    add("--predictor-characters", type=int, default=0, help="for the prediction networks (0: all)")
    add("--grids", type=positive_int, default=3, help="swap grids to draw")
    add("--no-download", action="store_true")
    add("--download-only", action="store_true", help="fetch and convert the data, then stop")
    add("--validation-only", action="store_true", help="evaluate the validation characters only")
    return parser

def parse_args(parser, argv=None):
    args = common.parse(parser, argv)
    if args.paper_scale:
        for key, value in PAPER_SCALE.items():
            if key not in args.given:
                setattr(args, key, value)
    if args.predictor_characters < 0:
        parser.error("--predictor-characters must be 0 or more")
    return args

# --- Model: encoder x -> (z mean, z log-variance, s); decoder (z, s) -> image
class Encoder(nn.Module):
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
        return self.deconv(self.project(torch.cat([z, s], dim=1)).view(-1, 8 * self.width, 4, 4))

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

def kl_divergence(mu, logvar, x):  # summed, then / (B*C*H*W) as in the authors' code
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.numel()

def forward_cycle_losses(model, x1, x2, sample=True):
    """Dec(z1, s2) ~ x1 and Dec(z2, s1) ~ x2 for two frames of one character; z = mean unless
    `sample`."""
    (mu1, logvar1, s1), (mu2, logvar2, s2) = model.encode(x1), model.encode(x2)
    z1, z2 = ((reparameterize(mu1, logvar1), reparameterize(mu2, logvar2)) if sample
              else (mu1, mu2))
    reconstruction = (F.mse_loss(model.decode(z1, s2).float(), x1)
                      + F.mse_loss(model.decode(z2, s1).float(), x2))
    kl = (kl_divergence(mu1.float(), logvar1.float(), x1)
          + kl_divergence(mu2.float(), logvar2.float(), x2))
    return reconstruction, kl

def reverse_cycle_loss(model, z, xa, xb):
    """One z decoded with the (detached) s of two images; L1 of the re-encoded z means."""
    with torch.no_grad():
        sa, sb = model.encode(xa)[2], model.encode(xb)[2]
        xa_generated, xb_generated = model.decode(z, sa), model.decode(z, sb)
    return F.l1_loss(model.encode(xa_generated)[0].float(), model.encode(xb_generated)[0].float())

def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

def reverse_cycle_backward(model, xa, xb, coef):
    """Gradients to the encoder only; the prior z and generated images stay out of the
    batch-norm running statistics (momentum 0)."""
    z = torch.randn(len(xa), model.encoder.z_mu.out_features, device=xa.device)
    layers = batch_norms(model)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        reverse = reverse_cycle_loss(model, z, xa, xb)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
    (coef * reverse).backward(inputs=list(model.encoder.parameters()))
    return reverse

# --- Training step and loop
def native_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return (("avx512_bf16" in flags or "amx_bf16" in flags)
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())

def resolve_precision(choice, device):
    if choice == "auto":
        return "bf16" if torch.device(device).type == "cpu" and native_bf16() else "fp32"
    return choice

def autocast(device, precision):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")

def make_optimizers(model, lr):
    """As the authors' code: one Adam for the forward cycle, one (encoder only) for the reverse."""
    return (torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999)),
            torch.optim.Adam(model.encoder.parameters(), lr=lr, betas=(0.9, 0.999)))

def training_step(model, optimizers, batch, args, warmup=1.0):
    """One step on (x1, x2, xa, xb): the forward cycle updates encoder and decoder on the pairs
    (x1, x2), then the reverse cycle the encoder on (xa, xb); `warmup` in [0, 1] scales the KL
    weight and the reverse cycle's learning rate."""
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
    return (rng.integers(0, characters, size), rng.integers(0, n_frames, size),
            rng.integers(0, n_frames, size))

def make_batch(frames, rng, size, device):
    """uint8 (characters, frames, 3, 60, 60) -> x1, x2 (pairs of one character), xa, xb
    (arbitrary frames), float in [0, 1], channels-last."""
    n_chars, n_frames = frames.shape[:2]
    chars, first, second = sample_pairs(rng, n_chars, n_frames, size)
    any_a = rng.integers(0, n_chars, size), rng.integers(0, n_frames, size)
    any_b = rng.integers(0, n_chars, size), rng.integers(0, n_frames, size)
    return [to_images(frames[torch.from_numpy(c), torch.from_numpy(f)]).to(device)
            .contiguous(memory_format=torch.channels_last)
            for c, f in [(chars, first), (chars, second), any_a, any_b]]

def schedule(step, epoch_steps, args):
    """(lr, warm-up factor): lr / 10 from --lr-drop-epoch on; the warm-up factor 0 for the
    first half of --warmup-epochs, then rising linearly to 1."""
    drop = args.lr_drop_epoch and step >= round(args.lr_drop_epoch * epoch_steps)
    warmup_steps = round(args.warmup_epochs * epoch_steps)
    warmup = float(np.clip(2 * step / warmup_steps - 1, 0, 1)) if warmup_steps else 1.0
    return (args.lr / 10 if drop else args.lr), warmup

@torch.no_grad()
def validation_objective(model, pairs, args, device, batch_size=256):
    model.eval()
    total = {"reconstruction": 0.0, "kl": 0.0}
    for i in range(0, len(pairs[0]), batch_size):
        x1, x2 = (to_images(p[i:i + batch_size]).to(device) for p in pairs)
        reconstruction, kl = forward_cycle_losses(model, x1, x2, sample=False)
        total["reconstruction"] += float(reconstruction) * len(x1)
        total["kl"] += float(kl) * len(x1)
    result = {k: v / len(pairs[0]) for k, v in total.items()}
    result["objective"] = (args.reconstruction_coef * result["reconstruction"]
                           + args.kl_coef * result["kl"])
    check_finite(result["objective"], "validation objective")
    return result

@torch.no_grad()
def recalibrate_batch_norm(model, frames, rng, device, batches=50, batch_size=128):
    for m in batch_norms(model):
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for _ in range(batches):
        forward_cycle_losses(model, *make_batch(frames, rng, batch_size, device)[:2])
    for m in batch_norms(model):
        m.momentum = 0.1
    model.eval()

def log_losses(progress, running, total_steps, epoch_steps, seconds):
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
    train_frames, val_frames = (data["frames"][data["splits"][k]] for k in ("train", "val"))
    epoch_steps = max(1, train_frames.shape[0] * train_frames.shape[1] // args.batch_size)
    total_steps = int(round(args.epochs * epoch_steps))
    if total_steps < 1:
        raise UserError(f"--epochs {args.epochs:g} is less than one step (an epoch is "
                        f"{epoch_steps} steps); give at least {1 / epoch_steps:.2g}")
    chars, first, second = (torch.from_numpy(a) for a in sample_pairs(
        np.random.default_rng(args.seed + 1), *val_frames.shape[:2], VAL_PAIRS))
    return {"train_frames": train_frames, "epoch_steps": epoch_steps, "total_steps": total_steps,
            "val_pairs": (val_frames[chars, first], val_frames[chars, second]),
            "path": os.path.join(out, "training_state.pt"), "data": data["fingerprint"]}

def train(model, data, args, device, out, resumed=None):
    """Both cycles, validated every VAL_EVERY epochs; ends with the best weights and
    recomputed batch-norm statistics. Returns the history and a summary."""
    loop = plan(data, args, out)
    epoch_steps, total_steps = loop["epoch_steps"], loop["total_steps"]
    optimizers = make_optimizers(model, args.lr)
    rng = np.random.default_rng(args.seed)
    progress = {"step": 0, "best_objective": float("inf"), "best_state": None,
                "train_seconds": 0.0, "history": {k: [] for k in (
                    "step", "reconstruction", "kl", "reverse_cycle", "val_step",
                    "val_objective", "val_reconstruction", "val_kl")}}
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
        progress["step"] = step = progress["step"] + 1
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
    history, steps_run = progress["history"], progress["step"] - steps_before
    seconds = max(progress["train_seconds"] - seconds_before, 1e-9)
    return history, {
        "steps": progress["step"], "steps_per_epoch": epoch_steps,
        "epochs": round(progress["step"] / epoch_steps, 3),
        "best_val_objective": progress["best_objective"],
        "best_val_step": history["val_step"][int(np.argmin(history["val_objective"]))],
        "train_seconds": round(progress["train_seconds"], 1),
        "steps_per_s": round(steps_run / seconds, 2), "pairs_per_step": args.batch_size,
        "precision": args.precision, "steps_timed": steps_run}

# --- Evaluation: partition classifiers, decoded images re-recognised, prediction networks
@torch.no_grad()
def encode_frames(model, frames, device, batch_size=500):
    model.eval()
    parts = [model.encode(to_images(frames[i:i + batch_size]).to(device))
             for i in range(0, len(frames), batch_size)]
    return tuple(torch.cat([p[k].cpu() for p in parts]).numpy() for k in (0, 2))

@torch.no_grad()
def decode_latents(model, z, s, device, batch_size=500):
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
    return torch.no_grad()(lambda features: net((torch.as_tensor(features, dtype=torch.float32)
                                                 - mean) / std))

def fit_classifier(x, labels, seed, what):
    labels = np.asarray(labels, dtype=np.int64)
    apply = fit_network(x, labels, int(labels.max()) + 1, F.cross_entropy, seed,
                        CLASSIFIER_EPOCHS, what)
    return lambda features: apply(features).argmax(1).numpy()

def classifier_split(n_chars, n_frames, fraction, seed):
    """Per character, a fixed random `fraction` of its frames trains the classifiers."""
    rng = np.random.default_rng(seed)
    is_train = np.zeros((n_chars, n_frames), dtype=bool)
    for c in range(n_chars):
        is_train[c, rng.permutation(n_frames)[:max(1, int(round(fraction * n_frames)))]] = True
    return is_train.ravel()

def partition_classifiers(z, s, identity, pose, is_train, seed):
    """Table 1 of the paper plus pose: train / held-out accuracy of MLPs reading identity and
    pose from z and from s; the accuracies and the classifiers."""
    results, classifiers = {}, {}
    for part, features in (("z", z), ("s", s)):
        for task, labels in (("identity", identity), ("pose", pose)):
            name = f"{task}_from_{part}"
            classify = classifiers[name] = fit_classifier(
                features[is_train], labels[is_train], seed, f"{name} classifier")
            results[name] = {f"{k}_accuracy": float(np.mean(classify(features[at]) == labels[at]))
                             for k, at in (("train", is_train), ("test", ~is_train))}
    return results, classifiers

def chance_and_ceiling(frames, identity, pose, is_train):
    """Chance (largest class) and the identity ceiling set by pixel-identical frames of
    different characters (weapon twins): a tie of k is guessed right 1/k of the time."""
    n_chars, n_frames = frames.shape[:2]
    groups, sizes = np.zeros((2, n_chars, n_frames), dtype=np.int64)
    for f in range(n_frames):  # group: the first character with this very frame
        _, first, inverse, counts = np.unique(frames[:, f].reshape(n_chars, -1).numpy(), axis=0,
                                              return_index=True, return_inverse=True,
                                              return_counts=True)
        groups[:, f], sizes[:, f] = first[inverse.ravel()], counts[inverse.ravel()]
    held_identity, held_pose = identity[~is_train], pose[~is_train]
    pairs = {tuple(sorted((c, int(g)))) for c, row in enumerate(groups) for g in row if g != c}
    return {"identity_chance": float(np.bincount(held_identity).max() / len(held_identity)),
            "pose_chance": float(np.bincount(held_pose).max() / len(held_pose)),
            "identity_twin_ceiling": float(np.mean(1.0 / sizes.ravel()[~is_train])),
            "identity_pairs_sharing_a_frame": len(pairs)}

def recognition_rates(model, images, identity, pose, classifiers, device):
    """How often the classifiers of real frames recognise decoded images saved as uint8:
    identity from s, pose from z."""
    z, s = encode_frames(model, to_uint8(images), device)
    return {"identity": float(np.mean(classifiers["identity_from_s"](s) == identity)),
            "pose": float(np.mean(classifiers["pose_from_z"](z) == pose)), "images": len(images)}

def other_character_partners(identity, rng, rounds=1000):
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
    """Reconstruction MSE; recognition of reconstructions, swaps Dec(z of a frame, s of another
    character's) and the far ends of interpolations."""
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
    return {"reconstruction_mse": float(F.mse_loss(reconstructions, to_images(held["frames"]))),
            "recognised": {
                "reconstructions": rates(reconstructions, identity, pose),
                "swaps": rates(swaps, identity[partner], pose),
                "interpolation_ends": rates(ends, np.concatenate([identity[b], identity[a]]),
                                            np.concatenate([pose[a], pose[b]]))}}, reconstructions

def prediction_networks(model, held, encoded_train, seed, classifiers, device):
    """z -> s and s -> z MLPs on the training characters' encodings: if z held the identity,
    Dec(z, s predicted from z) would show it; if s held the pose, Dec(z predicted from s, s)."""
    z_train, s_train = encoded_train
    z_to_s = fit_network(z_train, torch.as_tensor(s_train), s_train.shape[1], F.mse_loss, seed,
                         PREDICTOR_EPOCHS, "z -> s prediction network")
    s_to_z = fit_network(s_train, torch.as_tensor(z_train), z_train.shape[1], F.mse_loss,
                         seed + 1, PREDICTOR_EPOCHS, "s -> z prediction network")
    z, s = held["z"], held["s"]
    s_predicted, z_predicted = z_to_s(z).numpy(), s_to_z(s).numpy()
    images = (decode_latents(model, z, s_predicted, device),
              decode_latents(model, z_predicted, s, device))
    rates = [recognition_rates(model, decoded, held["identity"], held["pose"], classifiers,
                               device) for decoded in images]
    return {"trained_on_frames": int(len(z_train)), "epochs": PREDICTOR_EPOCHS,
            "evaluated_on_frames": int(len(z)),
            "identity_recognised_decode_z_predicted_s": rates[0]["identity"],
            "pose_recognised_decode_predicted_z_s": rates[1]["pose"],
            "z_to_s_relative_mse": float(np.mean((s_predicted - s) ** 2)
                                         / np.mean((s - s_train.mean(0)) ** 2)),
            "s_to_z_relative_mse": float(np.mean((z_predicted - z) ** 2)
                                         / np.mean((z - z_train.mean(0)) ** 2))}, images

def encode_training_characters(model, data, args, device):
    ids = data["splits"]["train"]
    if args.predictor_characters:
        ids = ids[:args.predictor_characters]
    parts = [encode_frames(model, data["frames"][chunk].reshape(-1, 3, 60, 60), device)
             for chunk in np.array_split(ids, max(1, len(ids) // 50))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

def evaluate(model, data, split, args, device, encoded_train):
    """Every number of one split ("val" or "test"): classifiers trained on a fixed share of each
    character's frames; decoded images and prediction networks on the held-out rest."""
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
    predictions, predicted = prediction_networks(model, held, encoded_train, args.seed,
                                                 classifiers, device)
    return {"characters": int(n_chars), "classifier_train_frames": int(is_train.sum()),
            "held_out_frames": int(len(held_out)), "classifiers": accuracies, **sharp,
            "prediction_networks": predictions}, {
        "held": held, "reconstructions": reconstructions, "predicted": predicted,
        "classifiers": classifiers}

def measure(model, data, args, device, out, timings):
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

CHECKS = (  # (name, number in one split's results ("a / b": a ratio), ">=" or "<=", threshold)
    ("identity from s / twin ceiling", "classifiers.identity_from_s.test_accuracy / "
     "classifiers.identity_twin_ceiling", ">=", 0.90),
    ("identity from z", "classifiers.identity_from_z.test_accuracy", "<=", 0.15),
    ("pose from z", "classifiers.pose_from_z.test_accuracy", ">=", 0.70),
    ("pose from s", "classifiers.pose_from_s.test_accuracy", "<=", 0.30),
    ("reconstruction MSE", "reconstruction_mse", "<=", 0.0030),
    ("identity of reconstructions recognised", "recognised.reconstructions.identity", ">=", 0.90),
    ("pose of reconstructions recognised", "recognised.reconstructions.pose", ">=", 0.90),
    ("identity of swaps recognised", "recognised.swaps.identity", ">=", 0.90),
    ("pose of swaps recognised", "recognised.swaps.pose", ">=", 0.90),
    ("identity of Dec(z, s predicted from z) recognised",
     "prediction_networks.identity_recognised_decode_z_predicted_s", "<=", 0.15),
    ("pose of Dec(z predicted from s, s) recognised",
     "prediction_networks.pose_recognised_decode_predicted_z_s", "<=", 0.30))

def checks_of(results):
    """The targets of the default run, judged on each split's numbers."""
    checks = []
    for split in (split for split in ("validation", "test") if split in results):
        for name, key, op, limit in CHECKS:
            top, _, bottom = key.partition(" / ")
            value = common.lookup(results[split], top)
            value = value / common.lookup(results[split], bottom) if bottom else value
            checks.append(common.check(f"{split}: {name}", value, f"{op} {limit:g}",
                                       value >= limit if op == ">=" else value <= limit))
    return checks

# --- Figures
def grid_figure(rows, path, title, row_names, wrong=None, cell=0.8):
    """rows: lists of (3,60,60) float tensors (None = empty); wrong[i][j] frames a cell red."""
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
    """The paper's layout: cell (i, j) = Dec(z of row i, s of column j), test characters."""
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
        names.append(f"swap_grid_{g + 1}.png")
        grid_figure([[None] + list(s_images)] + [[z_images[i]] + list(cells[i])
                                                 for i in range(side)],
                    os.path.join(out, names[-1]),
                    "Style transfer, test characters: top row gives s (identity), first column "
                    "gives z (pose); cell = Dec(z of row, s of column)",
                    [""] + [ANIMATIONS[a] if len(lengths) == len(ANIMATIONS) else f"anim {a}"
                            for a in animations])
    return names

@torch.no_grad()
def draw_interpolations(model, frames, args, out, device, pairs=3):
    rng = np.random.default_rng(args.seed + 4)
    chars = rng.choice(len(frames), (pairs, 2), replace=len(frames) < 2 * pairs)
    picked = rng.integers(frames.shape[1], size=(pairs, 2))
    images_a, images_b = (frames[chars[:, k], picked[:, k]] for k in (0, 1))
    (z_a, s_a), (z_b, s_b) = (encode_frames(model, x, device) for x in (images_a, images_b))
    vary_s, vary_z = interpolation_rows(model, z_a, s_a, z_b, s_b, INTERPOLATION_STEPS, device)
    images_a, images_b = to_images(images_a), to_images(images_b)
    rows = [[images_a[p]] + list(vary[p]) + [images_b[p]] for p in range(pairs)
            for vary in (vary_s, vary_z)]
    grid_figure(rows, os.path.join(out, "interpolation.png"),
                "Interpolation between test images a (left) and b (right): specified s with z "
                "of a fixed, unspecified z with s of a fixed",
                [f"pair {p + 1}: {v} a->b" for p in range(pairs) for v in "sz"])

def draw_evaluation_figures(model, data, drawn, args, out, device):
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
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, title in zip(axes, ("reconstruction", "kl", "reverse_cycle", "val_objective"),
                              ("forward cycle: swap reconstruction MSE (x1 + x2)",
                               "KL(q(z|x)||N(0,I)) / (B*C*H*W), x1 + x2",
                               "reverse cycle: L1 of re-encoded z means",
                               "validation characters: forward-cycle objective")):
        validation = key.startswith("val")
        ax.plot(history["val_step" if validation else "step"], history[key],
                marker="o" if validation else None)
        ax.set_title(title, fontsize=8)
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
Machine: {machine[description]}; arithmetic: {settings[precision]} (bf16: autocast of \
convolutions and matrix products, the rest float32; fp32: float32 throughout)

s = character identity (specified), z = the rest, mostly the pose (unspecified). \
{data[characters][train]} characters train the model; the weights kept have the best \
forward-cycle objective on fixed frame pairs of the {data[characters][val]} **validation \
characters**; the test numbers and every picture come from the {data[characters][test]} **test \
characters** (Reed et al.'s split). Runs that also scored the test characters: {tested_runs}.

| setting | this run | paper / authors' code |
|---|---|---|
| z / s size | {settings[z_dim]} / {settings[s_dim]} | 512 / 64 and 1024 / 512 |
| channels of the first conv (x2 per layer) | {settings[width]} | not published for Sprites |
| batch (pairs) | {settings[batch_size]} | 64 |
| training | {training[epochs]:g} epochs = {training[steps]} steps | 100 epochs |
| Adam lr; epoch of its /10 drop (0 = none) | {settings[lr]:g}; {settings[lr_drop_epoch]:g} \
| 1e-4; 80 |
| loss weights reconstruction / reverse / KL | {settings[reconstruction_coef]:g} / 10 / \
{settings[kl_coef]:g} | 2 / 10 / 3 |

## Training

![training curves](training_curves.png)

Best validation objective at step {training[best_val_step]}; {training[steps_per_s]:.2f} \
steps/s over the {training[steps_timed]} steps this command ran.

## Decoded images, recognised

![reconstructions](reconstructions.png)

Decoded images, saved as uint8 and re-encoded, judged by the partition classifiers (trained on \
real frames): identity from s, pose from z. Swap: Dec(z of a frame, s of another character's \
frame); interpolation end points: the far ends of the rows from a to b. Real held-out test \
frames, for comparison: identity from s \
{results[test][classifiers][identity_from_s][test_accuracy]:.1%}, pose from z \
{results[test][classifiers][pose_from_z][test_accuracy]:.1%}.

| characters | reconstruction MSE | reconstructions: identity / pose recognised | swaps | \
interpolation end points |
|---|---|---|---|---|
{recognition_rows}

## Swap grids and interpolation

Cell (i, j) = Dec(z of row i, s of column j): the top row gives s, the first column z (with its \
animation). Interpolation: odd rows vary s from a to b (z of a), even rows z (s of a).

{swap_grid_images}
![interpolation](interpolation.png)

## Classifiers on each partition (Table 1 layout, test characters)

| model | z train | z test | s train | s test |
|---|---|---|---|---|
| Jha et al. 2018, Table 1: Cycle-VAE 512/64 | 11.55 % | 11.47 % | 98.53 % | 97.16 % |
| Jha et al. 2018, Table 1: Cycle-VAE 1024/512 | 11.27 % | 11.61 % | 98.13 % | 97.22 % |
| Jha et al. 2018, Table 1: Mathieu et al. 512/64 | 12.05 % | 11.98 % | 99.18 % | 96.75 % |
{partition_rows}

An MLP 256-256 (ReLU, Adam 1e-3, 30 epochs) on standardized z means or s, trained on a fixed \
random 0.8 of each test character's frames, tested on the other \
{results[test][held_out_frames]} (the paper publishes no protocol: its rows are quoted, not \
matched). Identity: {results[test][characters]} characters, chance \
{results[test][classifiers][identity_chance]:.1%}, capped at \
{results[test][classifiers][identity_twin_ceiling]:.1%} by pixel-identical frames of weapon twins \
({results[test][classifiers][identity_pairs_sharing_a_frame]} pairs); pose: 21 animations, \
chance {results[test][classifiers][pose_chance]:.1%}.

## Prediction networks z -> s and s -> z

![prediction networks](prediction_networks.png)

MLPs 256-256 (MSE, 5 epochs) trained on the encodings of \
{results[test][prediction_networks][trained_on_frames]} frames of training characters, applied \
to the {results[test][prediction_networks][evaluated_on_frames]} held-out test frames, decoded \
and classified as above (red: wrong). Right character in Dec(z, s predicted from z): \
{results[test][prediction_networks][identity_recognised_decode_z_predicted_s]:.1%}; right pose \
in Dec(z predicted from s, s): \
{results[test][prediction_networks][pose_recognised_decode_predicted_z_s]:.1%}. Relative MSE \
(1 = no better than the mean): z -> s \
{results[test][prediction_networks][z_to_s_relative_mse]:.3f}, s -> z \
{results[test][prediction_networks][s_to_z_relative_mse]:.3f}.

## Checks (the targets of the default run)

{checks}

## Runs with other settings

Commands as the runs' settings imply; numbers on the validation characters; "test scored": \
the test characters a run also evaluated.

{runs}

## Choices where the paper is silent

- Architecture: 4 strided convs ({settings[width]} channels, doubling; kernels 4/4/3/4; batch \
norm; LeakyReLU 0.2) to 4x4, linear heads for the z mean, z log-variance (bias -5) and s; the \
decoder mirrors it (transposed convs, ReLU, sigmoid).
- Losses as in the authors' MNIST code: MSE of both swapped reconstructions, KL summed / \
B*C*H*W, L1 of the re-encoded z means; the reverse cycle takes s without gradient and has its \
own Adam over the encoder, so its weight only turns it on.
- Warm-up: KL weight and reverse-cycle step 0 for the first half of \
{settings[warmup_epochs]:g} epochs, then rising linearly to full.
- Pairs: two random frames of a random training character; the reverse cycle takes two \
batches of arbitrary training frames.
- Model selection: the forward-cycle objective (z = mean) on 1024 fixed validation pairs every \
0.5 epochs; the best weights are kept, their batch-norm statistics recomputed over 50 batches \
of 128 training pairs.
- Pose = the 21 animations (action x direction), not the frame index.
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
    r, runs = metrics["results"], os.path.join(out, "runs")
    tested = [n for n in (sorted(os.listdir(runs)) if os.path.isdir(runs) else [])
              if "test" in common.read_metrics(os.path.join(runs, n, "metrics.json"),
                                               SCRIPT)["results"]]
    rates = lambda n: " | ".join(f"{n['recognised'][k]['identity']:.1%} / "  # noqa: E731
                                 f"{n['recognised'][k]['pose']:.1%}"
                                 for k in ("reconstructions", "swaps", "interpolation_ends"))
    c = r["test"]["classifiers"]
    return common.fill(
        REPORT, metrics, tested_runs=", ".join(f"`{n}`" for n in tested) or "none",
        command=common.shown_command(metrics["command"]),
        recognition_rows="\n".join(
            f"| {split} ({r[split]['held_out_frames']} held-out frames) | "
            f"{r[split]['reconstruction_mse']:.4f} | {rates(r[split])} |"
            for split in ("test", "validation")),
        partition_rows="\n".join(
            f"| this run, {task} | " + " | ".join(f"{c[f'{task}_from_{p}'][f'{w}_accuracy']:.1%}"
                                                for p in "zs" for w in ("train", "test")) + " |"
            for task in ("identity", "pose")),
        swap_grid_images="\n".join(f"![swap grid]({n})" for n in metrics["swap_grids"]),
        checks=common.checks_table(metrics["checks"]),
        runs=common.runs_table(out, SCRIPT, RUN_COLUMNS) or "No runs are stored beside this one.")

# --- Main
# --eval-only: what refits an MLP on the latents follows the CPU's arithmetic; the rest is exact
REFIT = ("an MLP (probe classifier or prediction network) refit on the latents; on an AMD EPYC "
         "it differed from the committed run's Intel Xeon by up to 0.0046")
TOLERANCES = {prefix: (0.01, REFIT) for split in ("validation", "test") for prefix in [
    f"results.{split}.{key}" for key in ("classifiers.identity_from_", "classifiers.pose_from_",
                                         "recognised.", "prediction_networks.")] + [
    f"checks.{split}: {name}" for name, key, _, _ in CHECKS if key != "reconstruction_mse"]}

def load_data(args, timings):
    with stage(timings, "data"):
        data = load_sprites(args.data_dir, download=not args.no_download)
        # Kept in memory as uint8 (characters, frames, 3, 60, 60); converted per batch.
        data["frames"] = torch.from_numpy(data.pop("sprites")).permute(0, 1, 4, 2, 3).contiguous()
        data["fingerprint"] = common.fingerprint(data["frames"], *data["splits"].values())
    return data

def measure_and_record(model, data, args, device, out, timings, training):
    results, grids = measure(model, data, args, device, out, timings)
    where = lambda path: path and "DATA_DIR/" + os.path.relpath(path, args.data_dir)  # noqa
    data_record = {"cache": where(data["cache"]), "split_file": where(data["split_file"]),
                   "characters": {k: int(len(v)) for k, v in data["splits"].items()},
                   "frames_per_character": int(data["frames"].shape[1]),
                   "fingerprint": data["fingerprint"]}
    metrics = common.record(SCRIPT, args, device, data_record, timings, checks_of(results),
                            results, training=training, swap_grids=grids)
    write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics

def eval_only(args, device):
    """Every number and figure again from the saved weights into OUT/eval/, compared."""
    weights = os.path.join(args.out, "cyclevae.pt")
    state = load_checkpoint(weights, KIND)
    model = load_model(weights, device)
    for key, value in state.get("settings", {}).items():  # evaluate as the run did
        if key not in args.given and hasattr(args, key):
            setattr(args, key, value)
    committed = common.read_metrics(os.path.join(args.out, "metrics.json"), SCRIPT)
    eval_dir = common.prepare_out(os.path.join(args.out, "eval"))
    timings = {}
    metrics = measure_and_record(model, load_data(args, timings), args, device, eval_dir,
                                 timings, state.get("training"))
    common.compare_with_committed(metrics, committed, eval_dir, TOLERANCES)
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
    resumed = (common.load_training_state(os.path.join(args.out, "training_state.pt"), args,
                                          data["fingerprint"]) if args.resume else None)
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
    metrics = measure_and_record(model, data, args, device, args.out, timings, summary)
    if not args.validation_only:  # a settings run is a row of its parent's runs table
        common.write_text(os.path.join(args.out, "report.md"), render_report(metrics, args.out))
    print(f"wrote {args.out}/metrics.json" + ("" if args.validation_only else " and report.md"))

# Data: Reed et al.'s 2D Sprites as their archive unpacks (data/sprites/*.mat, converted once
# into a uint8 cache), or that cache with original/sprites_splits.mat, in DATA_DIR.
ARCHIVE = "nips2015-analogy-data.tar.gz"
SPRITES_SOURCES = (f"http://www-personal.umich.edu/~reedscot/files/{ARCHIVE}",
                   f"http://www.scottreed.info/files/{ARCHIVE}")  # tried in this order
ARCHIVE_MD5 = "4e866a7919c1beedf53964e6f7a23686"  # as recorded by nmichlo/disent
CACHE_NAME, SPLIT_NAME = "sprites_reed2015_uint8.npz", "sprites_splits.mat"
CACHE_KEYS = ("sprites", "anim_lengths", "anim_offsets")
FOLDERS = (os.path.join("data", "sprites"), "original")  # where the .mat files may be

def to_images(frames):
    return frames.float().div_(255)

def to_uint8(images):
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)

def read_splits(path):
    """Reed's split: 1-based ids in trainidx / validx / testidx -> 0-based arrays, checked."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        splits = {k: np.asarray(mat[f"{k}idx"], dtype=np.int64).ravel() - 1
                  for k in ("train", "val", "test")}
    except Exception:
        raise UserError(f"split file {path} is not the expected MATLAB file with trainidx, "
                        f"validx and testidx") from None
    every = np.concatenate(list(splits.values()))
    if min(map(len, splits.values())) == 0 or every.min() < 0:
        raise UserError(f"split file {path} has empty splits or ids below 1 (they are 1-based)")
    if len(np.unique(every)) != len(every):
        raise UserError(f"split file {path} names a character in two splits (or twice)")
    if min(len(splits["val"]), len(splits["test"])) < 2:
        raise UserError(f"split file {path} names fewer than two validation or test "
                        f"characters; the swaps need two")
    return splits

def read_character_mat(path):
    """One character's MATLAB v7.3 (HDF5) file, a cell array `sprites` of float64 (frames,
    10800) in [0,1] per animation -> uint8 frames (n,60,60,3) and the animation lengths."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            cells = [np.asarray(f[r], dtype=np.float64) for r in np.asarray(f["sprites"]).ravel()]
    except Exception as error:
        raise UserError(f"{path} is not a readable MATLAB v7.3 sprite file with a sprites cell "
                        f"array ({type(error).__name__})") from None
    if any(a.ndim != 2 or a.shape[1] != 10800 for a in cells):
        raise UserError(f"{path} does not have the expected layout (cells of frames x 10800)")
    # MATLAB stores each 60x60x3 frame column-major: h5py sees (channel, column, row).
    frames = np.rint(255 * np.concatenate(cells)).reshape(-1, 3, 60, 60)
    return (frames.transpose(0, 3, 2, 1).astype(np.uint8),
            np.array([a.shape[0] for a in cells], dtype=np.int16))

def convert_originals(folder, n_characters):
    paths = [os.path.join(folder or "", f"sprites_{i}.mat") for i in range(n_characters)]
    missing = [i for i, path in enumerate(paths) if folder is None or not os.path.isfile(path)]
    if missing:
        raise UserError(f"{len(missing)} of the {n_characters} character files are missing in "
                        f"{folder or 'the data folder'}/ (sprites_{missing[0]}.mat first); put "
                        f"sprites_0.mat ... sprites_{n_characters - 1}.mat there")
    print(f"converting {n_characters} .mat files in {folder} into a uint8 cache ...", flush=True)
    parts = [read_character_mat(path) for path in paths]
    lengths = parts[0][1]
    for path, (_, other) in zip(paths, parts):
        if not np.array_equal(other, lengths):
            raise UserError(f"{path} has animations of {other.tolist()} frames, the other "
                            f"characters {lengths.tolist()}")
    return {"sprites": np.stack([p[0] for p in parts]), "anim_lengths": lengths,
            "anim_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int16)}

def load_cache(path, split_path, n_characters):
    try:
        with np.load(path) as npz:
            data = {k: npz[k] for k in CACHE_KEYS}
        sprites, lengths = data["sprites"], data["anim_lengths"]
        sound = (sprites.dtype == np.uint8 and sprites.shape[2:] == (60, 60, 3)
                 and int(np.sum(lengths)) == sprites.shape[1]
                 and data["anim_offsets"].tolist() == [0] + np.cumsum(lengths).tolist())
    except Exception:
        sound = False
    if not sound:
        raise UserError(f"cache {path} is truncated or not uint8 sprites (characters, frames, "
                        f"60, 60, 3) with their animation lengths; delete it to rebuild it")
    if len(sprites) < n_characters:
        raise UserError(f"split file {split_path} names character {n_characters} (1-based), "
                        f"but {path} has {len(sprites)}: the split file does not belong to "
                        f"these data")
    return data

def download_sprites(root):
    archive = common.download_first(SPRITES_SOURCES, root, ARCHIVE, md5=ARCHIVE_MD5,
                                    offline_hint=offline_hint(root))
    staging = os.path.join(root, ".nips2015-extract.tmp")  # the folder appears whole or not
    shutil.rmtree(staging, ignore_errors=True)
    common.extract(archive, staging)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    os.replace(os.path.join(staging, "data", "sprites"), os.path.join(root, "data", "sprites"))
    shutil.rmtree(staging, ignore_errors=True)

def offline_hint(root):
    return (f"put Reed et al.'s data/sprites/ folder (from {ARCHIVE}: sprites_0.mat ... "
            f"sprites_671.mat and {SPLIT_NAME}) into {root}/, or the archive itself")

def load_sprites(data_dir, download=True):
    """uint8 arrays plus Reed's split (0-based ids): the cache if there is one, else the .mat
    files (converted once into the cache), else the downloaded archive."""
    root = os.path.abspath(data_dir)
    locate = lambda name: next((os.path.join(root, d) for d in FOLDERS  # noqa: E731
                                if os.path.isfile(os.path.join(root, d, name))), None)
    if not (locate(SPLIT_NAME) or locate("sprites_0.mat")) and download:
        download_sprites(root)
    if locate(SPLIT_NAME) is None:
        raise UserError(f"{SPLIT_NAME} is missing: {offline_hint(root)} (a {CACHE_NAME} cache "
                        f"may replace the .mat files, not the split file)")
    split_path = os.path.join(locate(SPLIT_NAME), SPLIT_NAME)
    splits = read_splits(split_path)
    n_characters = int(max(ids.max() for ids in splits.values())) + 1
    cache = os.path.join(root, CACHE_NAME)
    if os.path.isfile(cache):
        data = load_cache(cache, split_path, n_characters)
    else:
        data = convert_originals(locate("sprites_0.mat"), n_characters)
        try:
            common.atomic_write(cache, lambda tmp: np.savez_compressed(open(tmp, "wb"), **data))
        except PermissionError:
            raise UserError(f"the cache {cache} cannot be written; make {root} writable, or "
                            f"convert the data once where it is") from None
        print(f"cache written to {cache}", flush=True)
    data.update(splits=splits, cache=cache, split_file=split_path)
    return data

if __name__ == "__main__":
    common.run_cli(main)
