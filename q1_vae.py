"""Question 1: a variational auto-encoder on MNIST (Kingma & Welling 2014; beta-VAE of
Higgins et al. 2017 with --beta).

    python q1_vae.py                                   # train 30 epochs, every figure and number
    python q1_vae.py --epochs 30 --latent 16 --beta 1
    python q1_vae.py --eval-only --weights outputs/q1/vae.pt
    python q1_vae.py --resume                          # continue an interrupted run

Writes under --out (default outputs/q1): vae.pt, samples.png, reconstruction_progress.png,
training_curves.png, tsne_latent.png, svm_confusion_matrix.png, metrics.json, report.md.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import plt

CHECKPOINT_KIND = "q1_vae"
N_PROGRESS_DIGITS = 10  # fixed test digits shown in the reconstruction-progress figure


def parse_args(argv=None):
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
                        help="checkpoint for --eval-only/--resume (None: <out>/vae.pt)")
    parser.add_argument("--no-download", action="store_true",
                        help="never try to download MNIST")
    common.add_common_args(parser, "outputs/q1")
    args = parser.parse_args(argv)
    if args.eval_only and args.resume:
        parser.error("--eval-only and --resume exclude each other")
    args.weights = args.weights or os.path.join(args.out, "vae.pt")
    return args


# ---------------------------------------------------------------------------------------
# Model: a small convolutional encoder q(z|x) = N(mu, diag(exp(logvar))) and an MLP
# Bernoulli decoder p(x|z). A conv decoder costs ~3x more on a CPU for about 1 nat; the conv
# encoder gives better separated latents than an MLP one (SVM 98.2 % vs ~97.7 %).
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
        z = mu + noise * torch.exp(0.5 * logvar)  # reparameterisation trick
        return self.decode_logits(z), mu, logvar


def negative_elbo(logits, x, mu, logvar, beta):
    """Summed over the batch: Bernoulli reconstruction term -log p(x|z) (grey levels as
    Bernoulli targets), KL(q(z|x) || N(0,I)) in closed form, and recon + beta * KL."""
    reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return reconstruction + beta * kl, reconstruction, kl


def build_model(hparams, device="cpu"):
    return VAE(hparams["latent"], hparams["hidden"]).to(device)


def model_from_checkpoint(state, path, device="cpu"):
    try:
        model = build_model(state["hparams"], device)
    except (KeyError, TypeError, ValueError):
        raise common.UserError(f"weights file {path} does not fit this architecture "
                               f"(its hyper-parameters are incomplete)") from None
    return common.load_weights(model, state, path)


def load_model(path, device="cpu"):
    """The VAE saved at `path`, rebuilt from its own hyper-parameters, in eval mode."""
    state = common.load_checkpoint(path, CHECKPOINT_KIND)
    return model_from_checkpoint(state, path, device).eval()


# ---------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------
def epoch_generator(seed, epoch):
    """One generator per epoch (shuffling and noise), so a resumed run repeats exactly."""
    return torch.Generator().manual_seed(seed * 100003 + epoch)


def learning_rate(hparams, epoch):
    """Adam's rate, divided by 10 for the last sixth of the epochs: the last epochs then
    settle the encoder, which sharpens the latent clusters the SVM sees."""
    late = epoch > hparams["epochs"] - hparams["epochs"] // 6
    return hparams["lr"] * (0.1 if late else 1.0)


def kl_weight(hparams, epoch, fraction):
    """beta, ramped up linearly over the first `kl_warmup` epochs: with the full KL from the
    first step some latent units collapse before the decoder learns to use them."""
    warmup = hparams.get("kl_warmup", 0.0)
    progress = (epoch - 1 + fraction) / warmup if warmup else 1.0
    return hparams["beta"] * min(1.0, progress)


def train_epoch(model, optimizer, images, hparams, epoch, device):
    model.train()
    generator = epoch_generator(hparams["seed"], epoch)
    order = torch.randperm(len(images), generator=generator)
    sums = np.zeros(3)
    batch_size = hparams["batch_size"]
    for start in range(0, len(images), batch_size):
        x = images[order[start:start + batch_size]]
        noise = torch.randn(len(x), model.latent_dim, generator=generator).to(device)
        logits, mu, logvar = model(x, noise)
        beta = kl_weight(hparams, epoch, start / len(images))
        loss, reconstruction, kl = negative_elbo(logits, x, mu, logvar, beta)
        common.check_finite(loss, "training loss")
        optimizer.zero_grad(set_to_none=True)
        (loss / len(x)).backward()
        optimizer.step()
        sums += [loss.item(), reconstruction.item(), kl.item()]
    return dict(zip(["loss", "reconstruction", "kl"], (sums / len(images)).tolist()))


@torch.no_grad()
def evaluate(model, images, beta, device, batch_size=1000, seed=12345):
    """Per-image mean of loss (recon + beta*KL), reconstruction, KL and the negative ELBO
    (recon + KL) with one posterior sample per image and fixed noise."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = np.zeros(3)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        noise = torch.randn(len(x), model.latent_dim, generator=generator).to(device)
        logits, mu, logvar = model(x, noise)
        _, reconstruction, kl = negative_elbo(logits, x, mu, logvar, beta)
        sums += [reconstruction.item() + beta * kl.item(), reconstruction.item(), kl.item()]
    mean = sums / len(images)
    return {"loss": mean[0], "reconstruction": mean[1], "kl": mean[2],
            "negative_elbo": mean[1] + mean[2]}


@torch.no_grad()
def latent_means(model, images, batch_size=2000):
    model.eval()
    return torch.cat([model.encode(images[i:i + batch_size])[0]
                      for i in range(0, len(images), batch_size)]).cpu().numpy()


@torch.no_grad()
def reconstruct(model, x):
    model.eval()
    return model.decode(model.encode(x)[0]).cpu()


def svm_on_latents(train_features, train_labels, test_features, test_labels, args, seed):
    """Standardise the posterior means, fit an RBF SVM on (a subset of) the training set,
    score it on the whole test set."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    index = common.subsample(len(train_features), args.svm_train_size, seed)
    svm = make_pipeline(StandardScaler(), SVC(kernel="rbf", C=args.svm_c, gamma="scale"))
    svm.fit(train_features[index], train_labels[index])
    train_accuracy = float(np.mean(svm.predict(train_features[index]) == train_labels[index]))
    metrics = common.classification_metrics(test_labels, svm.predict(test_features),
                                            class_names=[str(d) for d in range(10)])
    return {"kernel": "rbf", "C": args.svm_c, "gamma": "scale", "standardised": True,
            "fitted_on": int(len(index)), "train_accuracy": train_accuracy, "test": metrics}


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------
def plot_samples(model, path, seed, device):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(100, model.latent_dim, generator=generator).to(device)
    with torch.no_grad():
        images = model.eval().decode(z).cpu()
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(common.image_grid(images, nrow=10), cmap="gray")
    ax.set_title(f"100 samples: decode(z), z ~ N(0, I), latent {model.latent_dim}")
    ax.axis("off")
    common.save_figure(fig, path)


def plot_reconstruction_progress(originals, snapshots, path):
    """Rows: the originals, then one row of reconstructions per (label, images) snapshot."""
    rows = [("Original test digits", originals)] + list(snapshots)
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.15 * len(rows) + 0.3))
    for ax, (label, images) in zip(axes, rows):
        ax.imshow(common.image_grid(images.view(-1, 1, 28, 28), nrow=len(images)), cmap="gray")
        ax.set_title(label, fontsize=10, loc="left")
        ax.axis("off")
    common.save_figure(fig, path)


def plot_training_curves(history, path, kl_warmup=0.0):
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in zip(axes, ["loss", "reconstruction", "kl"],
                              ["total loss (recon + beta KL)", "reconstruction -log p(x|z)",
                               "KL(q(z|x) || p(z))"]):
        if kl_warmup:
            ax.axvspan(0.5, kl_warmup + 0.5, color="0.9",
                       label="KL warm-up (train: ramped weight)")
        ax.plot(epochs, [h["train"][key] for h in history], "o-", ms=3, label="train")
        ax.plot(epochs, [h["test"][key] for h in history], "s-", ms=3, label="test (full beta)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right")
    common.save_figure(fig, path)


def most_confused(metrics, k):
    cm = np.array(metrics["confusion_matrix"])
    np.fill_diagonal(cm, 0)
    pairs = sorted(((cm[i, j], i, j) for i in range(len(cm)) for j in range(len(cm))), reverse=True)
    names = metrics["class_names"]
    return [(names[i], names[j], int(n)) for n, i, j in pairs[:k]]


def write_report(metrics, path):
    m = metrics
    svm = m["svm"]
    test = m["test"]
    inactive = m["hparams"]["latent"] - m["active_units"]
    inactive_note = (f"the other {inactive} stay at the prior, the usual price of the KL term "
                     f"at beta = {m['hparams']['beta']}." if inactive else
                     "none has collapsed to the prior.")
    text = f"""# Question 1: VAE on MNIST

Command: `{m['command']}` (weights trained by `{m['trained_with']}`)
({m['machine']}; {m['timestamp']})

Model: encoder conv 4x4/2 16 - conv 4x4/2 32 - FC {m['hparams']['hidden'] // 2} - 2x{m['hparams']['latent']}
(mean and log-variance), MLP decoder {m['hparams']['latent']}-{m['hparams']['hidden'] // 2}-{m['hparams']['hidden']}-784
with Bernoulli outputs, ReLU, Adam lr {m['hparams']['lr']}, batch {m['hparams']['batch_size']},
{m['epochs_trained']} epochs (lr /10 for the last sixth), beta = {m['hparams']['beta']}, seed {m['hparams']['seed']};
the KL weight rises linearly from 0 to beta over the first {m['hparams'].get('kl_warmup', 0):g} epochs
(0 = no warm-up), so the train loss of those epochs is below the test loss, which uses beta.
Data: torchvision's MNIST split (60,000 train / 10,000 test), grey levels in [0, 1] used as
Bernoulli targets (not binarised).

## Test ELBO

| | nats per image |
|---|---|
| negative ELBO (reconstruction + KL) | **{test['negative_elbo']:.2f}** |
| reconstruction -log p(x\\|z) | {test['reconstruction']:.2f} |
| KL(q(z\\|x) \\|\\| N(0, I)) | {test['kl']:.2f} |

One posterior sample per test image, fixed noise. The target is at most 100 nats.

![training curves](training_curves.png)

## Generated digits

![samples](samples.png)

Decoding 100 draws of z ~ N(0, I): most samples are recognisable digits of all ten classes;
some are blurry blends between two classes, where the prior puts mass between the clusters of
the aggregate posterior.

## Reconstruction progress

![reconstruction progress](reconstruction_progress.png)

The same {N_PROGRESS_DIGITS} test digits: before training the decoder outputs faint uniform
noise; after one epoch the digit identity is already there but strokes are blurred; after
{m['epochs_trained']} epochs the reconstructions keep the writing style (slant, thickness).

## t-SNE of the latent means

![t-SNE](tsne_latent.png)

t-SNE (scikit-learn, perplexity 30, PCA init) of the posterior means mu(x) of
{m['tsne_points']} random test images, coloured by their digit: the digits form separate
clusters although the VAE never saw a label. The pairs the SVM confuses most (true -> predicted,
test images): {', '.join(f"{a}->{b} ({n})" for a, b, n in most_confused(svm['test'], 4))};
they are the clusters that touch in the embedding.

{m['active_units']} of the {m['hparams']['latent']} latent units are active (variance of the
posterior mean over the test set above 0.01, Burda et al. 2016); {inactive_note}

## SVM on the latent features

RBF-kernel SVM (C = {svm['C']}, gamma = 'scale') on standardised posterior means, fitted on
{svm['fitted_on']} training images, scored on the 10,000 test images.
Train accuracy {svm['train_accuracy']:.4f}; **test accuracy {svm['test']['accuracy']:.4f}**
(target at least 0.98); macro F1 {svm['test']['macro_f1']:.4f}.

![SVM confusion matrix](svm_confusion_matrix.png)

{common.metrics_table(svm['test'])}

## Timings ({m['machine']})

| stage | seconds |
|---|---|
""" + "\n".join(f"| {k} | {v} |" for k, v in m["timings"].items()) + f"""

Training throughput (training steps only, mean over the epochs in the history):
{m.get('train_images_per_second', 'n/a')} images/s.
"""
    common.write_text(path, text)


# ---------------------------------------------------------------------------------------
# Main: data, model, training loop, evaluation, figures, report
# ---------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = common.choose_device(args.device)
    timings = {}
    os.makedirs(args.out, exist_ok=True)

    with common.stage(timings, "load MNIST"):
        (train_u8, train_labels), (test_u8, test_labels) = common.load_mnist(
            args.data_dir, download=not args.no_download)
        train_images = (train_u8.float() / 255).unsqueeze(1).to(device)
        test_images = (test_u8.float() / 255).unsqueeze(1).to(device)
        train_labels, test_labels = train_labels.numpy(), test_labels.numpy()
    progress_digits = test_images[:N_PROGRESS_DIGITS]

    if args.eval_only or args.resume:
        state = common.load_checkpoint(args.weights, CHECKPOINT_KIND)
        model = model_from_checkpoint(state, args.weights, device)
        hparams = dict(state["hparams"])
        if args.resume:
            hparams["epochs"] = args.epochs
        history, progress, start_epoch = state["history"], state["progress"], state["epoch"] + 1
    else:
        hparams = {"latent": args.latent, "hidden": args.hidden, "beta": args.beta,
                   "kl_warmup": args.kl_warmup, "lr": args.lr, "batch_size": args.batch_size,
                   "epochs": args.epochs, "seed": args.seed}
        common.seed_everything(args.seed)
        model = build_model(hparams, device)
        history, progress, start_epoch = [], [("Before training", reconstruct(model, progress_digits))], 1
    trained_by = state.get("command") if args.eval_only else common.command_line()
    optimizer = torch.optim.Adam(model.parameters(), lr=hparams["lr"])
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])

    def save(epoch):
        common.save_checkpoint(args.weights, CHECKPOINT_KIND, hparams, model,
                               optimizer=optimizer.state_dict(), epoch=epoch,
                               history=history, progress=progress, command=trained_by)

    if not args.eval_only:
        # A checkpoint exists from the start and after every epoch, so Ctrl-C never loses
        # more than the epoch in progress, and --resume continues exactly.
        if start_epoch == 1:
            save(0)
        train_start, epoch = time.perf_counter(), start_epoch - 1
        try:
            for epoch in range(start_epoch, hparams["epochs"] + 1):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(hparams, epoch)
                t0 = time.perf_counter()
                train = train_epoch(model, optimizer, train_images, hparams, epoch, device)
                train_seconds = time.perf_counter() - t0
                test = evaluate(model, test_images, hparams["beta"], device)
                history.append({"epoch": epoch, "train": train, "test": test,
                                "train_seconds": round(train_seconds, 2),
                                "images_per_second": round(len(train_images) / train_seconds)})
                if epoch == 1:
                    progress.append(("At epoch 1", reconstruct(model, progress_digits)))
                save(epoch)
                print(f"epoch {epoch:3d}  train loss {train['loss']:7.2f}  test -ELBO "
                      f"{test['negative_elbo']:7.2f} (recon {test['reconstruction']:6.2f}, "
                      f"KL {test['kl']:5.2f})  {train_seconds:.1f}s", flush=True)
        except KeyboardInterrupt:
            raise common.UserError(f"interrupted during epoch {epoch}; {args.weights} holds "
                                   f"the {epoch - 1} finished epochs (continue with "
                                   f"--resume)") from None
        timings["training"] = round(time.perf_counter() - train_start, 2)

    epochs_trained = history[-1]["epoch"] if history else 0
    final = [(f"After {epochs_trained} epochs", reconstruct(model, progress_digits))]
    with common.stage(timings, "test ELBO"):
        test = evaluate(model, test_images, hparams["beta"], device)
    with common.stage(timings, "figures (samples, progress, curves)"):
        plot_samples(model, os.path.join(args.out, "samples.png"), hparams["seed"], device)
        plot_reconstruction_progress(progress_digits.cpu(), progress + final,
                                     os.path.join(args.out, "reconstruction_progress.png"))
        if history:
            plot_training_curves(history, os.path.join(args.out, "training_curves.png"),
                                 hparams.get("kl_warmup", 0.0))
    with common.stage(timings, "latent means"):
        train_features = latent_means(model, train_images)
        test_features = latent_means(model, test_images)
    with common.stage(timings, "SVM"):
        svm = svm_on_latents(train_features, train_labels, test_features, test_labels, args,
                             hparams["seed"])
        common.plot_confusion_matrix(svm["test"], os.path.join(args.out, "svm_confusion_matrix.png"),
                                     "SVM on VAE latent means, MNIST test")
    with common.stage(timings, "t-SNE"):
        _, tsne_index = common.plot_tsne(test_features, test_labels,
                                         os.path.join(args.out, "tsne_latent.png"),
                                         names=[str(d) for d in range(10)],
                                         title="t-SNE of VAE latent means (MNIST test)",
                                         n_points=args.tsne_points, seed=hparams["seed"])

    metrics = {
        "question": "Q1 VAE on MNIST",
        "command": common.command_line(),
        "trained_with": trained_by,
        "mode": "eval-only" if args.eval_only else ("resume" if args.resume else "train"),
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": common.machine_info(device)["description"],
        "torch": torch.__version__,
        "hparams": hparams,
        "epochs_trained": epochs_trained,
        "test": test,
        "svm": svm,
        "tsne_points": int(len(tsne_index)),
        "active_units": int(np.sum(test_features.var(axis=0) > 0.01)),
        "history": history,
        "timings": timings,
    }
    if history:
        metrics["train_images_per_second"] = round(
            len(history) * len(train_images) / sum(h["train_seconds"] for h in history))
    common.write_json(os.path.join(args.out, "metrics.json"), metrics)
    write_report(metrics, os.path.join(args.out, "report.md"))
    print(f"test negative ELBO {test['negative_elbo']:.2f} nats; SVM test accuracy "
          f"{svm['test']['accuracy']:.4f}; outputs in {args.out}")
    return metrics


if __name__ == "__main__":
    common.run_cli(main)
