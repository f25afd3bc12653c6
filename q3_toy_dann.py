"""Question 3.1: shallow DANN on the inter-twinning moons (Ganin et al., JMLR 2016,
Section 5.1.1, Algorithm 1, Figure 2), beside a standard network trained the same way.

    python q3_toy_dann.py --lambda 6                  # text's size: 150 examples per class
    python q3_toy_dann.py --lambda 6 --seeds 5        # mean and spread over 5 seeds
    python q3_toy_dann.py --n-per-class 75            # the authors' Figure-2 setting exactly
    python q3_toy_dann.py --eval-only                 # redraw everything from nn.pt / dann.pt

Seeds: `--seed` (default 42, the authors') draws the initial weights and the random target
examples of Algorithm 1 with NumPy's legacy generator, in the authors' order; `--data-seed`
(default 1) is make_moons' random_state of the source, +1 for the target (the authors' 1 and 2).
With `--seeds K` the k-th repetition uses seed + k and data seed + 2k. The data are generated,
so --data-dir is not used.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import (UserError, add_common_args, check_finite, choose_device, command_line,
                    classification_metrics, finite_float, grad_reverse, load_checkpoint,
                    load_weights, nonnegative_float, positive_float, positive_int, run_cli,
                    save_checkpoint, save_figure, stage, write_json, write_text)
from common import machine_info

import matplotlib.pyplot as plt  # noqa: E402  (common.py has selected the Agg backend)
from matplotlib.colors import ListedColormap  # noqa: E402

OUT = "outputs/q3_toy"
KIND = {"nn": "q3_toy_dann/nn", "dann": "q3_toy_dann/dann"}
MODELS = ("nn", "dann")
TITLE = {"nn": "Standard NN", "dann": "DANN"}
HELD_OUT_SEED = 1_000_000  # held-out samples: make_moons random_state data_seed + this (+1)
UNLABELLED = -100          # cross_entropy's ignore_index: the target example has no label
DTYPE = torch.float64      # the authors' NumPy precision
PAD_TO = 8                 # networks per lockstep batch, a multiple of the CPU's vector width


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    summary, _, details = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-per-class", type=positive_int, default=150,
                   help="source (and target) examples per moon (default 150, the text; "
                        "the authors' code: 75)")
    p.add_argument("--angle", type=finite_float, default=35.0,
                   help="target rotation in degrees, counter-clockwise (default 35)")
    p.add_argument("--noise", type=nonnegative_float, default=0.05,
                   help="make_moons noise (default 0.05, the authors' code)")
    p.add_argument("--hidden-units", type=positive_int, default=15, help="D (default 15)")
    p.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=nonnegative_float,
                   default=6.0,
                   help="adaptation weight lambda, both models (default 6)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="mu (default 0.05)")
    p.add_argument("--epochs", type=positive_int, default=500,
                   help="passes over the source sample (default 500)")
    p.add_argument("--data-seed", type=positive_int, default=1,
                   help="make_moons random_state of the source; the target uses +1 (default 1)")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="repeat everything over K seeds and report mean and std (default 1)")
    p.add_argument("--test-per-class", type=positive_int, default=1000,
                   help="held-out examples per class and domain (default 1000)")
    p.add_argument("--weights", nargs="+", default=None,
                   help="with --eval-only: nn.pt and/or dann.pt (default: the two in --out)")
    add_common_args(p, OUT, seed_default=42, data_dir=False)  # 42: the authors' seed
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# Data: two moons; the target is a second sample rotated about the source mean
# ---------------------------------------------------------------------------------------
def moons(n_per_class, random_state, noise=0.05):
    from sklearn.datasets import make_moons

    return make_moons(2 * n_per_class, noise=noise, random_state=random_state)


def rotation(angle):
    theta = np.deg2rad(angle)
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def make_domains(n_per_class, seed, angle=35.0, noise=0.05, centre=None):
    """(Xs, ys, Xt, yt): source moons from random_state `seed`, target moons from `seed + 1`
    rotated by `angle` degrees counter-clockwise about the source mean; both centred on that
    mean and scaled by 2 (the authors' code). `centre` (raw coordinates) replaces the mean,
    so that held-out samples share the training sample's coordinates."""
    Xs, ys = moons(n_per_class, seed, noise)
    Xt, yt = moons(n_per_class, seed + 1, noise)
    centre = Xs.mean(axis=0) if centre is None else np.asarray(centre)
    Xs = 2 * (Xs - centre)
    Xt = 2 * (Xt - centre) @ rotation(angle).T
    return Xs, ys, Xt, yt


def make_data(n_per_class, data_seed, angle, noise, test_per_class):
    """The training domains and held-out domains (other random states) in the same coordinates."""
    train = make_domains(n_per_class, data_seed, angle, noise)
    centre = moons(n_per_class, data_seed, noise)[0].mean(axis=0)
    test = make_domains(test_per_class, data_seed + HELD_OUT_SEED, angle, noise, centre)
    return {"train": train, "test": test}


# ---------------------------------------------------------------------------------------
# Model: Algorithm 1's shallow network
# ---------------------------------------------------------------------------------------
class ShallowNetwork(nn.Module):
    """G_f(x) = sigm(b + W x) with D hidden units, G_y = softmax(c + V G_f(x)), and the
    logistic domain regressor G_d = sigm(d + u^T G_f(x)) (1 = source, 0 = target)."""

    def __init__(self, hidden_units=15, n_features=2, n_classes=2):
        super().__init__()
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=DTYPE))  # noqa: E731
        self.W, self.b = zeros(hidden_units, n_features), zeros(hidden_units)
        self.V, self.c = zeros(n_classes, hidden_units), zeros(n_classes)
        self.u, self.d = zeros(hidden_units), zeros(())

    def features(self, x):
        return torch.sigmoid(F.linear(x.to(DTYPE), self.W, self.b))

    def forward(self, x):
        """(N, 2) points -> (N, 2) label logits (softmax gives G_y)."""
        return F.linear(self.features(x), self.V, self.c)

    def domain_logit(self, x):
        """(N, 2) points -> (N,) logits of G_d; positive means 'source'."""
        return self.features(x) @ self.u + self.d


def init_network(network, rng):
    """Algorithm 1's init, in the authors' order of draws: W then V uniform in
    +-sqrt(6 / (fan_in + fan_out)); b, c, u, d = 0."""
    D, m = network.W.shape
    L = network.V.shape[0]
    with torch.no_grad():
        network.W.copy_(torch.from_numpy(np.sqrt(6 / (m + D)) * (2 * rng.rand(D, m) - 1)))
        network.V.copy_(torch.from_numpy(np.sqrt(6 / (D + L)) * (2 * rng.rand(L, D) - 1)))
        for p in (network.b, network.c, network.u, network.d):
            p.zero_()
    return network


def load_model(path):
    """The ShallowNetwork saved in `path` (nn.pt or dann.pt): (N,2) points -> (N,2) logits."""
    state = load_checkpoint(path, tuple(KIND.values()))
    h = state["hparams"]
    return load_weights(ShallowNetwork(h["hidden_units"]), state, path).eval()


# ---------------------------------------------------------------------------------------
# Losses and Algorithm 1's update, for M independent networks at once
#
# Per-sample SGD is 150,000 tiny steps per model, so its cost is per-op overhead, not
# arithmetic. All networks (standard NN and DANN, every seed) therefore train in lockstep:
# their parameters are stacked on a leading axis, each layer is one batched op, and since
# the networks share no parameter, the gradient of the summed losses is, for each network,
# exactly its own Algorithm-1 gradient.
# ---------------------------------------------------------------------------------------
def stack_parameters(networks):
    """Leaf tensors of all networks laid out for batched matmuls (x @ W^T):
    W^T (M,m,D), b (M,1,D), V^T (M,D,L), c (M,1,L), u (M,D,1), d (M,1,1)."""
    def stacked(get):
        return torch.stack([get(n).detach() for n in networks]).clone().requires_grad_()

    return [stacked(lambda n: n.W.T), stacked(lambda n: n.b[None]),
            stacked(lambda n: n.V.T), stacked(lambda n: n.c[None]),
            stacked(lambda n: n.u[:, None]), stacked(lambda n: n.d.reshape(1, 1))]


def unstack_parameters(params, networks):
    Wt, b, Vt, c, u, d = (p.detach() for p in params)
    with torch.no_grad():
        for k, n in enumerate(networks):
            n.W.copy_(Wt[k].T), n.b.copy_(b[k, 0]), n.V.copy_(Vt[k].T), n.c.copy_(c[k, 0])
            n.u.copy_(u[k, :, 0]), n.d.copy_(d[k, 0, 0])
    return networks


def forward(params, x):
    """x (M,N,2) -> hidden G_f (M,N,D) and label logits (M,N,L)."""
    Wt, b, Vt, c, _, _ = params
    hidden = torch.sigmoid(torch.baddbmm(b, x, Wt))
    return hidden, torch.baddbmm(c, hidden, Vt)


def domain_logits(params, hidden):
    """hidden (M,N,D) -> logits of the domain regressor G_d (M,N,1)."""
    return torch.baddbmm(params[5], hidden, params[4])


def algorithm1_losses(params, pairs, labels, domains, adversarial, lambda_):
    """Ly on each network's source example and Ld on its (source, target) pair, summed over
    networks. pairs (M,2,2): x_i then x_j; labels (2M,): y_i then UNLABELLED; domains
    (M,2,1): 1 then 0; adversarial (M,1,1): True for DANN. A DANN's hidden layer receives
    -lambda x the domain gradient (the reversal layer); a standard NN's receives none."""
    hidden, label_logits = forward(params, pairs)
    loss_y = F.cross_entropy(label_logits.flatten(0, 1), labels,
                             ignore_index=UNLABELLED, reduction="sum")
    to_regressor = torch.where(adversarial, grad_reverse(hidden, lambda_), hidden.detach())
    loss_d = F.binary_cross_entropy_with_logits(domain_logits(params, to_regressor), domains,
                                                reduction="sum")
    return loss_y, loss_d


def sgd_step(params, pairs, labels, domains, adversarial, lambda_, lr):
    """One inner iteration of Algorithm 1: W, b, V, c descend on Ly - lambda Ld with step mu
    (the minus comes from the reversal layer), u, d descend on Ld with step mu * lambda."""
    grads = torch.autograd.grad(algorithm1_losses(params, pairs, labels, domains,
                                                  adversarial, lambda_), params)
    with torch.no_grad():
        for p, g, step in zip(params, grads, (lr,) * 4 + (lr * lambda_,) * 2):
            p.sub_(g, alpha=step)


# ---------------------------------------------------------------------------------------
# Training loop: every source example in turn, with one uniformly random target example
# ---------------------------------------------------------------------------------------
def epoch_history(params, Xs, ys, Xt, yt):
    """Mean Ly, mean Ld, source / target / domain accuracy of every network (no grad)."""
    with torch.no_grad():
        hidden, logits = forward(params, torch.cat((Xs, Xt), 1))
        n = Xs.shape[1]
        domain = domain_logits(params, hidden)[..., 0]
        is_source = torch.arange(2 * n) < n
        loss_y = F.cross_entropy(logits[:, :n].transpose(1, 2), ys, reduction="none").mean(1)
        loss_d = F.binary_cross_entropy_with_logits(
            domain, is_source.to(DTYPE).expand_as(domain), reduction="none").mean(1)
        pred = logits.argmax(-1)
        return {"label_loss": loss_y.tolist(), "domain_loss": loss_d.tolist(),
                "source_accuracy": (pred[:, :n] == ys).double().mean(1).tolist(),
                "target_accuracy": (pred[:, n:] == yt).double().mean(1).tolist(),
                "domain_accuracy": ((domain > 0) == is_source).double().mean(1).tolist()}


def train(networks, adversarial, rngs, domains_per_network, args, out, state=None):
    """Train all networks in lockstep for args.epochs; network k uses rngs[k % K] and
    domains_per_network[k]. Saves <out>/train_state.pt every 50 epochs and on Ctrl-C."""
    K, real = len(rngs), len(networks)
    # Copies of network 0 (dropped at the end) pad the batch to a multiple of PAD_TO: every
    # element then goes through the same vectorised CPU kernels, so a network's numbers do
    # not depend on how many networks train beside it (bit for bit).
    extra = -real % PAD_TO
    seed_of = np.array([k % K for k in range(real)] + [0] * extra)
    adversarial = list(adversarial) + [False] * extra
    domains_per_network = list(domains_per_network) + [domains_per_network[0]] * extra
    M = real + extra
    Xs, ys, Xt, yt = (torch.from_numpy(np.stack([d[i] for d in domains_per_network]))
                      for i in range(4))
    Xs, Xt = Xs.to(DTYPE), Xt.to(DTYPE)
    n, n_target = Xs.shape[1], Xt.shape[1]
    params = stack_parameters(networks + [networks[0]] * extra)
    adversarial = torch.tensor(adversarial).view(M, 1, 1)
    domains = torch.tensor([1.0, 0.0], dtype=DTYPE).view(1, 2, 1).expand(M, 2, 1)
    labels = torch.stack((ys, torch.full_like(ys, UNLABELLED)), 2)  # (M, n, 2)
    labels = labels.transpose(0, 1).reshape(n, 2 * M)               # row i: step i's labels
    history, start = [], 0
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        for rng, rng_state in zip(rngs, state["rngs"]):
            rng.set_state(rng_state)
        history, start = state["history"], state["epoch"]
    path = os.path.join(out, "train_state.pt")

    def snapshot(epoch):
        return {"epoch": epoch, "params": [p.detach().clone() for p in params],
                "rngs": [rng.get_state() for rng in rngs]}

    def save_state(snap):
        save_checkpoint(path, "q3_toy_dann/train_state", train_hparams(args), nn.Module(),
                        history=history[:snap["epoch"]], **snap)

    snap = snapshot(start)
    try:
        for epoch in range(start, args.epochs):
            snap = snapshot(epoch)  # what Ctrl-C saves: this epoch restarts on --resume
            if epoch > start and epoch % 50 == 0:
                save_state(snap)
            # j for every step of this epoch, drawn as the authors draw them one by one
            j = np.stack([rng.randint(n_target, size=n) for rng in rngs])  # (K, n)
            x_j = Xt[torch.arange(M)[:, None], torch.from_numpy(j[seed_of])]
            pairs = torch.stack((Xs, x_j), 2).transpose(0, 1).contiguous()  # (n, M, 2, 2)
            for i in range(n):
                sgd_step(params, pairs[i], labels[i], domains, adversarial, args.lambda_, args.lr)
            history.append({key: values[:real] for key, values
                            in epoch_history(params, Xs, ys, Xt, yt).items()})
            for loss in history[-1]["label_loss"] + history[-1]["domain_loss"]:
                check_finite(loss, f"loss at epoch {epoch + 1}")
    except KeyboardInterrupt:
        save_state(snap)
        print(f"\ninterrupted in epoch {snap['epoch'] + 1}: state saved to {path}; "
              f"rerun the same command with --resume to continue")
        raise SystemExit(130)
    if os.path.exists(path):
        os.remove(path)
    return unstack_parameters(params, networks), history


def train_hparams(args):
    return {k: getattr(args, k) for k in ("n_per_class", "angle", "noise", "hidden_units",
                                          "lambda_", "lr", "epochs", "seed", "data_seed",
                                          "seeds", "test_per_class")}


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
def predict(network, X):
    with torch.no_grad():
        return network(torch.as_tensor(X)).argmax(1).numpy()


def is_source(network, X):
    with torch.no_grad():
        return (network.domain_logit(torch.as_tensor(X)) > 0).numpy()


def evaluate(network, data):
    """Label accuracy on both domains (training and held-out samples) and the domain
    regressor's accuracy (source = 1, target = 0)."""
    result = {}
    for split in ("train", "test"):
        Xs, ys, Xt, yt = data[split]
        result[f"source_{split}_accuracy"] = float(np.mean(predict(network, Xs) == ys))
        result[f"target_{split}_accuracy"] = float(np.mean(predict(network, Xt) == yt))
        result[f"domain_{split}_accuracy"] = float(np.mean(np.concatenate(
            [is_source(network, Xs), ~is_source(network, Xt)])))
    result["representation_domain_accuracy"] = representation_domain_accuracy(network, data)
    Xs, ys, Xt, yt = data["test"]
    result["target_test"] = classification_metrics(yt, predict(network, Xt), ["0", "1"])
    return result


def representation_domain_accuracy(network, data):
    """How well a fresh RBF SVM tells the domains apart from the hidden layer G_f of the
    training source and target points (5-fold cross-validated accuracy; 0.5 = the
    representation hides the domain). The logistic regressor of Algorithm 1 is too weak a
    probe: the rotated moons are not linearly separable from the source ones."""
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    Xs, _, Xt, _ = data["train"]
    with torch.no_grad():
        hidden = network.features(torch.as_tensor(np.vstack((Xs, Xt)))).numpy()
    domain = np.r_[np.ones(len(Xs)), np.zeros(len(Xt))]
    folds = min(5, len(Xs), len(Xt))
    return float(cross_val_score(SVC(), hidden, domain, cv=folds).mean())


SCORES = ["source_train_accuracy", "target_train_accuracy", "source_test_accuracy",
          "target_test_accuracy", "domain_train_accuracy", "domain_test_accuracy",
          "representation_domain_accuracy"]


def summarise(runs):
    """Mean and standard deviation (ddof=1; 0 for one seed) of every score over seeds."""
    summary = {}
    for model in [m for m in MODELS if m in runs[0]]:
        summary[model] = {}
        for score in SCORES:
            values = np.array([run[model][score] for run in runs])
            summary[model][score] = {"mean": float(values.mean()),
                                     "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                     "values": values.tolist()}
    return summary


# ---------------------------------------------------------------------------------------
# Figures, drawn as the authors draw Figure 2
# ---------------------------------------------------------------------------------------
LABEL_COLOURS = ListedColormap(["#FF0000", "#00FF00"])   # light red / green at alpha .4
DOMAIN_COLOURS = ListedColormap(["#000000", "#0000FF"])  # target grey, source light blue
SPECIAL = np.array([[-2.4, -1.6], [-1.2, 0.4], [0.8, -0.5], [2.5, 1.5]])  # the authors' A-D
COLUMNS = {"label": "LABEL CLASSIFICATION", "pca": "REPRESENTATION PCA",
           "domain": "DOMAIN CLASSIFICATION", "neurons": "HIDDEN NEURONS"}


def limits(Xs):
    """The authors' window: 1.1 x the source's x range, 1.5 x its y range."""
    return (1.1 * Xs[:, 0].min(), 1.1 * Xs[:, 0].max()), (1.5 * Xs[:, 1].min(),
                                                          1.5 * Xs[:, 1].max())


def draw_points(ax, Xs, ys, Xt, scale=1.0):
    """Source label 0 as red '+', label 1 as green '-', target as black dots."""
    ax.scatter(*Xs[ys == 0].T, marker="+", c="red", s=45 * scale, linewidths=1.3, zorder=3)
    ax.scatter(*Xs[ys == 1].T, marker="_", c="green", s=45 * scale, linewidths=1.6, zorder=3)
    ax.scatter(*Xt.T, c="black", s=7 * scale, zorder=3)


def draw_regions(ax, function, Xs, colours):
    (x0, x1), (y0, y1) = limits(Xs)
    xx, yy = np.meshgrid(np.arange(x0, x1, 0.02), np.arange(y0, y1, 0.02))
    Z = function(np.c_[xx.ravel(), yy.ravel()]).reshape(xx.shape).astype(float)
    ax.contourf(xx, yy, Z, levels=[-0.5, 0.5, 1.5], cmap=colours, alpha=0.4)
    if 0 < Z.mean() < 1:
        ax.contour(xx, yy, Z, levels=[0.5], colors="black", linewidths=2)


def special_points(data):
    Xs, _, Xt, _ = data["train"]
    X = np.vstack((Xs, Xt))
    return X[np.argmin(((SPECIAL[:, None] - X[None]) ** 2).sum(-1), axis=1)]


def annotate_special(ax, points):
    for letter, point, offset in zip("ABCD", points, [(25, -30), (-30, -40), (-30, 25),
                                                      (-40, -10)]):
        ax.annotate(letter, point, xytext=offset, textcoords="offset points", color="blue",
                    fontsize=13, fontweight="bold", zorder=4,
                    arrowprops=dict(arrowstyle="fancy", fc="blue", ec="none"))


def finish(ax, Xs=None):
    if Xs is not None:
        (x0, x1), (y0, y1) = limits(Xs)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_panel(ax, column, network, data):
    Xs, ys, Xt, _ = data["train"]
    if column == "label":
        draw_regions(ax, lambda X: predict(network, X), Xs, LABEL_COLOURS)
        draw_points(ax, Xs, ys, Xt)
        annotate_special(ax, special_points(data))
        finish(ax, Xs)
    elif column == "domain":
        draw_regions(ax, lambda X: is_source(network, X), Xs, DOMAIN_COLOURS)
        draw_points(ax, Xs, ys, Xt)
        finish(ax, Xs)
    elif column == "neurons":
        draw_points(ax, Xs, ys, Xt)
        (x0, x1), _ = limits(Xs)
        colours = plt.get_cmap("tab20")
        for k, ((w1, w2), b) in enumerate(zip(network.W.detach().numpy(),
                                              network.b.detach().numpy())):
            if abs(w2) > 1e-12:  # the line where unit k's sigmoid equals 1/2
                ax.plot([x0, x1], [-(w1 * x0 + b) / w2, -(w1 * x1 + b) / w2],
                        color=colours(k % 20), linewidth=1.5)
            else:
                ax.axvline(-b / w1, color=colours(k % 20), linewidth=1.5)
        finish(ax, Xs)
    elif column == "pca":
        from sklearn.decomposition import PCA

        features = lambda X: network.features(torch.as_tensor(X)).detach().numpy()  # noqa: E731
        pca = PCA(n_components=2).fit(np.vstack((features(Xs), features(Xt))))
        project = lambda X: pca.transform(features(X))  # noqa: E731
        draw_points(ax, project(Xs), ys, project(Xt))
        annotate_special(ax, project(special_points(data)))
        finish(ax)


def figure2(networks, data, out):
    """The 2 x 4 grid of Figure 2 (rows standard NN, DANN) and each panel as its own PNG."""
    rows = [m for m in MODELS if m in networks]
    fig, axes = plt.subplots(len(rows), 4, figsize=(18, 3.6 * len(rows)), squeeze=False)
    for r, model in enumerate(rows):
        for c, column in enumerate(COLUMNS):
            draw_panel(axes[r, c], column, networks[model], data)
            axes[r, c].set_title(f"{TITLE[model]}: {COLUMNS[column]}", fontsize=11)
            single, ax = plt.subplots(figsize=(5, 3.9))
            draw_panel(ax, column, networks[model], data)
            ax.set_title(f"{TITLE[model]}: {COLUMNS[column]}", fontsize=11)
            save_figure(single, os.path.join(out, f"figure2_{model}_{column}.png"))
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "figure2.png"))


def data_figure(data, out):
    Xs, ys, Xt, yt = data["train"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    draw_points(axes[0], Xs, ys, np.empty((0, 2)))
    axes[0].set_title(f"source: {len(Xs)} labelled ('+' label 0, '-' label 1)")
    axes[1].scatter(*Xt.T, c="black", s=7)
    axes[1].set_title(f"target: {len(Xt)} unlabelled points (what training sees)")
    axes[2].scatter(*Xt[yt == 0].T, marker="+", c="red", s=45, linewidths=1.3)
    axes[2].scatter(*Xt[yt == 1].T, marker="_", c="green", s=45, linewidths=1.6)
    axes[2].scatter(*Xs.T, c="lightgrey", s=7, zorder=0)
    axes[2].set_title("target by its hidden class (grey: source)")
    for ax in axes:
        finish(ax, Xs)
    save_figure(fig, os.path.join(out, "data.png"))


def training_curves(history, K, out):
    """Accuracy and losses per epoch of the first seed's two networks."""
    epochs = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    for m, model in enumerate(MODELS):
        k = m * K  # the network of the first seed
        style = "--" if model == "nn" else "-"
        for key, colour in (("source_accuracy", "tab:red"), ("target_accuracy", "black"),
                            ("domain_accuracy", "tab:blue")):
            axes[0].plot(epochs, [h[key][k] for h in history], style, color=colour,
                         label=f"{TITLE[model]} {key.replace('_', ' ')}")
        axes[1].plot(epochs, [h["label_loss"][k] for h in history], style, color="tab:red",
                     label=TITLE[model])
        axes[2].plot(epochs, [h["domain_loss"][k] for h in history], style, color="tab:blue",
                     label=TITLE[model])
    axes[0].set_title("accuracy on the training samples")
    axes[1].set_title("source label loss Ly (mean)")
    axes[2].set_title("domain loss Ld (mean over source and target)")
    axes[2].axhline(np.log(2), color="grey", linewidth=0.8, linestyle=":")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out, "training_curves.png"))


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
AUTHORS = {"75 per class, seed 42": {"nn": 0.827, "dann": 0.973},
           "75 per class, 5 seeds": {"nn": 0.83, "dann": 0.95},
           "150 per class, 5 seeds": {"nn": 0.78, "dann": 0.89}}


def accuracy_table(runs, summary):
    lines = ["| model | seed | source train | target train | source held-out | "
             "target held-out | domain regressor train | domain regressor held-out | "
             "representation domain separability (SVM) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in summary:
        for run in runs:
            r = run[model]
            lines.append(f"| {TITLE[model]} | {run['seed']} / data {run['data_seed']} | "
                         + " | ".join(f"{r[s]:.4f}" for s in SCORES) + " |")
        if len(runs) > 1:
            s = summary[model]
            lines.append(f"| **{TITLE[model]}** | **mean +- std** | "
                         + " | ".join(f"**{s[k]['mean']:.4f} +- {s[k]['std']:.4f}**"
                                      for k in SCORES) + " |")
    return "\n".join(lines)


def observations(metrics):
    """The reading of the figure and the numbers, against the paper's reading of Figure 2."""
    s, K, settings = metrics["summary"], len(metrics["runs"]), metrics["settings"]
    if len(s) < 2:
        return "Only one model was evaluated; see the table above."
    mean = lambda model, score: s[model][score]["mean"]  # noqa: E731
    over = f"(mean over {K} seeds)" if K > 1 else "(this seed)"
    n = settings["n_per_class"]
    key = ("75 per class, seed 42" if (n, K, settings["seed"], settings["data_seed"]) ==
           (75, 1, 42, 1) else f"{n} per class, 5 seeds" if n in (75, 150) else None)
    text = [f"Held-out source accuracy: standard NN {mean('nn', 'source_test_accuracy'):.3f}, "
            f"DANN {mean('dann', 'source_test_accuracy'):.3f}. On the held-out target the standard "
            f"NN reaches {mean('nn', 'target_test_accuracy'):.3f} and DANN "
            f"{mean('dann', 'target_test_accuracy'):.3f} {over}; on the 2 x {n} training "
            f"target points {mean('nn', 'target_train_accuracy'):.3f} and "
            f"{mean('dann', 'target_train_accuracy'):.3f}."]
    if key:
        text.append(f"The authors' own code gives NN {AUTHORS[key]['nn']:.3f} and DANN "
                    f"{AUTHORS[key]['dann']:.3f} on the target in the setting '{key}'.")
    gain = mean("dann", "target_test_accuracy") - mean("nn", "target_test_accuracy")
    text.append(
        f"The paper reads Figure 2 as: the standard NN's boundary fits the source moons and "
        f"misclassifies part of the rotated target, DANN's boundary classifies the target "
        f"(nearly) perfectly; here DANN gains {gain:+.3f} target accuracy over the standard NN.")
    text.append(
        f"The paper's PCA column shows the standard NN keeping the domains apart in its "
        f"representation and DANN mixing them. A fresh RBF SVM asked to tell the domains "
        f"apart from the hidden layer reaches {mean('nn', 'representation_domain_accuracy'):.3f}"
        f" on the standard NN's representation and "
        f"{mean('dann', 'representation_domain_accuracy'):.3f} on DANN's (0.5 = chance). "
        f"Algorithm 1's own logistic domain regressor is a weak probe on both "
        f"({mean('nn', 'domain_train_accuracy'):.3f} and "
        f"{mean('dann', 'domain_train_accuracy'):.3f} on the training points): a linear "
        f"function of the hidden layer hardly separates a rotated copy of the moons, and "
        f"against DANN it is additionally being fooled.")
    if "target_train_accuracy_last50" in metrics["runs"][0]["dann"]:
        spread = {model: {key: np.mean([run[model]["target_train_accuracy_last50"][key]
                                        for run in metrics["runs"]])
                          for key in ("min", "mean", "max")} for model in MODELS}
        text.append(
            f"DANN's target accuracy moves from epoch to epoch: over the last 50 epochs it "
            f"ranges {spread['dann']['min']:.3f}-{spread['dann']['max']:.3f} (mean "
            f"{spread['dann']['mean']:.3f}; averaged over seeds), the standard NN's "
            f"{spread['nn']['min']:.3f}-{spread['nn']['max']:.3f}: the label and domain "
            f"gradients keep pulling against each other at the per-sample step size (see the "
            f"training curves). Like the paper we stop after a fixed number of epochs, with "
            f"no early stopping on target labels.")
    return " ".join(text)


CHOICES = """\
- **Data**: scikit-learn `make_moons` with noise 0.05, source random_state = data seed, target =
  data seed + 1, both centred on the source mean and scaled by 2, target rotated +35 degrees
  (counter-clockwise) about that mean: the authors' code; the text gives no generator. Default
  150 per class (the text's 300 source and 300 target points); `--n-per-class 75` is the
  authors' code.
- **Held-out samples** (the paper has none): 1,000 per class and domain from make_moons
  random_state data seed + 1,000,000 (source) and + 1,000,001 (target), in the training
  sample's coordinates (centred on the training source mean).
- **Initialisation and random target draws**: NumPy `RandomState(seed)`, W then V uniform in
  +-sqrt(6/(fan_in+fan_out)), biases and the regressor at 0, then for each epoch one
  `randint(n_target)` per source example: the authors' order of draws, so at 75 per class
  with seed 42 this is their run. Standard NN and DANN of one seed share init and draws.
- **Update**: exactly Algorithm 1 (per-sample SGD, learning rate 0.05, 500 epochs, no
  early stopping, no momentum): W, b, V, c step mu on Ly - lambda Ld (via the gradient
  reversal layer of common.py under autograd), u, d step mu * lambda on Ld; a unit test
  checks one step against Algorithm 1's closed-form equations. Float64, as the authors'
  NumPy. The standard NN runs the same loop with the same lambda; its regressor still
  trains but no domain gradient reaches W or b (the authors' code).
- **Speed**: all networks (both models, every seed) train in lockstep as one batched
  network; they share no parameter, so each one's update is its own Algorithm-1 update.
  The batch is padded to 8 networks, so a seed's numbers are bit-identical whether it
  trains alone or beside others (`--seeds 5`'s first seed is the single run). Always on
  the CPU, one PyTorch thread: each step is a few tiny ops, a GPU would not help.
- **Domain regressor accuracy**: fraction of source (called 1) and target (called 0)
  points it classifies correctly, on the training samples and on the held-out ones.
- **Spread over seeds**: sample standard deviation (ddof=1); repetition k uses seed + k and
  data seed + 2k, so no two repetitions share a moon sample.
- **Figure**: the authors' plotting conventions (regions at alpha 0.4 from pure red/green
  and blue/black, black decision line, source '+' for label 0 and '-' for label 1, target
  black dots, the authors' A-D reference points, window 1.1x / 1.5x the source range);
  PCA of the 15-d hidden layer fitted on the source and target training points."""


def other_runs(out):
    """A table of the runs saved in sub-folders of `out` (e.g. --seeds 5, the authors' size)."""
    rows = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, "metrics.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            m = json.load(f)
        s, st = m["summary"], m["settings"]
        cell = lambda model: (f"{s[model]['target_test_accuracy']['mean']:.4f} +- "  # noqa: E731
                              f"{s[model]['target_test_accuracy']['std']:.4f}")
        rows.append(f"| [{name}]({name}/report.md) | `{m['command']}` | {st['n_per_class']} | "
                    f"{len(m['runs'])} | {cell('nn')} | {cell('dann')} | "
                    f"{m['timings'].get('total', '')} |")
    if not rows:
        return ""
    return ("\n## Other runs (sub-folders, each with its own figures and report)\n\n"
            "| folder | command | per class | seeds | NN target held-out | "
            "DANN target held-out | total s |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def write_report(metrics, out, name):
    K = len(metrics["runs"])
    s = metrics["settings"]
    panels = "\n".join(f"| {TITLE[m]} | " + " | ".join(
        f"[{c}](figure2_{m}_{c}.png)" for c in COLUMNS) + " |" for m in metrics["summary"])
    timing = "\n".join(f"| {k} | {v} |" for k, v in metrics["timings"].items())
    curves = ("\n## Training curves (first seed)\n\n![training curves](training_curves.png)\n"
              if metrics.get("trained") else "")
    only = "" if metrics.get("trained") else " (evaluation of saved weights only)"
    text = f"""# Question 3.1: shallow DANN on the two moons (Ganin et al. 2016, Figure 2)

Command: `{metrics['command']}`{only}

Settings: {s['n_per_class']} source and {s['n_per_class']} target points per class,
rotation {s['angle']} degrees, {s['hidden_units']} hidden units, lambda {s['lambda_']},
learning rate {s['lr']}, {s['epochs']} epochs, {K} seed(s) from seed {s['seed']} / data seed
{s['data_seed']}. Held-out: {s['test_per_class']} per class and domain.

## Figure 2 (first seed)

![figure 2](figure2.png)

Each panel alone:

| model | {' | '.join(COLUMNS)} |
|---|---|---|---|---|
{panels}

## The data

![data](data.png)
{curves}
## Accuracies

{accuracy_table(metrics['runs'], metrics['summary'])}

Target accuracy of the authors' own code when re-run (source accuracy 1.0):
{'; '.join(f"{k}: NN {v['nn']}, DANN {v['dann']}" for k, v in AUTHORS.items())}.
The paper itself prints no toy numbers.

{other_runs(out)}
## Observations

{observations(metrics)}

## Choices where the paper is silent

{CHOICES}

## Timings ({metrics['machine']['description']})

| stage | seconds |
|---|---|
{timing}
"""
    if metrics.get("throughput"):
        t, load = metrics["throughput"], metrics["machine"]["load_average_1min"]
        text += (f"\nTraining: {t['networks']} networks x {t['steps_per_network']} SGD steps in "
                 f"{t['train_seconds']} s wall, {metrics['timings']['train_cpu']} s of CPU: "
                 f"{t['network_steps_per_second']:.0f} network-steps/s "
                 f"({t['examples_per_second']:.0f} source+target examples/s). The machine's "
                 f"1-minute load average was {load['start_of_training']:.1f} when training "
                 f"started and {load['end_of_training']:.1f} when it ended (other jobs share "
                 f"the cores; wall time above CPU time means it waited for a core).\n")
    write_text(os.path.join(out, name), text)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # per-sample steps on tiny tensors: threads only add overhead
    if args.device == "cuda":
        choose_device("cuda")  # errors out clearly when there is no GPU
        print("note: the toy problem runs on the CPU (each step is a few tiny ops)")
    os.makedirs(args.out, exist_ok=True)
    if args.eval_only:
        return eval_only(args)
    timings, start = {}, time.perf_counter()
    K = args.seeds
    with stage(timings, "data"):
        seeds = [(args.seed + k, args.data_seed + 2 * k) for k in range(K)]
        data = [make_data(args.n_per_class, ds, args.angle, args.noise, args.test_per_class)
                for _, ds in seeds]
    state = None
    if args.resume:
        path = os.path.join(args.out, "train_state.pt")
        if os.path.exists(path):
            state = load_checkpoint(path, "q3_toy_dann/train_state")
            if state["hparams"] != train_hparams(args):
                raise UserError(f"{path} was written with other settings "
                                f"({state['hparams']}); rerun with those or without --resume")
            print(f"resuming from epoch {state['epoch']}")
        else:
            print(f"nothing to resume in {path}; training from the start")
    rngs = [np.random.RandomState(seed) for seed, _ in seeds]
    networks = [ShallowNetwork(args.hidden_units) for _ in range(2 * K)]
    for k, rng in enumerate(rngs):  # one init per seed, shared by its NN and its DANN
        init_network(networks[k], rng)
        networks[K + k].load_state_dict(networks[k].state_dict())
    cpu_start, load_start = time.process_time(), os.getloadavg()[0]
    with stage(timings, "train"):
        networks, history = train(networks, [False] * K + [True] * K, rngs,
                                  [d["train"] for d in data] * 2, args, args.out, state)
    timings["train_cpu"] = round(time.process_time() - cpu_start, 2)
    load = {"start_of_training": load_start, "end_of_training": os.getloadavg()[0]}
    with stage(timings, "evaluate"):
        runs = [{"seed": seed, "data_seed": data_seed,
                 "nn": evaluate(networks[k], data[k]), "dann": evaluate(networks[K + k], data[k])}
                for k, (seed, data_seed) in enumerate(seeds)]
    for k, run in enumerate(runs):  # how much the target accuracy moves at the end
        for m, model in enumerate(MODELS):
            last = [h["target_accuracy"][m * K + k] for h in history[-50:]]
            run[model]["target_train_accuracy_last50"] = {
                "mean": float(np.mean(last)), "min": float(np.min(last)),
                "max": float(np.max(last))}
    first = {"nn": networks[0], "dann": networks[K]}
    with stage(timings, "figures"):
        figure2(first, data[0], args.out)
        data_figure(data[0], args.out)
        training_curves(history, K, args.out)
    for model, network in first.items():
        hparams = {**train_hparams(args), "seeds": 1, "model": model}
        save_checkpoint(os.path.join(args.out, f"{model}.pt"), KIND[model], hparams, network,
                        metrics=runs[0][model])
    timings["total"] = round(time.perf_counter() - start, 2)
    steps = (args.epochs - (state["epoch"] if state else 0)) * args.n_per_class * 2
    metrics = {
        "command": command_line(), "trained": True, "settings": train_hparams(args),
        "machine": {**machine_info(), "load_average_1min": load}, "timings": timings,
        "throughput": {"networks": 2 * K, "steps_per_network": steps,
                       "train_seconds": timings["train"],
                       "network_steps_per_second": 2 * K * steps / timings["train"],
                       "examples_per_second": 2 * 2 * K * steps / timings["train"]},
        "runs": runs, "summary": summarise(runs),
        "final_epoch_first_seed": {model: {key: values[m * K]
                                           for key, values in history[-1].items()}
                                   for m, model in enumerate(MODELS)},
        "authors_code_target_accuracy": AUTHORS,
    }
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    write_report(metrics, args.out, "report.md")
    print_summary(metrics)


def eval_only(args):
    """Rebuild the networks from their checkpoints (and the data from the checkpoints'
    hparams), then redraw Figure 2 and the data figure and recompute every accuracy."""
    timings, start = {}, time.perf_counter()
    paths = args.weights or [os.path.join(args.out, f"{m}.pt") for m in MODELS]
    networks, hparams = {}, None
    for path in paths:
        state = load_checkpoint(path, tuple(KIND.values()))
        model = "nn" if state["kind"] == KIND["nn"] else "dann"
        h = {k: v for k, v in state["hparams"].items() if k != "model"}
        if hparams is not None and h != hparams:
            raise UserError(f"{path} was trained with other settings than {paths[0]} "
                            f"({h} vs {hparams}); pass weights of one run")
        hparams = h
        networks[model] = load_model(path)
    with stage(timings, "data"):
        data = make_data(hparams["n_per_class"], hparams["data_seed"], hparams["angle"],
                         hparams["noise"], hparams["test_per_class"])
    with stage(timings, "evaluate"):
        run = {"seed": hparams["seed"], "data_seed": hparams["data_seed"],
               **{m: evaluate(n, data) for m, n in networks.items()}}
    with stage(timings, "figures"):
        figure2(networks, data, args.out)
        data_figure(data, args.out)
    timings["total"] = round(time.perf_counter() - start, 2)
    metrics = {"command": command_line(), "trained": False, "weights": paths,
               "settings": {**hparams, "seeds": 1}, "machine": machine_info(), "timings": timings,
               "runs": [run], "summary": summarise([run]),
               "authors_code_target_accuracy": AUTHORS}
    write_json(os.path.join(args.out, "eval_metrics.json"), metrics)
    write_report(metrics, args.out, "eval_report.md")
    print_summary(metrics)


def print_summary(metrics):
    for model, s in metrics["summary"].items():
        print(f"{TITLE[model]:>11}: target held-out accuracy "
              f"{s['target_test_accuracy']['mean']:.4f} +- {s['target_test_accuracy']['std']:.4f}, "
              f"source {s['source_test_accuracy']['mean']:.4f}, "
              f"domain regressor {s['domain_train_accuracy']['mean']:.4f}")
    print(f"timings (s): {metrics['timings']}")


if __name__ == "__main__":
    run_cli(main)
