"""Question 1: a variational auto-encoder on MNIST (Kingma & Welling 2014), with the KL weight
beta of the beta-VAE (Higgins et al. 2017) as --beta.

    python q1_vae.py --data-dir DIR                  # 30 epochs, latent 16: every figure and number
    python q1_vae.py --data-dir DIR --beta 4 --out outputs/q1/beta4    # a beta-VAE
    python q1_vae.py --data-dir DIR --eval-only      # recompute from outputs/q1/vae.pt into outputs/q1/eval/
    python q1_vae.py --data-dir DIR --resume         # continue an interrupted run
    python q1_vae.py --report-only                   # re-render outputs/q1/report.md from metrics.json
    python q1_vae.py --data-dir DIR --download-only  # fetch MNIST and stop

Writes under --out (default outputs/q1): vae.pt (weights), training_state.pt (for --resume),
samples.png, reconstruction_progress.png, training_curves.png, latent_traversal.png,
tsne_latent.png, svm_confusion_matrix.png, metrics.json and report.md.
"""
import argparse
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import plt

CHECKPOINT_KIND = "q1_vae"
N_PROGRESS_DIGITS = 10       # the first test digits, shown in the reconstruction-progress figure
TRAVERSAL_DIGIT = 0          # the test digit whose posterior mean the traversal starts from
TRAVERSAL_VALUES = np.linspace(-3, 3, 13)
ACTIVE_KL = 0.01             # nats: a latent unit whose mean KL on the test set exceeds it is active
ELBO_TARGET, SVM_TARGET = 100.0, 0.98


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--latent", type=common.positive_int, default=16,
                        help="size of the latent code z")
    parser.add_argument("--hidden", type=common.positive_int, default=1024,
                        help="width of the decoder's last hidden layer (the others are half)")
    parser.add_argument("--epochs", type=common.positive_int, default=30)
    parser.add_argument("--beta", type=common.nonnegative_float, default=1.0,
                        help="weight of the KL term (1 = plain VAE, >1 = beta-VAE)")
    parser.add_argument("--kl-warmup", type=common.nonnegative_float, default=10.0,
                        help="epochs over which the KL weight rises linearly from 0 to --beta "
                             "(0 = off)")
    parser.add_argument("--batch-size", type=common.positive_int, default=128)
    parser.add_argument("--lr", type=common.positive_float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--svm-train-size", type=common.positive_int, default=60000,
                        help="training images the SVM is fitted on (a fixed random subset if "
                             "fewer than the training set)")
    parser.add_argument("--svm-c", type=common.positive_float, default=10.0,
                        help="C of the RBF-kernel SVM")
    parser.add_argument("--tsne-points", type=common.positive_int, default=common.TSNE_POINTS,
                        help="test images in the t-SNE (a fixed random subset)")
    parser.add_argument("--weights", default=None,
                        help="weights for --eval-only (default <out>/vae.pt)")
    parser.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    parser.add_argument("--download-only", action="store_true",
                        help="fetch MNIST into --data-dir and stop")
    common.add_common_args(parser, "outputs/q1")
    return parser


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    modes = [flag for flag in ("resume", "eval_only", "report_only", "download_only")
             if getattr(args, flag)]
    if len(modes) > 1:
        parser.error(" and ".join("--" + m.replace("_", "-") for m in modes)
                     + " exclude each other")
    return args


def settings_of(args):
    """The settings stored with a run (and checked by --resume)."""
    return common.training_settings(args, exclude=("no_download", "download_only"))


# ---------------------------------------------------------------------------------------
# The model: a convolutional encoder q(z|x) = N(mu, diag(exp(logvar))) and an MLP decoder
# p(x|z) with Bernoulli outputs, trained on the negative evidence lower bound (ELBO).
# ---------------------------------------------------------------------------------------
class VAE(nn.Module):
    def __init__(self, latent_dim=16, hidden=1024):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),   # 16 x 14 x 14
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),  # 32 x 7 x 7
            nn.Flatten(), nn.Linear(32 * 7 * 7, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, 2 * latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, hidden), nn.ReLU(), nn.Linear(hidden, 784))

    def encode(self, x):
        """x (N,1,28,28) in [0,1] -> posterior mean and log-variance, each (N, latent_dim)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z):
        return self.decoder(z).view(-1, 1, 28, 28)

    def decode(self, z):
        """z (N, latent_dim) -> Bernoulli means (N,1,28,28) in [0,1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x, noise):
        mu, logvar = self.encode(x)
        z = mu + noise * torch.exp(0.5 * logvar)  # the reparameterisation trick
        return self.decode_logits(z), mu, logvar


def negative_elbo(logits, x, mu, logvar, beta):
    """Summed over the batch: the reconstruction term -log p(x|z) (grey levels as Bernoulli
    targets), KL(q(z|x) || N(0, I)) in closed form, and the loss recon + beta * KL."""
    reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return reconstruction + beta * kl, reconstruction, kl


def train_step(model, optimizer, x, beta_weight, generator=None):
    """One stochastic gradient step on the batch x: draw z by the reparameterisation trick and
    descend on the per-image negative ELBO with the KL weighted by beta_weight. Returns the
    batch's summed loss, reconstruction and KL terms (floats)."""
    noise = torch.randn(len(x), model.latent_dim, generator=generator).to(x.device)
    logits, mu, logvar = model(x, noise)
    loss, reconstruction, kl = negative_elbo(logits, x, mu, logvar, beta_weight)
    common.check_finite(loss, "training loss")
    optimizer.zero_grad(set_to_none=True)
    (loss / len(x)).backward()
    optimizer.step()
    return loss.item(), reconstruction.item(), kl.item()


def kl_weight(settings, epoch, fraction):
    """beta, ramped up linearly over the first `kl_warmup` epochs (fraction: how far into the
    epoch): with the full KL from the first step some latent units collapse to the prior
    before the decoder learns to use them."""
    progress = (epoch - 1 + fraction) / settings.kl_warmup if settings.kl_warmup else 1.0
    return settings.beta * min(1.0, progress)


def learning_rate(settings, epoch):
    """Adam's rate, divided by 10 for the last sixth of the epochs."""
    late = epoch > settings.epochs - settings.epochs // 6
    return settings.lr * (0.1 if late else 1.0)


def epoch_generator(seed, epoch):
    """The shuffling and the noise of one epoch: a resumed run repeats them exactly."""
    return torch.Generator().manual_seed(seed * 100003 + epoch)


# ---------------------------------------------------------------------------------------
# Measurements on a model
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, images, beta, batch_size=1000, seed=12345):
    """Per-image means of the loss (recon + beta KL), the reconstruction term, the KL and the
    negative ELBO (recon + KL), with one posterior sample per image and fixed noise."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = np.zeros(2)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        noise = torch.randn(len(x), model.latent_dim, generator=generator).to(x.device)
        logits, mu, logvar = model(x, noise)
        _, reconstruction, kl = negative_elbo(logits, x, mu, logvar, beta)
        sums += [reconstruction.item(), kl.item()]
    reconstruction, kl = (sums / len(images)).tolist()
    common.check_finite(reconstruction + kl, "test negative ELBO")
    return {"loss": reconstruction + beta * kl, "reconstruction": reconstruction, "kl": kl,
            "negative_elbo": reconstruction + kl}


@torch.no_grad()
def kl_per_unit(model, images, batch_size=2000):
    """Mean over the images of each latent unit's KL(q(z_j|x) || N(0, 1)), in nats."""
    model.eval()
    total = torch.zeros(model.latent_dim)
    for start in range(0, len(images), batch_size):
        mu, logvar = model.encode(images[start:start + batch_size])
        total += (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).sum(0).cpu()
    return (total / len(images)).numpy()


@torch.no_grad()
def latent_means(model, images, batch_size=2000):
    model.eval()
    return torch.cat([model.encode(images[i:i + batch_size])[0]
                      for i in range(0, len(images), batch_size)]).cpu().numpy()


@torch.no_grad()
def snapshot(model, digits, label):
    """The reconstructions decode(mu(x)) of `digits` and their mean -log p(x|mu(x))."""
    model.eval()
    logits = model.decode_logits(model.encode(digits)[0])
    nats = F.binary_cross_entropy_with_logits(logits, digits, reduction="sum").item()
    return {"label": label, "images": torch.sigmoid(logits).cpu(),
            "reconstruction": nats / len(digits)}


def svm_on_latents(train_features, train_labels, test_features, test_labels, settings):
    """Standardise the posterior means, fit an RBF SVM on (a subset of) the training set,
    score it on the whole test set."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    index = common.subsample(len(train_features), settings.svm_train_size, settings.seed)
    svm = make_pipeline(StandardScaler(), SVC(kernel="rbf", C=settings.svm_c, gamma="scale"))
    svm.fit(train_features[index], train_labels[index])
    train_accuracy = float(np.mean(svm.predict(train_features[index]) == train_labels[index]))
    metrics = common.classification_metrics(test_labels, svm.predict(test_features),
                                            class_names=[str(d) for d in range(10)])
    return {"kernel": "rbf", "C": settings.svm_c, "gamma": "scale", "standardised": True,
            "fitted_on": int(len(index)), "train_accuracy": train_accuracy, "test": metrics}


def silhouette(features, labels):
    """Silhouette score of the digit labels on the standardised latent means (-1..1)."""
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    return float(silhouette_score(StandardScaler().fit_transform(features), labels))


def measure(model, data, settings, out, timings):
    """Everything measured on a trained model, its figures written into `out`."""
    with common.stage(timings, "test ELBO and KL per unit"):
        test = evaluate(model, data.test, settings.beta)
        unit_kl = kl_per_unit(model, data.test)
    with common.stage(timings, "samples and latent traversal"):
        plot_samples(model, os.path.join(out, "samples.png"), settings.seed)
        plot_latent_traversal(model, data.test[TRAVERSAL_DIGIT:TRAVERSAL_DIGIT + 1], unit_kl,
                              os.path.join(out, "latent_traversal.png"), settings.beta)
    with common.stage(timings, "latent means"):
        train_features = latent_means(model, data.train)
        test_features = latent_means(model, data.test)
    with common.stage(timings, "SVM"):
        svm = svm_on_latents(train_features, data.train_labels, test_features, data.test_labels,
                             settings)
        common.plot_confusion_matrix(svm["test"], os.path.join(out, "svm_confusion_matrix.png"),
                                     "SVM on VAE latent means, MNIST test")
    with common.stage(timings, "t-SNE and silhouette"):
        _, tsne_index = common.plot_tsne(test_features, data.test_labels,
                                         os.path.join(out, "tsne_latent.png"),
                                         names=[str(d) for d in range(10)],
                                         title="t-SNE of VAE latent means (MNIST test)",
                                         n_points=settings.tsne_points, seed=settings.seed)
        score = silhouette(test_features, data.test_labels)
    return {"test": test, "kl_per_unit": unit_kl.tolist(),
            "active_units": int(np.sum(unit_kl > ACTIVE_KL)), "svm": svm,
            "silhouette": score, "tsne_points": int(len(tsne_index))}


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def plot_samples(model, path, seed):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(100, model.latent_dim, generator=generator)
    images = model.eval().decode(z.to(next(model.parameters()).device)).cpu()
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(common.image_grid(images, nrow=10), cmap="gray")
    ax.set_title(f"100 samples: decode(z), z ~ N(0, I), latent {model.latent_dim}")
    ax.axis("off")
    common.save_figure(fig, path)


@torch.no_grad()
def plot_latent_traversal(model, digit, unit_kl, path, beta):
    """One row a latent unit, most KL first: the posterior mean of `digit` decoded with that
    unit set to each of TRAVERSAL_VALUES, the other units left at the mean."""
    model.eval()
    mu = model.encode(digit)[0][0]
    order = np.argsort(-unit_kl, kind="stable")
    rows = []
    for unit in order:
        z = mu.repeat(len(TRAVERSAL_VALUES), 1)
        z[:, unit] = torch.as_tensor(TRAVERSAL_VALUES, dtype=z.dtype)
        rows.append(model.decode(z).cpu())
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(order) + 1.2))
    ax.imshow(common.image_grid(torch.cat(rows), nrow=len(TRAVERSAL_VALUES)), cmap="gray")
    centres = 2 + 14 + 30 * np.arange(max(len(order), len(TRAVERSAL_VALUES)))
    ax.set_yticks(centres[:len(order)],
                  [f"z{u}  KL {unit_kl[u]:.2f}" + ("" if unit_kl[u] > ACTIVE_KL else " (inactive)")
                   for u in order], fontsize=7)
    ax.set_xticks(centres[:len(TRAVERSAL_VALUES)], [f"{v:g}" for v in TRAVERSAL_VALUES],
                  fontsize=7)
    ax.tick_params(length=0)
    ax.set_xlabel("value of the swept unit (the others at the posterior mean)")
    ax.set_title(f"Latent traversal, beta = {beta:g}: test image {TRAVERSAL_DIGIT}, "
                 f"units by mean KL (nats)", fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    common.save_figure(fig, path)


def plot_reconstruction_progress(originals, snapshots, path):
    """Rows: the originals, then the reconstructions of each snapshot."""
    rows = [("Original test digits", originals)] + [
        (f"{s['label']}: -log p(x|z) {s['reconstruction']:.1f} nats a digit", s["images"])
        for s in snapshots]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.15 * len(rows) + 0.3))
    for ax, (label, images) in zip(axes, rows):
        ax.imshow(common.image_grid(images.view(-1, 1, 28, 28), nrow=len(images)), cmap="gray")
        ax.set_title(label, fontsize=10, loc="left")
        ax.axis("off")
    common.save_figure(fig, path)


def plot_training_curves(history, test, path, kl_warmup):
    """Per epoch, the training batches' means (the model changes during the epoch); the test
    set once, after training."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [("negative_elbo", "negative ELBO (recon + KL)"),
              ("reconstruction", "reconstruction -log p(x|z)"), ("kl", "KL(q(z|x) || p(z))")]
    for ax, (key, title) in zip(axes, panels):
        if kl_warmup:
            ax.axvspan(0.5, min(kl_warmup, epochs[-1]) + 0.5, color="0.9", label="KL warm-up")
        ax.plot(epochs, [h["train"][key] for h in history], "o-", ms=3, label="training batches")
        ax.plot(epochs[-1:], [test[key]], "r*", ms=10, label="test, after training")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
    axes[0].plot(epochs, [h["train"]["loss"] for h in history], "--", color="0.4",
                 label="training loss (recon + weighted KL)")
    axes[0].legend(loc="upper right", fontsize=8)
    common.save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# Data, the saved weights, --eval-only
# ---------------------------------------------------------------------------------------
def load_data(args, device):
    """MNIST as float images in [0,1] on `device` and numpy labels (validated by common)."""
    (train_u8, train_labels), (test_u8, test_labels) = common.load_mnist(
        args.data_dir, download=not args.no_download)
    return SimpleNamespace(train=(train_u8.float() / 255).unsqueeze(1).to(device),
                           test=(test_u8.float() / 255).unsqueeze(1).to(device),
                           train_labels=train_labels.numpy(), test_labels=test_labels.numpy())


def load_model(path, device="cpu"):
    """The VAE saved at `path`, rebuilt from its own settings, in eval mode."""
    return model_from_checkpoint(common.load_checkpoint(path, CHECKPOINT_KIND), path, device)


def model_from_checkpoint(state, path, device):
    try:
        model = VAE(state["hparams"]["latent"], state["hparams"]["hidden"]).to(device)
    except (KeyError, TypeError, ValueError):
        raise common.UserError(f"weights file {path} does not fit this architecture "
                               f"(its settings are incomplete)") from None
    return common.load_weights(model, state, path).eval()


def comparable(metrics):
    """The numbers --eval-only recomputes, in the layout of metrics.json."""
    svm = metrics.get("svm", {})
    return {"test": metrics.get("test", {}), "active_units": metrics.get("active_units"),
            "silhouette": metrics.get("silhouette"),
            "svm": {"train_accuracy": svm.get("train_accuracy"),
                    "test": {"accuracy": svm.get("test", {}).get("accuracy"),
                             "macro_f1": svm.get("test", {}).get("macro_f1")}}}


def eval_only(args, parser, argv, device):
    """Recompute every number and figure from saved weights into <out>/eval/ and compare them
    with the metrics.json beside the weights. The evaluation settings (SVM, t-SNE, seed) are
    the run's own unless given on the command line."""
    weights = args.weights or os.path.join(args.out, "vae.pt")
    checkpoint = common.load_checkpoint(weights, CHECKPOINT_KIND)
    model, saved = model_from_checkpoint(checkpoint, weights, device), checkpoint["hparams"]
    given = common.given_flags(parser, argv)
    settings = SimpleNamespace(**{**vars(args), **{k: v for k, v in saved.items()
                                                   if k not in given}})
    eval_dir = common.prepare_out(os.path.join(args.out, "eval"))
    timings = {}
    with common.stage(timings, "load MNIST"):
        data = load_data(args, device)
    results = measure(model, data, settings, eval_dir, timings)
    metrics = {"question": "Q1 VAE on MNIST, --eval-only", "command": common.command_line(),
               "weights": weights, "settings": settings_of(settings), **results,
               "timings": timings}
    common.write_json(os.path.join(eval_dir, "metrics.json"), metrics)
    committed = os.path.join(os.path.dirname(os.path.abspath(weights)), "metrics.json")
    if os.path.isfile(committed):
        print(f"recomputed from {weights} (saved values from {committed}):")
        common.compare_with_committed(comparable(metrics),
                                      comparable(common.read_json(committed, "metrics file")),
                                      eval_dir)
    else:
        print(f"no metrics.json beside {weights}: nothing to compare with")
    print(f"figures and numbers in {eval_dir}")
    return metrics


# ---------------------------------------------------------------------------------------
# Main: data, model, the training loop, the measurements, metrics.json and report.md
# ---------------------------------------------------------------------------------------
def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.download_only:
        common.load_mnist(args.data_dir, download=True)
        print(f"MNIST is in {os.path.join(args.data_dir, 'MNIST', 'raw')}")
        return None
    common.prepare_out(args.out)
    if args.report_only:
        return common.report_only(args.out, render_saved_report)
    started, timings = time.perf_counter(), {}
    device = common.choose_device(args.device)
    if args.eval_only:
        return eval_only(args, parser, argv, device)
    state_path = os.path.join(args.out, "training_state.pt")
    state = common.load_training_state(state_path, args, parser, argv) if args.resume else None
    with common.stage(timings, "load MNIST"):
        data = load_data(args, device)
    if state is None:
        common.seed_everything(args.seed)
    model = VAE(args.latent, args.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    digits = data.test[:N_PROGRESS_DIGITS]
    history, progress = [], [snapshot(model, digits, "before training")]
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, progress = state["history"], state["progress"]

    n_train = len(data.train)
    with common.stage(timings, "training"):
        for epoch in range(len(history) + 1, args.epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, epoch)
            generator = epoch_generator(args.seed, epoch)
            order = torch.randperm(n_train, generator=generator)
            model.train()
            sums, epoch_start = np.zeros(3), time.perf_counter()
            for start in range(0, n_train, args.batch_size):
                x = data.train[order[start:start + args.batch_size]]
                beta_weight = kl_weight(args, epoch, start / n_train)
                sums += train_step(model, optimizer, x, beta_weight, generator)
            seconds = time.perf_counter() - epoch_start
            loss, reconstruction, kl = (sums / n_train).tolist()
            history.append({"epoch": epoch, "train": {
                "loss": loss, "reconstruction": reconstruction, "kl": kl,
                "negative_elbo": reconstruction + kl}, "train_seconds": round(seconds, 2),
                "images_per_second": round(n_train / seconds)})
            if epoch == 1:
                progress.append(snapshot(model, digits, "after epoch 1"))
            common.save_training_state(state_path, settings_of(args), model=model.state_dict(),
                                       optimizer=optimizer.state_dict(), history=history,
                                       progress=progress)
            common.note_saved(f"epoch {epoch} of {args.epochs} is saved in {state_path}; "
                              f"continue with --resume")
            print(f"epoch {epoch:3d}  loss {loss:7.2f}  -ELBO {reconstruction + kl:7.2f} "
                  f"(recon {reconstruction:6.2f}, KL {kl:5.2f})  {seconds:.1f}s", flush=True)

    weights = os.path.join(args.out, "vae.pt")
    common.save_checkpoint(weights, CHECKPOINT_KIND, settings_of(args), model)
    common.note_saved(f"training finished; the weights are in {weights} "
                      f"(--eval-only remakes every number from them)")
    progress.append(snapshot(model, digits, f"after {args.epochs} epochs"))
    results = measure(model, data, args, args.out, timings)
    with common.stage(timings, "progress and curves figures"):
        plot_reconstruction_progress(digits.cpu(), progress,
                                     os.path.join(args.out, "reconstruction_progress.png"))
        plot_training_curves(history, results["test"],
                             os.path.join(args.out, "training_curves.png"), args.kl_warmup)
    metrics = run_metrics(args, device, data, results, progress, history, timings, started)
    common.write_json(os.path.join(args.out, "metrics.json"), metrics)
    common.write_text(os.path.join(args.out, "report.md"), render_report(metrics, args.out))
    print(f"test negative ELBO {results['test']['negative_elbo']:.2f} nats; SVM test accuracy "
          f"{results['svm']['test']['accuracy']:.4f}; outputs in {args.out}")
    return metrics


def run_metrics(args, device, data, results, progress, history, timings, started):
    """metrics.json: every number of the run, its command, settings, machine and timings."""
    return {"question": "Q1 VAE on MNIST", "command": common.command_line(),
            "mode": "resume" if args.resume else "train",
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": common.machine_info(device)["description"], "torch": torch.__version__,
            "settings": settings_of(args), "n_train": len(data.train), "n_test": len(data.test),
            **results,
            "progress": [{"label": s["label"], "reconstruction": s["reconstruction"]}
                         for s in progress],
            "history": history, "timings": timings,
            "wall_seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------
# report.md: a template filled from metrics.json (and runs/*/metrics.json, beta4/metrics.json)
# ---------------------------------------------------------------------------------------
def most_confused(svm_test, k):
    cm = np.array(svm_test["confusion_matrix"])
    np.fill_diagonal(cm, 0)
    pairs = sorted(((cm[i, j], i, j) for i in range(len(cm)) for j in range(len(cm))), reverse=True)
    names = svm_test["class_names"]
    return [(names[i], names[j], int(n)) for n, i, j in pairs[:k] if n > 0]


def compare(value, target, below, above):
    return below if value <= target else above


def active_units_sentence(m):
    latent, active = m["settings"]["latent"], m["active_units"]
    text = (f"{active} of the {latent} latent units are active (mean KL per test image above "
            f"{ACTIVE_KL} nats)")
    inactive = [f"z{j}" for j, kl in enumerate(m["kl_per_unit"]) if kl <= ACTIVE_KL]
    if not inactive:
        return text + "."
    return (text + f"; the other {len(inactive)} ({', '.join(inactive)}) carry at most "
            f"{ACTIVE_KL} nats each: their posterior hardly differs from the prior N(0, 1), "
            f"whatever the digit.")


def silhouette_sentence(score):
    return (f"Silhouette score of the digit labels on the standardised latent means of the "
            f"whole test set: {score:.3f}. For each image it is (b - a) / max(a, b), with a its "
            f"mean distance to the images of its own digit and b to those of the nearest other "
            f"digit, averaged over the images; it runs from -1 to 1, and near 0 the digits' "
            f"clusters overlap.")


def choices_sentence(s, defaults):
    """The warm-up and SVM settings: the defaults were chosen on training data only."""
    changed = [f"--{key.replace('_', '-')} {s[key]:g} (default {defaults[key]:g})"
               for key in ("kl_warmup", "svm_c") if s[key] != defaults[key]]
    if changed:
        return ("This run changed settings that the defaults fix: " + ", ".join(changed) + ".")
    return ("The KL warm-up and the SVM's settings (RBF kernel, C, gamma 'scale', "
            "standardised means) are the script's fixed defaults; no validation run of this "
            "kit chose them. In this run the test set chose nothing: its numbers are computed "
            "once, after training.")


def beta_table(m, out):
    """The beta-VAE beside this run, from <out>/beta4/metrics.json when it exists."""
    path = os.path.join(out, "beta4", "metrics.json")
    if not os.path.isfile(path):
        return ""
    b = common.read_json(path, "metrics file")
    rows = [(f"{r['settings']['beta']:g}", r) for r in (m, b)]
    lines = ["| beta | negative ELBO | reconstruction | KL | active units | SVM test accuracy | "
             "silhouette |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['test']['negative_elbo']:.2f} | {r['test']['reconstruction']:.2f} "
              f"| {r['test']['kl']:.2f} | {r['active_units']} of {r['settings']['latent']} | "
              f"{r['svm']['test']['accuracy']:.4f} | {r['silhouette']:.3f} |" for name, r in rows]
    fewer = ("fewer" if b["active_units"] < m["active_units"] else
             "as many" if b["active_units"] == m["active_units"] else "more")
    return f"""## beta-VAE: beta = {b['settings']['beta']:g} beside beta = {m['settings']['beta']:g}

`{common.shown_command(b['command'])}` trains the same model with the KL weighted by beta = {b['settings']['beta']:g}
(Higgins et al. 2017); its own report is [beta4/report.md](beta4/report.md). Test set, nats per image:

{chr(10).join(lines)}

With beta = {b['settings']['beta']:g} the model keeps {fewer} active units
({b['active_units']} against {m['active_units']}).

| beta = {m['settings']['beta']:g} | beta = {b['settings']['beta']:g} |
|---|---|
| ![traversal beta {m['settings']['beta']:g}](latent_traversal.png) | ![traversal beta {b['settings']['beta']:g}](beta4/latent_traversal.png) |

"""


def runs_table(out):
    runs = common.other_runs(out)
    if not runs:
        return ""
    lines = ["| run | command | negative ELBO | KL | active units | SVM test accuracy | "
             "silhouette | training s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | `{common.shown_command(r['command'])}` | {r['test']['negative_elbo']:.2f} | "
              f"{r['test']['kl']:.2f} | {r['active_units']} | {r['svm']['test']['accuracy']:.4f} | "
              f"{r['silhouette']:.3f} | {r['timings']['training']:.0f} |" for name, r in runs]
    return ("## Other runs\n\nEach from its own `runs/<name>/metrics.json` (the same script):\n\n"
            + "\n".join(lines) + "\n\n")


def render_saved_report(metrics, out):
    """render_report for --report-only: a metrics.json of another layout is one sentence."""
    try:
        return render_report(metrics, out)
    except (KeyError, TypeError, IndexError, ValueError) as error:
        raise common.UserError(f"{os.path.join(out, 'metrics.json')} (or a run beside it) lacks "
                               f"{error} or holds it in another form: it was not written by this "
                               f"version of q1_vae.py; run the training again") from None


def render_report(metrics, out):
    m, s = metrics, metrics["settings"]
    test, svm = m["test"], m["svm"]
    defaults = vars(build_parser().parse_args([]))
    training_seconds = sum(h["train_seconds"] for h in m["history"])
    warmup = (f"the KL weight rises linearly from 0 to beta over the first {s['kl_warmup']:g} "
              f"epochs" if s["kl_warmup"] else "the KL weight is beta from the first step")
    confused = ", ".join(f"{a}->{b} ({n})" for a, b, n in most_confused(svm["test"], 4)) or "none"
    lr_drop = f" (lr /10 for the last {s['epochs'] // 6})" if s["epochs"] // 6 else ""
    progress = "; ".join(f"{p['label']} {p['reconstruction']:.1f}" for p in m["progress"])
    return f"""# Question 1: VAE on MNIST

Command: `{common.shown_command(m['command'])}` ({m['mode']}; {m['machine']}; {m['timestamp']}; wall time
{m['wall_seconds']:.0f} s).

Model: encoder conv 4x4/2 16 - conv 4x4/2 32 - FC {s['hidden'] // 2} - 2x{s['latent']} (mean and
log-variance), MLP decoder {s['latent']}-{s['hidden'] // 2}-{s['hidden']}-784 with Bernoulli outputs,
ReLU; Adam lr {s['lr']:g}, batch {s['batch_size']}, {s['epochs']} epochs{lr_drop}, beta = {s['beta']:g},
seed {s['seed']}; {warmup}. Data: MNIST,
{m['n_train']:,} training and {m['n_test']:,} test images, grey levels in [0, 1] used as Bernoulli
targets (not binarised).

{choices_sentence(s, defaults)}

## Test ELBO

| | nats per image |
|---|---|
| negative ELBO (reconstruction + KL) | **{test['negative_elbo']:.2f}** |
| reconstruction -log p(x\\|z) | {test['reconstruction']:.2f} |
| KL(q(z\\|x) \\|\\| N(0, I)) | {test['kl']:.2f} |

One posterior sample per test image, fixed noise: {compare(test['negative_elbo'], ELBO_TARGET,
'within', 'above')} the target of at most {ELBO_TARGET:g} nats.

![training curves](training_curves.png)

## Generated digits

![samples](samples.png)

Decoding 100 draws of z ~ N(0, I).

## Reconstruction progress

![reconstruction progress](reconstruction_progress.png)

The first {N_PROGRESS_DIGITS} test digits decoded from their posterior means; their mean
reconstruction term -log p(x|z), nats a digit: {progress}.

## What the latent units hold

![latent traversal](latent_traversal.png)

Test image {TRAVERSAL_DIGIT} (counting from 0): its posterior mean decoded with one unit set to each of
{TRAVERSAL_VALUES[0]:g}..{TRAVERSAL_VALUES[-1]:g} (one row a unit, the unit with the most KL first).
{active_units_sentence(m)}

{beta_table(m, out)}## t-SNE of the latent means

![t-SNE](tsne_latent.png)

t-SNE (scikit-learn, perplexity 30, PCA init) of the posterior means mu(x) of
{m['tsne_points']:,} random test images, coloured by their digit; the VAE never saw a label.
{silhouette_sentence(m['silhouette'])}

## SVM on the latent features

RBF-kernel SVM (C = {svm['C']:g}, gamma = 'scale') on standardised posterior means, fitted on
{svm['fitted_on']:,} training images, scored on the {svm['test']['n']:,} test images.
Train accuracy {svm['train_accuracy']:.4f}; **test accuracy {svm['test']['accuracy']:.4f}**,
{compare(SVM_TARGET, svm['test']['accuracy'], 'meeting', 'short of')} the target of at least
{SVM_TARGET:g}; macro F1 {svm['test']['macro_f1']:.4f}. The pairs it confuses most (true ->
predicted, test images): {confused}.

![SVM confusion matrix](svm_confusion_matrix.png)

{common.metrics_table(svm['test'])}

{runs_table(out)}## Timings ({m['machine']})

| stage | seconds |
|---|---|
""" + "".join(f"| {k} | {v} |\n" for k, v in m["timings"].items()) + f"""
Training steps of all {len(m['history'])} epochs: {training_seconds:.0f} s,
{len(m['history']) * m['n_train'] / training_seconds:,.0f} images/s.
"""


if __name__ == "__main__":
    common.run_cli(main)
