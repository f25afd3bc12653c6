"""Question 3.2: DANN from MNIST to MNIST-M (Ganin et al., JMLR 2016, Section 5.2, Table 2 and
Figure 5) with the Figure 4(a) network: source only, DANN and train on target.

    python q3_mnistm_dann.py --data-dir DATA_DIR --svm-retrain   # the three models
    python q3_mnistm_dann.py --data-dir DATA_DIR --eval-only      # recompute into <out>/eval/
    python q3_mnistm_dann.py --report-only                        # re-render report.md
    python q3_mnistm_dann.py --data-dir DATA_DIR --resume         # continue an interrupted run
    python q3_mnistm_dann.py --data-dir DATA_DIR --download-only  # fetch MNIST and BSDS500
    python q3_mnistm_dann.py --data-dir DATA_DIR --mnistm official # the authors' MNIST-M, fetched
    python q3_mnistm_dann.py --data-dir DATA_DIR --epochs 1 --batch-size 256 --svm-retrain \\
        --svm-train-size 2000 --tsne-points 100 --validation-size 2000 --out DIR  # a short run
"""
import argparse
import hashlib
import math
import os
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (UserError, check, check_finite, note_saved, plt, positive_int, stage,
                    subsample)

SCRIPT, OUT_DEFAULT, STATE = "q3_mnistm_dann.py", "outputs/q3_mnistm", "training_state.pt"
MODELS = ["source_only", "dann", "target_only"]
TRAIN_ORDER = ["dann", "source_only", "target_only"]  # the headline model first
TITLES = {"source_only": "Source only", "dann": "DANN", "target_only": "Train on target"}
DOMAIN = {"source_only": "source", "dann": "source", "target_only": "target"}  # its labels
KINDS = {name: f"q3_mnistm_dann/{name}" for name in MODELS}
PAPER = {"source_only": 0.5225, "dann": 0.7666, "target_only": 0.9596}  # Table 2, MNIST-M
DEFAULT_EPOCHS = 27  # runs/epoch_choice: the first epoch within EPOCH_TOLERANCE of its best
EPOCH_CHOICE_RUN, EPOCH_TOLERANCE = "epoch_choice", 0.01
LR, MOMENTUM, MNISTM_SEED, MIN_TSNE_POINTS = 0.01, 0.9, 0, 10
WHERE = ("cache_dir",)  # where the data lie, not what a run computes
SVM_TOLERANCE = (0.0005, "linear SVM refit on the 100-d features; on an AMD EPYC it differed "
                          "from the committed run's Intel Xeon by up to 0.0003")
TOLERANCES = {"results.svm.": SVM_TOLERANCE, "checks.SVM last layer": SVM_TOLERANCE}

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(parser, OUT_DEFAULT)
    add = parser.add_argument
    add("--cache-dir", default="./data", help="writable folder for the MNIST-M cache (165 MB)")
    add("--mnistm", choices=["build", "official"], default="build",
        help="build MNIST-M from BSDS500 (Section 5.2.4), or read the authors' file")
    add("--no-download", action="store_true", help="never try to download")
    add("--download-only", action="store_true", help="fetch the data, then stop")
    add("--models", nargs="+", choices=MODELS, default=MODELS)
    add("--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="see runs/epoch_choice")
    add("--batch-size", type=positive_int, default=64, help="images per domain per step")
    add("--validation-size", type=positive_int, default=5000,
        help="labelled images held out of MNIST train and of MNIST-M train")
    add("--svm-retrain", action="store_true", help="retrain each last layer by a linear SVM")
    add("--svm-train-size", type=positive_int, default=20000, help="training images of the SVM")
    add("--tsne-points", type=positive_int, default=500, help="test images per domain, Fig. 5")
    return common.parse(parser, argv)

# --- Model: the Figure 4(a) network
class DANNNet(nn.Module):
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

    def last_hidden(self, x):  # the input of the last layer, which the paper refits by an SVM
        return self.label_predictor[:-1](self.features(x))

def load_model(path):
    """A trained model in eval mode; forward(x) -> (N,10), features(x) -> (N,768)."""
    state = common.load_checkpoint(path, tuple(KINDS.values()))
    return common.load_weights(DANNNet(state["hparams"]["mean"]), state, path).eval()

def as_input(images):
    """uint8 (N,28,28) grey or (N,3,28,28) -> float (N,3,28,28) in [0,1], channels-last."""
    x = images.float().div_(255)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x
    return x.contiguous(memory_format=torch.channels_last)

def pixel_mean(data):  # one per-channel mean of both domains' training images
    grey = data["source_train"].double().mean() / 255
    colour = data["target_train"].double().mean(dim=(0, 2, 3)) / 255
    n_s, n_t = len(data["source_train"]), len(data["target_train"])
    return ((n_s * grey + n_t * colour) / (n_s + n_t)).float().cpu().tolist()

# --- Losses and schedules (Section 5.2.2), one training step
def learning_rate(p):  # p: the training progress, 0 -> 1
    return LR / (1 + 10 * p) ** 0.75

def adaptation_lambda(p):
    return 2 / (1 + math.exp(-10 * p)) - 1

def dann_losses(model, source, source_labels, target, lambda_):
    features = model.features(torch.cat([source, target]))
    label_loss = F.cross_entropy(model.label_predictor(features[:len(source)]), source_labels)
    domain = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(features.device)
    logits = model.domain_classifier(common.grad_reverse(features, lambda_)).squeeze(1)
    domain_loss = F.binary_cross_entropy_with_logits(logits, domain)
    return label_loss, domain_loss, ((logits > 0).float() == domain).float().mean()

def dann_step(model, optimizer, source, source_labels, target, lambda_):
    """One SGD step of DANN on labelled source and unlabelled target images (as_input)."""
    label_loss, domain_loss, accuracy = dann_losses(model, source, source_labels, target, lambda_)
    check_finite(label_loss, "DANN label loss")
    check_finite(domain_loss, "DANN domain loss")
    optimizer.zero_grad(set_to_none=True)
    (label_loss + domain_loss).backward()
    optimizer.step()
    return label_loss.item(), domain_loss.item(), accuracy.item()

def supervised_step(model, optimizer, images, labels, what):
    label_loss = F.cross_entropy(model(images), labels)
    check_finite(label_loss, f"{what} label loss")
    optimizer.zero_grad(set_to_none=True)
    label_loss.backward()
    optimizer.step()
    return label_loss.item()

# --- Training: one loop for the three models
def epoch_batches(n, batch_size, steps, seed, epoch, stream):
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2 + stream)
    order = torch.cat([torch.randperm(n, generator=generator)
                       for _ in range(math.ceil(steps * batch_size / n))])
    return order[:steps * batch_size].view(steps, batch_size)

def train_epoch(name, model, optimizer, data, args, epoch):
    images, labels = data[f"{DOMAIN[name]}_train"], data[f"{DOMAIN[name]}_train_labels"]
    steps = len(images) // args.batch_size
    batches = epoch_batches(len(images), args.batch_size, steps, args.seed, epoch, 0)
    targets = epoch_batches(len(data["target_train"]), args.batch_size, steps, args.seed, epoch,
                            1).to(images.device) if name == "dann" else None
    batches, sums = batches.to(images.device), np.zeros(3)
    model.train()
    for i in range(steps):
        p = (epoch * steps + i) / (steps * args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(p)
        source, source_labels = as_input(images[batches[i]]), labels[batches[i]]
        if name == "dann":
            sums += dann_step(model, optimizer, source, source_labels,
                              as_input(data["target_train"][targets[i]]), adaptation_lambda(p))
        else:
            sums[0] += supervised_step(model, optimizer, source, source_labels, TITLES[name])
    means, progress = sums / steps, (epoch + 1) / args.epochs
    record = {"epoch": epoch + 1, "label_loss": means[0], "lr": learning_rate(progress)}
    if name == "dann":
        record.update(domain_loss=means[1], domain_accuracy=means[2],
                      **{"lambda": adaptation_lambda(progress)})
    return record, steps

def train_all(args, data, device, resumed, fingerprint):
    settings, mean = common.settings_of(args, exclude=WHERE), pixel_mean(data)
    done, progress = resumed.get("done", {}), resumed.get("in_progress", {})
    path, trained = os.path.join(args.out, STATE), {}
    for name in sorted(args.models, key=TRAIN_ORDER.index):
        weights = os.path.join(args.out, f"{name}.pt")
        if name in done:
            trained[name] = (load_model(weights).to(device), done[name])
            continue
        common.seed_everything(args.seed)
        model = DANNNet(mean).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        record = {"model": name, "seed": args.seed, "epochs": args.epochs, "history": [],
                  "train_seconds": 0.0, "steps": 0}
        if progress.get("name") == name:
            common.load_weights(model, progress, "the training state")
            optimizer.load_state_dict(progress["optimizer"])
            record = progress["record"]
        for epoch in range(len(record["history"]), args.epochs):
            start = time.perf_counter()
            epoch_record, steps = train_epoch(name, model, optimizer, data, args, epoch)
            record["train_seconds"] += time.perf_counter() - start
            record["steps"] += steps
            epoch_record.update(validation_accuracies(model, data, with_domain=name == "dann"))
            record["history"].append(epoch_record)
            print(f"[{name}] " + ", ".join(f"{k} {v:.4g}" for k, v in epoch_record.items()),
                  flush=True)
            common.save_training_state(path, settings, fingerprint, done=done, in_progress={
                "name": name, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "record": record})
            note_saved(f"epoch {epoch + 1} of {args.epochs} of {TITLES[name]} is saved in "
                       f"{path}; continue with --resume")
        common.save_checkpoint(weights, KINDS[name], {**settings, "model": name, "mean": mean},
                               model, record=record)
        done[name], trained[name] = record, (model, record)
        common.save_training_state(path, settings, fingerprint, done=done)
        note_saved(f"{', '.join(done)} are saved in {args.out}/; continue with --resume")
    return {name: trained[name] for name in MODELS if name in trained}

# --- Evaluation: validation every epoch; Table 2 once, after training
@torch.no_grad()
def embed(model, images, what="features", batch=1000):
    model.eval()
    fn = {"features": model.features, "hidden": model.last_hidden, "logits": model}[what]
    return torch.cat([fn(as_input(images[i:i + batch])) for i in range(0, len(images), batch)])

def predict(model, images):
    return embed(model, images, "logits").argmax(1).cpu()

@torch.no_grad()
def validation_accuracies(model, data, with_domain):  # MNIST-M's labels are an oracle
    source, target = embed(model, data["source_val"]), embed(model, data["target_val"])
    result = {f"{d}_val_accuracy": float((model.label_predictor(f).argmax(1)
                                          == data[f"{d}_val_labels"]).float().mean())
              for d, f in (("source", source), ("target", target))}
    if with_domain:
        logits = model.domain_classifier(torch.cat([source, target])).squeeze(1)
        truth = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(logits.device)
        result["val_domain_accuracy"] = float(((logits > 0).float() == truth).float().mean())
    model.train()
    return result

def svm_retrain(model, images, labels, tests, size):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    index = torch.from_numpy(subsample(len(images), size, 0)).to(images.device)
    svm = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=5000, random_state=0))
    svm.fit(embed(model, images[index], "hidden").cpu().numpy(), labels[index].cpu().numpy())
    return {f"{d}_test": float(np.mean(svm.predict(embed(model, x, "hidden").cpu().numpy())
                                       == y.cpu().numpy())) for d, (x, y) in tests.items()}

def evaluate(trained, data, args):
    tests = {"mnist": (data["source_test"], data["source_test_labels"]),
             "mnistm": (data["target_test"], data["target_test_labels"])}
    results = {"softmax": {}, **({"svm": {}} if args.svm_retrain else {})}
    for name, (model, _) in trained.items():
        results["softmax"][name] = {f"{d}_test": float((predict(model, x) == y.cpu()).float()
                                                       .mean()) for d, (x, y) in tests.items()}
        if args.svm_retrain:
            results["svm"][name] = svm_retrain(model, data[f"{DOMAIN[name]}_train"], data[
                f"{DOMAIN[name]}_train_labels"], tests, args.svm_train_size)
        print(f"[{name}] test: " + ", ".join(f"{c} {k} {r[name][k]:.4f}"
                                             for c, r in results.items() for k in r[name]))
    return results

def domain_mixing(features, domains):  # 0.5: mixed
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    folds = int(min(5, np.bincount(domains).min()))
    return float(cross_val_score(KNeighborsClassifier(5), features, domains, cv=folds).mean())

def first_epoch_near_best(history, key="target_val_accuracy"):
    """(best value, its epoch, the first epoch within EPOCH_TOLERANCE of it)."""
    best = max(history, key=lambda h: h[key])
    return best[key], best["epoch"], next(h["epoch"] for h in history
                                          if h[key] >= best[key] - EPOCH_TOLERANCE)

# --- Checks: the run's judgements, on the numbers where they are measured
def checks_of(results, training, data):
    svm = "svm" in results
    label = "SVM last layer" if svm else "softmax"
    acc = {n: r["mnistm_test"] for n, r in results["svm" if svm else "softmax"].items()}
    mix = results.get("figure5_domain_knn_accuracy", {})
    gain, mixed = (d.get("dann", 0) - d.get("source_only", 0) for d in (acc, mix))
    official = data.get("bsds_matches_official_release")
    history = (training.get("dann") or {}).get("history")
    last = history[-1]["val_domain_accuracy"] if history else None
    rows = [("BSDS500 photos are the official release", official, "fingerprint", official,
             data.get("kind", "").startswith("built")),
            (f"{label}: DANN minus source only, MNIST-M test", gain, "> 0", gain > 0, len(acc) > 1),
            (f"{label}: DANN, MNIST-M test, against the paper", acc.get("dann"),
             f">= {PAPER['dann']}", acc.get("dann", 0) >= PAPER["dann"], "dann" in acc and svm),
            ("Figure 5: domain kNN accuracy, DANN minus source only", mixed, "<= -0.1",
             mixed <= -0.1, len(mix) == 2),
            ("DANN domain classifier, validation images, last epoch", last,
             "< 0.75 (chance 0.5)", bool(history) and last < 0.75, bool(history))]
    return [check(*row[:4]) for row in rows if row[4]]

# --- Figures
def plot_mnistm_samples(data, path, n=12):
    rows = [as_input(data[f"{d}_{s}"][:n]) for s in ("train", "test") for d in ("source", "target")]
    fig, ax = plt.subplots(figsize=(n * 0.6, 2.8))
    ax.imshow(common.image_grid(torch.cat(rows).cpu(), nrow=n))
    ax.set_axis_off()
    ax.set_title("rows: MNIST train, MNIST-M train, MNIST test, MNIST-M test", fontsize=8)
    common.save_figure(fig, path)

CURVES = [("label_loss", "label loss (training batches)"),
          ("domain_accuracy", "domain classifier accuracy\n(training batches; dashed: validation)"),
          ("source_val_accuracy", "MNIST validation accuracy"),
          ("target_val_accuracy", "MNIST-M validation accuracy (oracle)")]
COLOURS = {"source_only": "tab:blue", "dann": "tab:red", "target_only": "tab:green"}

def plot_curves(records, path):
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for ax, (key, title) in zip(axes, CURVES):
        for name in [n for n in MODELS if n in records]:  # the legend's order
            for k, style in ((key, "-"), ("val_domain_accuracy", "--")):
                points = [(h["epoch"], h[k]) for h in records[name]["history"]
                          if h.get(k) is not None]
                if points and (style == "-" or key == "domain_accuracy"):
                    ax.plot(*zip(*points), style, marker="o", ms=3, color=COLOURS[name],
                            label=TITLES[name] if style == "-" else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[1].axhline(0.5, color="grey", ls=":", lw=0.8)
    common.save_figure(fig, path)

def draw_figures(trained, data, args, folder):
    plot_mnistm_samples(data, os.path.join(folder, "mnistm_samples.png"))
    picks = {d: subsample(len(data[f"{d}_test"]), args.tsne_points, seed)
             for seed, d in enumerate(("source", "target"))}
    domains = np.r_[np.zeros(len(picks["source"]), int), np.ones(len(picks["target"]), int)]
    digits = np.r_[tuple(data[f"{d}_test_labels"].cpu().numpy()[i] for d, i in picks.items())]
    embeddings, mixing = {}, {}
    for name in [n for n in ("source_only", "dann") if n in trained]:
        features = torch.cat([embed(trained[name][0], data[f"{d}_test"][torch.from_numpy(i).to(
            data[f"{d}_test"].device)]) for d, i in picks.items()]).cpu().numpy()
        embeddings[name] = common.tsne_embed(features, seed=0)
        mixing[name] = domain_mixing(features, domains)
    figure5 = [("domain", domains, ["MNIST (source)", "MNIST-M (target)"], ["blue", "red"]),
               ("digits", digits, list("0123456789"), None)]
    for file, values, names, colors in figure5 if embeddings else []:  # (a), (b) per model
        fig, axes = plt.subplots(1, len(embeddings), figsize=(6 * len(embeddings), 5.6),
                                 squeeze=False)
        for ax, letter, (name, xy) in zip(axes[0], "ab", embeddings.items()):
            common.scatter_by_label(ax, xy, values, names, colors, f"({letter}) {TITLES[name]}",
                                    size=7)
        common.save_figure(fig, os.path.join(folder, f"figure5_tsne_{file}.png"))
    if records := {name: record for name, (_, record) in trained.items() if record}:
        plot_curves(records, os.path.join(folder, "training_curves.png"))
    for name, (model, _) in trained.items():
        common.plot_confusion_matrix(common.classification_metrics(
            data["target_test_labels"].cpu().numpy(), predict(model, data["target_test"]).numpy(),
            list("0123456789")), os.path.join(folder, f"confusion_mnistm_{name}.png"),
            f"{TITLES[name]} on MNIST-M test")
    return mixing

# --- The report: a template filled from metrics.json and runs/*/metrics.json
REPORT = """# Question 3.2: DANN from MNIST to MNIST-M (Ganin et al., JMLR 2016, Section 5.2)

Command: `{command}`  
Machine: {machine[description]}
{warnings}
## Table 2: test accuracy, this run (seed {settings[seed]}, {settings[epochs]} epochs)

| method | MNIST, softmax | MNIST-M, softmax | MNIST, SVM | MNIST-M, SVM | MNIST-M, paper (SVM) |
|---|---|---|---|---|---|
{table}

Paper: Ganin et al. (2016), Table 2, Section 5.2 (pp. 20-24), the last layer of every method \
retrained by a linear SVM. SVM here: LinearSVC (C = 1) on the standardised input of the last \
layer, fitted on {settings[svm_train_size]} labelled training images of the model ("-": not \
run); softmax: the network's own output. What differs: MNIST-M here is {data[kind]}; \
{settings[epochs]} epochs, a count set on MNIST-M validation labels (below), which the paper's \
unsupervised protocol does not have. The table is one training run.

Like with like, the {column} column against the paper's: DANN gains {gain} over source only \
(paper {paper_gain}) and closes {closed} of the gap to train on target (paper {paper_closed}).

## Checks

{checks}

## The epoch count was set on target labels

{epoch_choice}

## Other runs

{runs}

## MNIST-M, Figure 5, training curves, confusion matrices (MNIST-M test)

MNIST-M {data[target_train]} train / {data[target_val]} validation / {data[target_test]} test, \
MNIST {data[source_train]} / {data[source_val]} / {data[source_test]}; validation images are \
held out of training (the same digits in both domains); the test sets are scored once, after \
training. Figure 5: t-SNE of the 768-d features of {settings[tsne_points]} test images per \
domain (blue MNIST, red MNIST-M); a 5-nearest-neighbour domain classifier on them (5-fold, 0.5 = \
mixed) scores {mixing}.

![samples](mnistm_samples.png)
![Figure 5 by domain](figure5_tsne_domain.png)
![Figure 5 by digit](figure5_tsne_digits.png)
![training curves](training_curves.png)
![source only](confusion_mnistm_source_only.png)
![DANN](confusion_mnistm_dann.png)
![train on target](confusion_mnistm_target_only.png)

Seconds: data {timings[data]:.0f}, training {timings[training]:.0f}, evaluation \
{timings[evaluation]:.0f}, figures {timings[figures]:.0f}, total {timings[total]:.0f}.

## Choices where the paper is silent

- MNIST-M: a uniformly random 28x28 crop of a uniformly chosen photo, |crop - grey digit| per \
channel; training digits over the BSDS500 train photos, test digits over the test photos; \
construction seed {mnistm_seed}, independent of the training seed.
- {settings[batch_size]} labelled (and, for DANN, as many target) images a step; SGD, momentum \
{momentum}, lr_p (mu_0 = {lr}) and lambda_p driven by p = step / total steps; PyTorch's default \
initialisation; one per-channel mean of both domains' training images subtracted; domain loss: \
mean logistic loss, weight 1.
"""
CHOICE = """The default {epochs} epochs come from the DANN run `{command}`: the first \
epoch whose MNIST-M validation accuracy is within {tolerance} of the run's best \
({best:.4f}, epoch {best_epoch}) is epoch {near}; the curve is in its metrics.json. Those \
labels are target labels, an oracle the paper's unsupervised protocol does not have. That run \
also scored the MNIST-M test set, once, after training: {test:.4f}."""
RUN_COLUMNS = [("models", "settings.models", "{}"), ("seed", "settings.seed", "{}"),
               ("epochs", "settings.epochs", "{}"), ("DANN MNIST-M, softmax",
               "results.softmax.dann.mnistm_test", "{:.4f}"), ("DANN MNIST-M, SVM last layer",
               "results.svm.dann.mnistm_test", "{:.4f}")]

def epoch_choice(out):
    path = os.path.join(out, "runs", EPOCH_CHOICE_RUN, "metrics.json")
    if not os.path.isfile(path):
        return f"No run is kept in runs/{EPOCH_CHOICE_RUN}/."
    run = common.read_metrics(path, SCRIPT)
    best, best_epoch, near = first_epoch_near_best(run["training"]["dann"]["history"])
    return CHOICE.format(epochs=DEFAULT_EPOCHS, tolerance=EPOCH_TOLERANCE, best=best,
                         best_epoch=best_epoch, near=near, command=run["command"],
                         test=run["results"]["softmax"]["dann"]["mnistm_test"])

def closed_gap(acc):
    return f"{(acc['dann'] - acc['source_only']) / (acc['target_only'] - acc['source_only']):.0%}"

def render_report(metrics, out):
    r = metrics["results"]
    column = "svm" if "svm" in r else "softmax"
    ours = {n: v["mnistm_test"] for n, v in r[column].items()}
    rows = {n: [f"{r[k][n][d]:.4f}" if n in r.get(k, {}) else "-" for k in ("softmax", "svm")
                for d in ("mnist_test", "mnistm_test")] + [f"{PAPER[n]:.4f}"] for n in MODELS}
    return common.fill(
        REPORT, metrics, command=common.shown_command(metrics["command"]),
        warnings="".join(f"\n**Warning: {w}**\n" for w in metrics["data"].get("warnings", [])),
        table="\n".join(f"| {TITLES[n]} | {' | '.join(row)} |" for n, row in rows.items()),
        column=column.replace("svm", "SVM last layer"), closed=closed_gap(ours),
        gain=f"{ours['dann'] - ours['source_only']:+.4f}",
        paper_gain=f"{PAPER['dann'] - PAPER['source_only']:+.4f}", paper_closed=closed_gap(PAPER),
        checks=common.checks_table(metrics["checks"]), epoch_choice=epoch_choice(out),
        runs=common.runs_table(out, SCRIPT, RUN_COLUMNS) or "None.",
        mixing=", ".join(f"{v:.3f} ({TITLES[n]})" for n, v in
                         r["figure5_domain_knn_accuracy"].items()),
        mnistm_seed=MNISTM_SEED, momentum=MOMENTUM, lr=LR)

# --- Main
def check_sizes(args, data):
    for domain in ("source", "target"):
        if (n := len(data[f"{domain}_train"])) < args.batch_size:
            raise UserError(f"--batch-size {args.batch_size} is more than the {n} {domain} "
                            f"training images left by --validation-size {args.validation_size}")
    for name in args.models if args.svm_retrain else []:
        labels = data[f"{DOMAIN[name]}_train_labels"].cpu()
        if len(labels[subsample(len(labels), args.svm_train_size, 0)].unique()) < 2:
            raise UserError(f"--svm-train-size {args.svm_train_size} gives the SVM of "
                            f"{TITLES[name]} one digit class only; give more images")
    if args.tsne_points < MIN_TSNE_POINTS:
        raise UserError(f"--tsne-points {args.tsne_points} is too few for Figure 5; give at "
                        f"least {MIN_TSNE_POINTS}")

def measure(args, device, trained, data, info, folder, timings):
    with stage(timings, "evaluation"):
        results = evaluate(trained, data, args)
    with stage(timings, "figures"):
        results["figure5_domain_knn_accuracy"] = draw_figures(trained, data, args, folder)
    training = {name: record for name, (_, record) in trained.items()}
    mean = next(iter(trained.values()))[0].mean.view(-1).tolist()
    metrics = common.record(SCRIPT, args, device, info, timings, checks_of(
        results, training, info), results, training=training, pixel_mean=mean)
    where = metrics["settings"]  # no machine path in a metrics.json
    where.update({key: common.portable(where[key], key.upper()) for key in WHERE if where[key]})
    common.write_json(os.path.join(folder, "metrics.json"), metrics)
    return metrics

def train_and_report(args, device):
    timings = {}
    with stage(timings, "data"):
        domains, info = load_domains(args)
        resumed = common.load_training_state(os.path.join(args.out, STATE), args, info[
            "fingerprint"]) if args.resume else {}
        data = split_data(domains, args, device, info)
    check_sizes(args, data)
    with stage(timings, "training"):
        trained = train_all(args, data, device, resumed, info["fingerprint"])
    note_saved(f"every model is saved in {args.out}/; --eval-only evaluates them")
    metrics = measure(args, device, trained, data, info, args.out, timings)
    if set(args.models) == set(MODELS):  # a run of fewer models is a row of a runs table
        common.write_text(os.path.join(args.out, "report.md"), render_report(metrics, args.out))
    os.remove(os.path.join(args.out, STATE))  # the run is complete: nothing left to resume
    print(f"wrote {args.out}/")

def eval_only(args, device):
    committed = common.read_metrics(os.path.join(args.out, "metrics.json"), SCRIPT)
    states = {n: common.load_checkpoint(os.path.join(args.out, f"{n}.pt"), KINDS[n])
              for n in committed["settings"]["models"]}
    for key, value in next(iter(states.values()))["hparams"].items():  # evaluate as it ran
        if key not in args.given and key not in WHERE and hasattr(args, key):
            setattr(args, key, value)
    args.models, timings = list(states), {}
    eval_dir = common.prepare_out(os.path.join(args.out, "eval"))
    with stage(timings, "data"):
        domains, info = load_domains(args)
        data = split_data(domains, args, device, info)
    trained = {n: (load_model(os.path.join(args.out, f"{n}.pt")).to(device), s.get("record"))
               for n, s in states.items()}
    metrics = measure(args, device, trained, data, info, eval_dir, timings)
    common.compare_with_committed(metrics, committed, eval_dir, TOLERANCES)

def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        return common.report_only(args.out, SCRIPT, render_report)
    if args.download_only:
        common.load_mnist(args.data_dir)
        where = args.data_dir if args.mnistm == "official" else find_bsds(args)
        if args.mnistm == "official":
            load_official_mnistm(args.data_dir, args.cache_dir, download=True)
        return print(f"MNIST is in {args.data_dir}/MNIST/raw/, MNIST-M's source in {where}/")
    device = common.choose_device(args.device)
    common.prepare_out(args.out)
    return eval_only(args, device) if args.eval_only else train_and_report(args, device)

# --- Data: MNIST, and MNIST-M built from BSDS500 photos (Section 5.2.4) or the authors' file
BERKELEY = "eecs.berkeley.edu/Research/Projects/CS/vision/grouping/BSR/BSR_bsds500.tgz"
BSDS_SOURCES = {  # archive: (its top folder, its sources in the order tried)
    "BSR_bsds500.tgz": ("BSR", (f"https://www2.{BERKELEY}", f"http://www.{BERKELEY}")),
    "BSDS500-master.zip": ("BSDS500-master",
                           ("https://github.com/BIDS/BSDS500/archive/refs/heads/master.zip",))}
# SHA-256 over "split/name:" + SHA-256(bytes) of the official release's 200 train and 200 test
# photos, train first, by name (no checksum of the archives is published)
BSDS_FINGERPRINT = "02dac0fc5b9a349c7695cdc915cd73acb66f543de5d682bf2c1ecfe57829e38e"
MNISTM_SOURCES = (  # public copies of the authors' mnist_m.tar.gz, each published with this md5
    "https://cornell.box.com/shared/static/jado7quprg6hzzdubvwzh9umr75damwi",  # pytorch-adapt's
    "https://drive.google.com/file/d/0B_tExHiYS-0veklUZHFYT19KYjg")  # the authors' own link
MNISTM_MD5 = "859df31c91afe82e80e5012ba928f279"

def load_domains(args):
    """{domain: (train images, labels, test images, labels)}, the data's record."""
    mnist = common.load_mnist(args.data_dir, download=not args.no_download)
    if args.mnistm == "build":
        arrays, info = load_built_mnistm(args, [(x.numpy(), y.numpy().astype(np.uint8))
                                                for x, y in mnist])
    else:
        arrays, info = load_official_mnistm(args.data_dir, args.cache_dir,
                                             download=not args.no_download)
    for warning in info.get("warnings", []):
        print(f"warning: {warning}", flush=True)
    target = [torch.from_numpy(arrays[f"{s}_{k}"]) for s in ("train", "test")
              for k in ("images", "labels")]
    target[0], target[2] = target[0].permute(0, 3, 1, 2), target[2].permute(0, 3, 1, 2)
    info["fingerprint"] = common.fingerprint(mnist[0][0], target[0], target[2])
    return {"source": (*mnist[0], *mnist[1]), "target": target}, info

def split_data(domains, args, device, info):
    """The same --validation-size indices held out of both training sets; tensors on device."""
    data = {}
    for domain, (train, train_labels, test, test_labels) in domains.items():
        held = torch.zeros(len(train), dtype=torch.bool)
        held[subsample(len(train), args.validation_size, seed=0)] = True
        train, train_labels = train.contiguous(), train_labels.long()
        for split, images, labels in (("train", train[~held], train_labels[~held]),
                                      ("val", train[held], train_labels[held]),
                                      ("test", test.contiguous(), test_labels.long())):
            data[f"{domain}_{split}"], data[f"{domain}_{split}_labels"] = images, labels
            info[f"{domain}_{split}"] = len(images)
    return {k: v.to(device) for k, v in data.items()}

CACHE_KEYS = {"train_images", "train_labels", "test_images", "test_labels"}

def cached(path, build):
    """The arrays of the npz at `path`, else (also if it is unreadable) build() saved there."""
    if os.path.isfile(path):
        try:
            with np.load(path) as f:
                if set(f.files) == CACHE_KEYS:
                    return {k: f[k] for k in f.files}
            problem = "other arrays"
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            problem = type(error).__name__
        print(f"warning: the MNIST-M cache {path} cannot be used ({problem}); rebuilding it")
    arrays = build()
    common.prepare_out(os.path.dirname(path), "--cache-dir")
    common.atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
    return arrays

def build_mnistm(digits, photos, seed=0):
    """|crop - digit| per channel: each digit (uint8 N,28,28) over a uniformly random 28x28 crop
    of a uniformly chosen photo (uint8 H,W,3); uint8 (N,28,28,3)."""
    n, h, w = digits.shape
    rng = np.random.default_rng(seed)
    patches = np.empty((n, h, w, 3), dtype=np.uint8)
    for i, k in enumerate(rng.integers(len(photos), size=n)):
        top, left = (rng.integers(photos[k].shape[j] - s + 1) for j, s in ((0, h), (1, w)))
        patches[i] = photos[k][top:top + h, left:left + w]
    return np.abs(patches.astype(np.int16) - digits[..., None].astype(np.int16)).astype(np.uint8)

def find_bsds(args):
    """DATA_DIR/BSDS500, else unpacked there from a release archive (fetched if missing)."""
    root, failed = os.path.join(args.data_dir, "BSDS500"), []
    if all(os.path.isdir(os.path.join(root, "images", s)) for s in ("train", "test")):
        return root
    for name, (top, sources) in BSDS_SOURCES.items():
        archive = os.path.join(args.data_dir, name)
        try:
            if not os.path.isfile(archive) and not args.no_download:
                common.download_first(sources, args.data_dir, name)
        except UserError as error:
            failed.append(str(error))
        if os.path.isfile(archive):
            with tempfile.TemporaryDirectory(dir=args.data_dir, prefix=".tmp-") as tmp:
                common.extract(archive, tmp)
                os.rename(os.path.join(tmp, top, "BSDS500", "data"), root)
            os.remove(archive)
            return find_bsds(args)
    raise UserError(f"BSDS500 is missing ({'; '.join(failed) or 'downloads are off'}); put "
                    f"{' or '.join(BSDS_SOURCES)} into {args.data_dir}/")

def read_photos(paths):
    from PIL import Image
    photos = []
    for path in paths:
        try:
            photos.append(np.asarray(Image.open(path).convert("RGB")))
        except Exception:
            raise UserError(f"BSDS500 photo {path} cannot be read") from None
        if min(photos[-1].shape[:2]) < 28:
            raise UserError(f"BSDS500 photo {path} is smaller than 28x28")
    return photos

def load_built_mnistm(args, mnist):
    from PIL import Image
    (train_digits, train_labels), (test_digits, test_labels) = mnist
    root = find_bsds(args)
    photos = {s: [os.path.join(root, "images", s, f) for f in sorted(os.listdir(
        os.path.join(root, "images", s))) if f.lower().endswith((".jpg", ".jpeg", ".png"))]
        for s in ("train", "test")}
    key, digest = hashlib.sha1(train_digits.tobytes() + test_digits.tobytes()), hashlib.sha256()
    for split, path in [(s, p) for s in photos for p in photos[s]]:
        if not os.path.isfile(path):
            raise UserError(f"BSDS500 photo {path} is a broken link or not a file; remove it")
        key.update(f"{split}/{os.path.basename(path)}:{os.path.getsize(path)}".encode())
        digest.update(f"{split}/{os.path.basename(path)}:".encode())
        digest.update(hashlib.sha256(open(path, "rb").read()).digest())
    key.update(f"seed{MNISTM_SEED}".encode())
    name = f"MNIST-M/mnistm_built_{key.hexdigest()[:12]}.npz"
    arrays = cached(os.path.join(args.cache_dir, name), lambda: {
        "train_images": build_mnistm(train_digits, read_photos(photos["train"]), MNISTM_SEED),
        "test_images": build_mnistm(test_digits, read_photos(photos["test"]), MNISTM_SEED + 1),
        "train_labels": train_labels, "test_labels": test_labels})
    warnings = []
    if digest.hexdigest() != BSDS_FINGERPRINT:
        grey = [os.path.basename(p) for s in photos for p in photos[s]
                if len(Image.open(p).getbands()) < 3]
        warnings.append(f"the BSDS500 photos are not the official release ({len(photos['train'])} "
                        f"train / {len(photos['test'])} test, the release has 200 / 200; "
                        f"{len(grey)} grey{': ' * bool(grey)}{', '.join(grey)}): this MNIST-M is "
                        f"not the paper's")
    return arrays, {"kind": "built from BSDS500 (|patch - digit|, grey digits, 28x28 crops)",
                    "bsds_dir": "DATA_DIR/BSDS500", "cache": f"CACHE_DIR/{name}",
                    "bsds_matches_official_release": not warnings, "warnings": warnings}

def read_official(root, split, lines):
    from PIL import Image
    images, labels = [], []
    listing = os.path.join(root, f"mnist_m_{split}_labels.txt")
    for number, line in enumerate(lines, 1):
        name, _, label = line.strip().partition(" ")
        if not line.strip():
            continue
        try:
            if label not in tuple("0123456789"):
                raise ValueError(label)
            images.append(np.asarray(Image.open(f"{root}/mnist_m_{split}/{name}").convert(
                "RGB").resize((28, 28), Image.BILINEAR)))
        except Exception:
            raise UserError(f"{listing} line {number} is not '<name>.png <digit>' of an image "
                            f"there") from None
        labels.append(int(label))
    if not images:
        raise UserError(f"{listing} is missing or lists no images")
    return {f"{split}_images": np.stack(images), f"{split}_labels": np.uint8(labels)}

def load_official_mnistm(data_dir, cache_dir, download=False):
    """The authors' mnist_m/ or mnist_m.tar.gz (fetched if missing), 32x32 resized to 28x28."""
    roots = (os.path.join(data_dir, "mnist_m"), os.path.join(cache_dir, "mnist_m"))
    archive, hint = os.path.join(data_dir, "mnist_m.tar.gz"), (
        f"put mnist_m.tar.gz (or its extracted mnist_m/) into {data_dir}/")
    if not any(os.path.isdir(os.path.join(r, "mnist_m_train")) for r in roots):
        if download and not os.path.isfile(archive):
            common.download_first(MNISTM_SOURCES, data_dir, "mnist_m.tar.gz", md5=MNISTM_MD5,
                                  offline_hint=hint)
        if os.path.isfile(archive):
            common.extract(archive, cache_dir)
    root = next((r for r in roots if os.path.isdir(os.path.join(r, "mnist_m_train"))), None)
    if root is None:
        raise UserError(f"official MNIST-M not found: {hint}")
    listings = {s: os.path.join(root, f"mnist_m_{s}_labels.txt") for s in ("train", "test")}
    lines = {s: open(p).read().split("\n") if os.path.isfile(p) else [] for s, p in
             listings.items()}
    name = f"MNIST-M/mnistm_official_{hashlib.sha1(str(lines).encode()).hexdigest()[:12]}.npz"
    arrays = cached(os.path.join(cache_dir, name), lambda: {
        k: v for s in lines for k, v in read_official(root, s, lines[s]).items()})
    return arrays, {"kind": "the authors' mnist_m.tar.gz, 32x32 resized to 28x28 (bilinear)",
                    "dir": common.portable(root, "DATA_DIR"), "cache": f"CACHE_DIR/{name}"}

if __name__ == "__main__":
    common.run_cli(main)
