"""Question 1: a variational auto-encoder on MNIST (Kingma & Welling 2014), with the KL weight
beta of the beta-VAE (Higgins et al. 2017) as --beta.

    python q1_vae.py --data-dir DIR                  # 30 epochs, latent 16: every figure and number
    python q1_vae.py --data-dir DIR --beta 4 --out outputs/q1/beta4    # a beta-VAE
    python q1_vae.py --data-dir DIR --eval-only      # recompute from outputs/q1/vae.pt into eval/
    python q1_vae.py --data-dir DIR --resume         # continue an interrupted run
    python q1_vae.py --report-only                   # re-render outputs/q1/report.md
    python q1_vae.py --data-dir DIR --download-only  # fetch MNIST and stop
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
from common import UserError, plt, stage

SCRIPT, KIND, DIGITS = "q1_vae.py", "q1_vae", [str(d) for d in range(10)]
LR, BATCH_SIZE = 1e-3, 128  # Adam; the learning rate is /10 for the last sixth of the epochs
N_DIGITS, TRAVERSAL_DIGIT = 10, 0  # test digits of the progress figure; the traversal's digit
TRAVERSAL_VALUES = np.linspace(-3, 3, 13)
ACTIVE_KL = 0.01  # nats: a unit whose mean KL on the test set exceeds it is active
SVM_C = 10.0  # of the RBF SVM on the standardised latent means

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    count, real = common.positive_int, common.nonnegative_float
    for flag, kind, default in (
            ("latent", count, 16), ("epochs", count, 30), ("hidden", count, 1024),
            ("beta", real, 1.0), ("kl-warmup", real, 10.0), ("svm-train-size", count, 60000),
            ("tsne-points", count, common.TSNE_POINTS)):
        parser.add_argument("--" + flag, type=kind, default=default)
    parser.add_argument("--no-download", action="store_true")
    parser.add_argument("--download-only", action="store_true")
    common.add_common_args(parser, "outputs/q1")
    return parser

# --- Model: a convolutional encoder q(z|x) = N(mu, diag(exp(logvar))), an MLP decoder p(x|z)
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
        return self.encoder(x).chunk(2, dim=1)

    def decode_logits(self, z):
        return self.decoder(z).view(-1, 1, 28, 28)

    def decode(self, z):
        """z (N, latent_dim) -> Bernoulli means (N,1,28,28) in [0,1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x, noise):  # z by the reparameterisation trick
        mu, logvar = self.encode(x)
        return self.decode_logits(mu + noise * torch.exp(0.5 * logvar)), mu, logvar

# --- Loss: -log p(x|z) (grey levels as Bernoulli targets) + beta * KL(q(z|x) || N(0, I))
def negative_elbo(logits, x, mu, logvar, beta):  # each summed over the batch
    reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return reconstruction + beta * kl, reconstruction, kl

# --- Training step and loop
def train_step(model, optimizer, x, beta_weight, generator=None):
    """One Adam step on the per-image loss of the batch x; returns its summed terms."""
    noise = torch.randn(len(x), model.latent_dim, generator=generator).to(x.device)
    logits, mu, logvar = model(x, noise)
    loss, reconstruction, kl = negative_elbo(logits, x, mu, logvar, beta_weight)
    common.check_finite(loss, "training loss")
    optimizer.zero_grad(set_to_none=True)
    (loss / len(x)).backward()
    optimizer.step()
    return loss.item(), reconstruction.item(), kl.item()

def kl_weight(settings, epoch, fraction):
    progress = (epoch - 1 + fraction) / settings.kl_warmup if settings.kl_warmup else 1.0
    return settings.beta * min(1.0, progress)

def train_epoch(model, optimizer, images, args, epoch):
    for group in optimizer.param_groups:
        group["lr"] = LR * (0.1 if epoch > args.epochs - args.epochs // 6 else 1.0)
    generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    order, n, sums = torch.randperm(len(images), generator=generator), len(images), np.zeros(3)
    started = time.perf_counter()
    for start in range(0, n, BATCH_SIZE):
        sums += train_step(model.train(), optimizer, images[order[start:start + BATCH_SIZE]],
                           kl_weight(args, epoch, start / n), generator)
    seconds, (loss, reconstruction, kl) = time.perf_counter() - started, (sums / n).tolist()
    print(f"epoch {epoch:3d}  loss {loss:7.2f}  reconstruction {reconstruction:6.2f}  KL "
          f"{kl:5.2f}  {seconds:.1f}s", flush=True)
    return {"epoch": epoch, "train": {"loss": loss, "reconstruction": reconstruction, "kl": kl,
                                      "negative_elbo": reconstruction + kl},
            "train_seconds": round(seconds, 2), "images_per_second": round(n / seconds)}

def train(model, data, args, path, resumed=None):
    """The epochs, the state saved after each; the first test digits decoded on the way."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    state = {"history": [], "progress": [snapshot(model, data.test[:N_DIGITS], "before training")]}
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        state = {key: resumed[key] for key in ("history", "progress", "model", "optimizer")}
    for epoch in range(len(state["history"]) + 1, args.epochs + 1):
        state["history"].append(train_epoch(model, optimizer, data.train, args, epoch))
        if epoch == 1:
            state["progress"].append(snapshot(model, data.test[:N_DIGITS], "after epoch 1"))
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
        common.save_training_state(path, common.settings_of(args), data.fingerprint, **state)
        common.note_saved(f"epoch {epoch} of {args.epochs} is saved in {path}; continue with "
                          f"--resume")
    state["progress"].append(snapshot(model, data.test[:N_DIGITS], f"after {args.epochs} epochs"))
    return state

# --- Evaluation
@torch.no_grad()
def evaluate(model, images, beta):  # one posterior sample per image, fixed noise
    generator, sums = torch.Generator().manual_seed(12345), np.zeros(2)
    for start in range(0, len(images), 1000):
        x = images[start:start + 1000]
        noise = torch.randn(len(x), model.latent_dim, generator=generator).to(x.device)
        logits, mu, logvar = model.eval()(x, noise)
        sums += [term.item() for term in negative_elbo(logits, x, mu, logvar, beta)[1:]]
    reconstruction, kl = (sums / len(images)).tolist()
    return {"loss": reconstruction + beta * kl, "reconstruction": reconstruction, "kl": kl,
            "negative_elbo": reconstruction + kl}

@torch.no_grad()
def posterior_means(model, images):
    """mu(x) of every image, and each unit's mean KL(q(z_j|x) || N(0, 1)) in nats."""
    total, means = torch.zeros(model.latent_dim), []
    for start in range(0, len(images), 2000):
        mu, logvar = model.eval().encode(images[start:start + 2000])
        total += (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).sum(0).cpu()
        means.append(mu)
    return torch.cat(means).cpu().numpy(), (total / len(images)).numpy()

@torch.no_grad()
def snapshot(model, digits, label):
    logits = model.eval().decode_logits(model.encode(digits)[0])
    nats = F.binary_cross_entropy_with_logits(logits, digits, reduction="sum").item()
    return {"label": label, "images": torch.sigmoid(logits).cpu(),
            "reconstruction": nats / len(digits)}

def measure(model, data, args, out, timings):
    """Every number of a trained model, and its figures in `out`."""
    from sklearn import metrics, pipeline, preprocessing, svm as sklearn_svm

    scaler, labels = preprocessing.StandardScaler, data.train_labels
    with stage(timings, "evaluation"):
        test = evaluate(model, data.test, args.beta)
        means, unit_kl = posterior_means(model, data.test)
        train = posterior_means(model, data.train)[0]
        fit = common.subsample(len(data.train), args.svm_train_size, args.seed)
        svm = pipeline.make_pipeline(scaler(), sklearn_svm.SVC(C=SVM_C, gamma="scale"))
        svm.fit(train[fit], labels[fit])
        svm = {"kernel": "rbf", "C": SVM_C, "gamma": "scale", "standardised": True,
               "fitted_on": len(fit), "train_accuracy": float(np.mean(svm.predict(
                   train[fit]) == labels[fit])), "test": common.classification_metrics(
                       data.test_labels, svm.predict(means), DIGITS)}
        silhouette = metrics.silhouette_score(scaler().fit_transform(means), data.test_labels)
    tsne = common.subsample(len(means), args.tsne_points, args.seed)
    if np.ptp(means[tsne], axis=0).max() == 0:  # scikit-learn's t-SNE crashes on them
        print("the t-SNE figure is skipped: the latent means are all equal")
        tsne = []
    with stage(timings, "figures"):
        plot_samples(model, out, args.seed)
        plot_latent_traversal(model, data.test, unit_kl, out, args.beta)
        common.plot_confusion_matrix(svm["test"], os.path.join(out, "svm_confusion_matrix.png"),
                                     "SVM on VAE latent means, MNIST test")
        if len(tsne):
            common.plot_tsne(means, data.test_labels, os.path.join(out, "tsne_latent.png"), DIGITS,
                             title="t-SNE of VAE latent means (MNIST test)",
                             n_points=args.tsne_points, seed=args.seed)
    return {"test": test, "kl_per_unit": {f"z{j}": float(v) for j, v in enumerate(unit_kl)},
            "active_units": int(np.sum(unit_kl > ACTIVE_KL)), "svm": svm,
            "silhouette": float(silhouette), "tsne_points": len(tsne)}

def checks_of(results):
    elbo, accuracy = results["test"]["negative_elbo"], results["svm"]["test"]["accuracy"]
    return [common.check("test negative ELBO (nats)", elbo, "<= 100", elbo <= 100),
            common.check("SVM test accuracy", accuracy, ">= 0.98", accuracy >= 0.98)]

# --- Figures
def show(ax, images, nrow, title, **title_args):
    ax.imshow(common.image_grid(images.view(-1, 1, 28, 28), nrow=nrow), cmap="gray")
    ax.set_title(title, **title_args)
    ax.axis("off")

@torch.no_grad()
def plot_samples(model, out, seed):
    z = torch.randn(100, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    fig, ax = plt.subplots(figsize=(7, 7))
    show(ax, model.eval().decode(z.to(next(model.parameters()).device)).cpu(), 10,
         f"100 samples: decode(z), z ~ N(0, I), latent {model.latent_dim}")
    common.save_figure(fig, os.path.join(out, "samples.png"))

@torch.no_grad()
def plot_latent_traversal(model, images, unit_kl, out, beta):
    """A row a unit, most KL first: mu(x) of one test image decoded with that unit swept."""
    mu = model.eval().encode(images[TRAVERSAL_DIGIT:TRAVERSAL_DIGIT + 1])[0][0]
    order, rows = np.argsort(-unit_kl, kind="stable"), []
    for unit in order:
        z = mu.repeat(len(TRAVERSAL_VALUES), 1)
        z[:, unit] = torch.as_tensor(TRAVERSAL_VALUES, dtype=z.dtype)
        rows.append(model.decode(z).cpu())
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(order) + 1.2))
    ax.imshow(common.image_grid(torch.cat(rows), nrow=len(TRAVERSAL_VALUES)), cmap="gray")
    centres = 16 + 30 * np.arange(max(len(order), len(TRAVERSAL_VALUES)))
    ax.set_yticks(centres[:len(order)], [f"z{u}  KL {unit_kl[u]:.2f}" + (
        "" if unit_kl[u] > ACTIVE_KL else " (inactive)") for u in order], fontsize=7)
    ax.set_xticks(centres[:len(TRAVERSAL_VALUES)], [f"{v:g}" for v in TRAVERSAL_VALUES],
                  fontsize=7)
    ax.tick_params(length=0)
    ax.set_xlabel("value of the swept unit (the others at the posterior mean)")
    ax.set_title(f"Latent traversal, beta = {beta:g}: test image {TRAVERSAL_DIGIT}, "
                 f"units by mean KL (nats)", fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    common.save_figure(fig, os.path.join(out, "latent_traversal.png"))

def plot_reconstruction_progress(originals, snapshots, out):
    fig, axes = plt.subplots(len(snapshots) + 1, 1, figsize=(8, 1.15 * len(snapshots) + 1.45))
    show(axes[0], originals, len(originals), "Original test digits", fontsize=10, loc="left")
    for ax, s in zip(axes[1:], snapshots):
        show(ax, s["images"], len(originals), f"{s['label']}: -log p(x|z) "
             f"{s['reconstruction']:.1f} nats a digit", fontsize=10, loc="left")
    common.save_figure(fig, os.path.join(out, "reconstruction_progress.png"))

def plot_training_curves(history, test, out, kl_warmup):
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key in zip(axes, ("negative_elbo", "reconstruction", "kl")):
        ax.axvspan(0.5, min(kl_warmup, epochs[-1]) + 0.5, color="0.9", label="KL warm-up")
        ax.plot(epochs, [h["train"][key] for h in history], "o-", ms=3, label="training batches")
        ax.plot(epochs[-1:], [test[key]], "r*", ms=10, label="test, after training")
        ax.set(title=key, xlabel="epoch", ylabel="nats per image")
    axes[0].legend(fontsize=8)
    common.save_figure(fig, os.path.join(out, "training_curves.png"))

# --- The report: a template filled from metrics.json (and beta4/, runs/*/metrics.json)
REPORT = """# Question 1: VAE on MNIST

`{command}`; {machine[description]}; {timestamp}

Encoder conv 4x4/2 16 - conv 4x4/2 32 - FC {half} - 2x{settings[latent]} (mean, log-variance), \
MLP decoder {settings[latent]}-{half}-{settings[hidden]}-784 (Bernoulli), ReLU; Adam lr {lr:g} \
(/10 for the last {late} epochs), batch {batch}, {settings[epochs]} epochs, beta \
{settings[beta]:g}, seed {settings[seed]}; the KL weight rises linearly from 0 to beta over \
{settings[kl_warmup]:g} epochs. MNIST: {data[train_images]:,} training and {data[test_images]:,} \
test images, grey levels in [0, 1] as Bernoulli targets. The warm-up and the SVM (RBF, C \
{results[svm][C]:g}, gamma 'scale', standardised means) are fixed choices that no committed run \
compared; the test set is scored once, after training.

{checks}

## Test negative ELBO: {results[test][negative_elbo]:.2f} nats per image

-log p(x|z) {results[test][reconstruction]:.2f} + KL(q(z|x) || N(0, I)) {results[test][kl]:.2f}, \
one posterior sample per test image, fixed noise. Samples decode z ~ N(0, I); progress rows \
decode the posterior means of the first {n_digits} test digits (-log p(x|z), nats: {progress}).

![training curves](training_curves.png) ![samples](samples.png) \
![reconstruction progress](reconstruction_progress.png)

## Latent units: {results[active_units]} of {settings[latent]} active

![latent traversal](latent_traversal.png)

Active: mean KL per test image above {active_kl} nats; inactive: {inactive}.{beta}

## t-SNE, silhouette and SVM on the posterior means

![t-SNE](tsne_latent.png) ![SVM confusion matrix](svm_confusion_matrix.png)

t-SNE (scikit-learn, PCA init) of {results[tsne_points]:,} random test images. Silhouette of \
the digits on the standardised means of the test set: {results[silhouette]:.3f} (-1 to 1: 1 for \
tight separate clusters, 0 for overlapping ones). The SVM, fitted on {results[svm][fitted_on]:,} \
training images: train accuracy {results[svm][train_accuracy]:.4f}, test accuracy \
{results[svm][test][accuracy]:.4f}, macro F1 {results[svm][test][macro_f1]:.4f}.

{per_class}

## Other runs

{runs}

Seconds: {timings}; training {rate:,.0f} images/s.
"""
RUN_COLUMNS = [("beta", "settings.beta", "{:g}")] + [(head, "results." + key, form) for head,
    key, form in (("negative ELBO", "test.negative_elbo", "{:.2f}"), ("KL", "test.kl", "{:.2f}"),
    ("active units", "active_units", "{}"), ("SVM test accuracy", "svm.test.accuracy", "{:.4f}"),
    ("silhouette", "silhouette", "{:.3f}"))] + [("training s", "timings.training", "{:.0f}")]

def render_report(metrics, out):
    s, r, history = metrics["settings"], metrics["results"], metrics["training"]["history"]
    path, beta = os.path.join(out, "beta4", "metrics.json"), ""
    if os.path.isfile(path):  # the beta-VAE beside this run
        run = common.read_metrics(path, SCRIPT)
        beta = f"\n\nbeta-VAE, `{run['command']}`: " + ", ".join(
            f"{h} {f.format(common.lookup(run, k))}" for h, k, f in RUN_COLUMNS[1:6])
        beta += ".\n\n![beta4 traversal](beta4/latent_traversal.png)"
    return common.fill(
        REPORT, metrics, checks=common.checks_table(metrics["checks"]), lr=LR, batch=BATCH_SIZE,
        half=s["hidden"] // 2, late=s["epochs"] // 6, n_digits=N_DIGITS, active_kl=ACTIVE_KL,
        progress="; ".join(f"{p['label']} {p['reconstruction']:.1f}"
                           for p in metrics["training"]["progress"]),
        inactive=", ".join(u for u, kl in r["kl_per_unit"].items() if kl <= ACTIVE_KL) or "none",
        beta=beta, per_class=common.metrics_table(r["svm"]["test"]),
        runs=common.runs_table(out, SCRIPT, RUN_COLUMNS) or "No runs are stored beside this one.",
        timings=", ".join(f"{k} {v:g}" for k, v in metrics["timings"].items()),
        rate=len(history) * metrics["data"]["train_images"] / sum(
            h["train_seconds"] for h in history))

# --- Main
def main(argv=None):
    args = common.parse(build_parser(), argv)
    if args.report_only:
        return common.report_only(args.out, SCRIPT, render_report)
    device = common.choose_device(args.device)
    if args.download_only:
        common.load_mnist(args.data_dir, download=True)
        return print(f"MNIST is in {os.path.join(args.data_dir, 'MNIST', 'raw')}")
    out = common.prepare_out(args.out)
    if args.eval_only:
        return eval_only(args, device)
    timings, path = {}, os.path.join(out, "training_state.pt")
    data = load_data(args, device, timings)
    resumed = args.resume and common.load_training_state(path, args, data.fingerprint)
    check_sizes(args, data)
    if not resumed:
        common.seed_everything(args.seed)
    model = VAE(args.latent, args.hidden).to(device)
    with stage(timings, "training"):
        state = train(model, data, args, path, resumed)
    weights = os.path.join(out, "vae.pt")
    common.save_checkpoint(weights, KIND, common.settings_of(args), model)
    common.note_saved(f"training finished; the weights are in {weights}")
    results = measure(model, data, args, out, timings)
    with stage(timings, "figures"):
        plot_reconstruction_progress(data.test[:N_DIGITS].cpu(), state["progress"], out)
        plot_training_curves(state["history"], results["test"], out, args.kl_warmup)
    progress = [{"label": p["label"], "reconstruction": p["reconstruction"]}
                for p in state["progress"]]
    metrics = record(args, device, data, timings, results, out,
                     training={"history": state["history"], "progress": progress})
    common.write_text(os.path.join(out, "report.md"), render_report(metrics, out))
    common.save_training_state(path, metrics["settings"], data.fingerprint, True, **state)
    print(f"test negative ELBO {results['test']['negative_elbo']:.2f} nats; outputs in {out}")

def record(args, device, data, timings, results, out, **extra):
    metrics = common.record(SCRIPT, args, device, data.record, timings, checks_of(results),
                            results, **extra)
    common.write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics

def eval_only(args, device):
    """Every number and figure again from OUT/vae.pt into OUT/eval/, compared with the run's."""
    weights = os.path.join(args.out, "vae.pt")
    model, saved = load_model(weights, device), common.load_checkpoint(weights, KIND)["hparams"]
    committed = common.read_metrics(os.path.join(args.out, "metrics.json"), SCRIPT)
    vars(args).update({k: v for k, v in saved.items() if k in vars(args) and k not in args.given})
    eval_dir, timings = common.prepare_out(os.path.join(args.out, "eval")), {}
    data = load_data(args, device, timings)
    check_sizes(args, data)
    results = measure(model, data, args, eval_dir, timings)
    common.compare_with_committed(record(args, device, data, timings, results, eval_dir),
                                  committed, eval_dir)

# --- Data and weights
def load_data(args, device, timings):
    with stage(timings, "data"):
        (train, train_labels), (test, test_labels) = common.load_mnist(
            args.data_dir, download=not args.no_download)
        fingerprint = common.fingerprint(train, train_labels, test, test_labels)
        train_x, test_x = ((u8.float() / 255).unsqueeze(1).to(device) for u8 in (train, test))
    return SimpleNamespace(train=train_x, test=test_x, train_labels=train_labels.numpy(),
                           test_labels=test_labels.numpy(), fingerprint=fingerprint, record={
                               "folder": "DATA_DIR/MNIST/raw", "train_images": len(train),
                               "test_images": len(test), "fingerprint": fingerprint})

def check_sizes(args, data):
    """What the t-SNE and the SVM need, refused before any training."""
    svm = data.train_labels[common.subsample(len(data.train), args.svm_train_size, args.seed)]
    for flag, small, need in (
            ("hidden", args.hidden < 2, "layers of hidden // 2 units, so at least 2"),
            ("latent", args.latent < 2, "2 latent units for the t-SNE's PCA initialisation"),
            ("tsne_points", min(args.tsne_points, len(data.test)) < 2, "2 test images"),
            ("svm_train_size", len(np.unique(svm)) < 2, "two digits for the SVM to tell apart")):
        if small:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is too small: "
                            f"the run needs {need}")

def load_model(path, device="cpu"):
    """The VAE saved at `path`, rebuilt from its own settings, in eval mode."""
    state = common.load_checkpoint(path, KIND)
    model = VAE(state["hparams"]["latent"], state["hparams"]["hidden"])
    return common.load_weights(model, state, path).to(device).eval()

if __name__ == "__main__":
    common.run_cli(main)
