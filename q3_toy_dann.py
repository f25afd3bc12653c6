"""Question 3.1: shallow DANN on the inter-twinning moons (Ganin et al., JMLR 2016,
Section 5.1.1, Algorithm 1, Figure 2), beside a standard network trained the same way.

    python q3_toy_dann.py --lambda 6                  # the text's size: 150 examples per class
    python q3_toy_dann.py --lambda 6 --seeds 5        # mean and spread over 5 seeds
    python q3_toy_dann.py --lambda 6 --n-per-class 75 # the authors' Figure-2 setting exactly
    python q3_toy_dann.py --eval-only                 # rescore nn.pt / dann.pt into <out>/eval/
    python q3_toy_dann.py --report-only               # rewrite report.md from metrics.json

Seeds: `--seed` (default 42, the authors') draws the initial weights and the random target
examples of Algorithm 1 with NumPy's legacy generator, in the authors' order; `--data-seed`
(default 1) is make_moons' random_state of the source, +1 for the target (the authors' 1 and 2).
With `--seeds K` the k-th repetition uses seed + k and data seed + 2k. The data are generated,
so there is no --data-dir.
"""
import argparse
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from scipy.special import expit
from torch import nn

import common
from common import UserError, check_finite, grad_reverse, stage

OUT = "outputs/q3_toy"
KIND = {"nn": "q3_toy_dann/nn", "dann": "q3_toy_dann/dann"}
MODELS = ("nn", "dann")
TITLE = {"nn": "Standard NN", "dann": "DANN"}
NAME = {"nn": "standard NN", "dann": "DANN"}  # in a sentence
HELD_OUT_SEED = 1_000_000   # held-out samples: make_moons random_state data seed + this (+1)
SAVE_EVERY = 50             # epochs between two saves of the training state
DIVERGED = 100              # a mean loss this many times its value before training
STATE_FILE = "training_state.pt"


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
def build_parser():
    summary, _, details = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-per-class", type=common.positive_int, default=150,
                   help="source (and target) examples per moon (default 150, the text; "
                        "the authors' code: 75)")
    p.add_argument("--angle", type=common.finite_float, default=35.0,
                   help="target rotation in degrees, counter-clockwise (default 35)")
    p.add_argument("--noise", type=common.nonnegative_float, default=0.05,
                   help="make_moons noise (default 0.05, the authors' code)")
    p.add_argument("--hidden-units", type=common.positive_int, default=15, help="D (default 15)")
    p.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=common.nonnegative_float,
                   default=6.0, help="adaptation weight lambda, both models (default 6)")
    p.add_argument("--lr", type=common.positive_float, default=0.05, help="mu (default 0.05)")
    p.add_argument("--epochs", type=common.positive_int, default=500,
                   help="passes over the source sample (default 500)")
    p.add_argument("--data-seed", type=common.seed_type, default=1,
                   help="make_moons random_state of the source; the target uses +1 (default 1)")
    p.add_argument("--seeds", type=common.positive_int, default=1,
                   help="repeat everything over K seeds and report mean and std (default 1)")
    p.add_argument("--test-per-class", type=common.positive_int, default=1000,
                   help="held-out examples per class and domain (default 1000)")
    p.add_argument("--weights", nargs="+", default=None,
                   help="with --eval-only: nn.pt and/or dann.pt (default: the two in --out)")
    common.add_common_args(p, OUT, seed_default=42, data_dir=False)  # 42: the authors' seed
    return p


def parse_args(argv=None, parser=None):
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.seed + args.seeds - 1 >= 2 ** 32:
        parser.error(f"--seed {args.seed} with --seeds {args.seeds} goes past 2**32 - 1")
    if args.data_seed + HELD_OUT_SEED + 2 * args.seeds >= 2 ** 32:
        parser.error(f"--data-seed {args.data_seed} with --seeds {args.seeds} goes past "
                     f"2**32 - 1 for the held-out samples (data seed + {HELD_OUT_SEED:,})")
    return args


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
    logistic domain regressor G_d = sigm(d + u^T G_f(x)) (1 = source, 0 = target).
    Float64, as the authors' NumPy code."""

    def __init__(self, hidden_units=15, n_features=2, n_classes=2):
        super().__init__()
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=torch.float64))  # noqa: E731
        self.W, self.b = zeros(hidden_units, n_features), zeros(hidden_units)
        self.V, self.c = zeros(n_classes, hidden_units), zeros(n_classes)
        self.u, self.d = zeros(hidden_units), zeros(())

    def features(self, x):
        return torch.sigmoid(F.linear(torch.as_tensor(x, dtype=torch.float64), self.W, self.b))

    def forward(self, x):
        """(N, 2) points -> (N, 2) label logits (softmax gives G_y)."""
        return F.linear(self.features(x), self.V, self.c)

    def domain_logit(self, x):
        """(N, 2) points -> (N,) logits of G_d; positive means 'source'."""
        return self.features(x) @ self.u + self.d


def initial_weights(rng, hidden_units, n_features=2, n_classes=2):
    """Algorithm 1's init, in the authors' order of draws: W then V uniform in
    +-sqrt(6 / (fan_in + fan_out)); b, c, u, d start at 0."""
    D, m, L = hidden_units, n_features, n_classes
    W = np.sqrt(6 / (m + D)) * (2 * rng.rand(D, m) - 1)
    V = np.sqrt(6 / (D + L)) * (2 * rng.rand(L, D) - 1)
    return W, V


def load_model(path):
    """The ShallowNetwork saved in `path` (nn.pt or dann.pt): (N,2) points -> (N,2) logits."""
    state = common.load_checkpoint(path, tuple(KIND.values()))
    return common.load_weights(ShallowNetwork(state["hparams"]["hidden_units"]), state,
                               path).eval()


# ---------------------------------------------------------------------------------------
# Algorithm 1, the reference: the losses, the gradient reversal layer and autograd
# ---------------------------------------------------------------------------------------
def reference_step(network, x_i, y_i, x_j, adversarial, lambda_, lr):
    """One inner iteration of Algorithm 1 for one network, written as the paper derives it:
    Ly on the source example (x_i, y_i), Ld on x_i (domain 1) and the target example x_j
    (domain 0). W, b, V, c step mu down Ly - lambda Ld: the gradient reversal layer hands the
    hidden layer -lambda x the gradient of Ld (a DANN; a standard NN's hidden layer gets no
    domain gradient). u, d step mu * lambda down Ld."""
    params = [network.W, network.b, network.V, network.c, network.u, network.d]
    hidden = network.features(torch.stack((x_i, x_j)))
    loss_y = F.cross_entropy(F.linear(hidden[:1], network.V, network.c), y_i.view(1))
    to_regressor = grad_reverse(hidden, lambda_) if adversarial else hidden.detach()
    loss_d = F.binary_cross_entropy_with_logits(
        to_regressor @ network.u + network.d, torch.tensor([1.0, 0.0], dtype=torch.float64),
        reduction="sum")
    grads = torch.autograd.grad(loss_y + loss_d, params)
    with torch.no_grad():
        for p, g, step in zip(params, grads, (lr,) * 4 + (lr * lambda_,) * 2):
            p.sub_(g, alpha=step)
    return loss_y.item(), loss_d.item()


# ---------------------------------------------------------------------------------------
# Algorithm 1, fast: its closed-form updates for many networks at once
#
# Per-sample SGD is 150,000 tiny steps per network, so its cost is per-operation overhead,
# not arithmetic. All networks (standard NN and DANN, every seed) therefore take their steps
# together: their parameters are stacked on a leading axis and each line of Algorithm 1 is
# one NumPy operation over that axis. The networks share no parameter, so each one gets
# exactly its own update (tests check this against reference_step).
# ---------------------------------------------------------------------------------------
class Networks:
    """M networks in Algorithm 1's notation, each weight matrix with its bias as a last
    column: Wb = [W | b] (M,D,3) acts on [x; 1]; Vc = [V | c] (M,L,D+1) and
    ud = [u | d] (M,1,D+1) act on [G_f(x); 1]. adversarial (M,): DANN (True) or standard NN."""

    def __init__(self, W, b, V, c, u, d, adversarial):
        self.Wb = np.concatenate((W, b[..., None]), 2)
        self.Vc = np.concatenate((V, c[..., None]), 2)
        self.ud = np.concatenate((u, d[:, None]), 1)[:, None, :]
        self.adversarial = np.asarray(adversarial, dtype=bool)
        M, D = b.shape
        self.hidden = np.ones((M, D + 1, 2))  # [G_f(x_i), G_f(x_j)] above a row of ones

    def parameters(self):
        """W, b, V, c, u, d, each (M, ...)."""
        return (self.Wb[..., :-1], self.Wb[..., -1], self.Vc[..., :-1], self.Vc[..., -1],
                self.ud[:, 0, :-1], self.ud[:, 0, -1])

    def state(self):
        return {"Wb": self.Wb.copy(), "Vc": self.Vc.copy(), "ud": self.ud.copy()}

    def load_state(self, state):
        for name in ("Wb", "Vc", "ud"):
            getattr(self, name)[...] = np.asarray(state[name])

    @classmethod
    def from_modules(cls, modules, adversarial):
        stacked = [np.stack([p.detach().numpy() for p in group])
                   for group in zip(*[(n.W, n.b, n.V, n.c, n.u, n.d) for n in modules])]
        return cls(*stacked, adversarial)

    def module(self, k):
        """Network k as a ShallowNetwork (a copy)."""
        network = ShallowNetwork(self.Wb.shape[1], self.Wb.shape[2] - 1, self.Vc.shape[1])
        with torch.no_grad():
            for p, value in zip(network.parameters(), self.parameters()):
                p.copy_(torch.from_numpy(np.array(value[k])))
        return network


def algorithm1_step(net, x, x_t, e_y, lr, lambda_):
    """One inner iteration of Algorithm 1 for every network of `net` at once. x (M,3,2): the
    columns [x_i; 1] (the source example) and [x_j; 1] (the random target example); x_t its
    transpose; e_y (M,L,1): the one-hot label e(y_i). As in Algorithm 1, every Delta comes
    from the parameters before the step."""
    h = net.hidden
    expit(net.Wb @ x, out=h[:, :-1])                      # G_f(x_i), G_f(x_j)
    h_i, h_ij = h[:, :, :1], h[:, :-1]
    o = net.Vc @ h_i                                      # G_y(G_f(x_i)) = softmax(c + V h_i)
    o -= o.max(1, keepdims=True)
    np.exp(o, out=o)
    o /= o.sum(1, keepdims=True)
    delta_c = o - e_y                                     # Delta_c = -(e(y_i) - G_y)
    domain = DOMAIN_LABELS - expit(net.ud @ h)            # (1 - G_d(x_i), -G_d(x_j))
    # Delta_b at x_i and x_j: for a DANN the two `tmp` terms lambda (1 - G_d(x_i)) u and
    # -lambda G_d(x_j) u, plus V^T Delta_c at x_i; all times h (1 - h)
    u = net.ud[:, :, :-1].transpose(0, 2, 1)
    delta_b = (lambda_ * net.adversarial[:, None, None]) * u * domain
    delta_b[:, :, :1] += net.Vc[:, :, :-1].transpose(0, 2, 1) @ delta_c
    delta_b *= h_ij * (1 - h_ij)
    net.Wb -= lr * (delta_b @ x_t)                        # W -= mu Delta_W, b -= mu Delta_b
    net.Vc -= lr * (delta_c @ h_i.transpose(0, 2, 1))     # V -= mu Delta_V, c -= mu Delta_c
    net.ud += lr * lambda_ * (domain @ h.transpose(0, 2, 1))  # u, d += mu Delta_u, mu Delta_d


DOMAIN_LABELS = np.array([1.0, 0.0]).reshape(1, 1, 2)    # x_i is source (1), x_j target (0)


# ---------------------------------------------------------------------------------------
# Training loop: every source example in turn, with one uniformly random target example
# ---------------------------------------------------------------------------------------
def with_ones(X):
    """(..., N, 2) points -> (..., N, 3) rows [x; 1]."""
    return np.concatenate((X, np.ones(X.shape[:-1] + (1,))), -1)


def train_epoch(net, source, e_y, target, j, lr, lambda_):
    """One epoch of Algorithm 1 for every network of `net`: each source example in turn,
    paired with the target example the network drew for that step. source (M,n,3) and
    target (M,n',3) hold rows [x; 1], e_y (n,M,L,1) the one-hot source labels, j (M,n) the
    indices of the target examples."""
    x_j = np.take_along_axis(target, j[..., None], 1)               # (M,n,3)
    x_t = np.stack((source, x_j), 2).transpose(1, 0, 2, 3).copy()   # (n,M,2,3): step i's rows
    x = x_t.transpose(0, 1, 3, 2).copy()                            # (n,M,3,2): its columns
    for i in range(source.shape[1]):
        algorithm1_step(net, x[i], x_t[i], e_y[i], lr, lambda_)


def training_scores(net, source, ys, target, yt):
    """Mean Ly (source), mean Ld (source and target) and the accuracies of every network on
    its training samples, as lists over the networks."""
    n = source.shape[1]
    points = np.concatenate((source, target), 1)
    hidden = with_ones(expit(points @ net.Wb.transpose(0, 2, 1)))   # (M,N,D+1)
    logits = hidden @ net.Vc.transpose(0, 2, 1)                     # (M,N,L)
    shifted = logits[:, :n] - logits[:, :n].max(2, keepdims=True)
    label_loss = (np.log(np.exp(shifted).sum(2))
                  - np.take_along_axis(shifted, ys[..., None], 2)[..., 0]).mean(1)
    domain_logit = (hidden @ net.ud.transpose(0, 2, 1))[..., 0]     # (M,N), > 0: source
    is_source = np.arange(points.shape[1]) < n
    domain_loss = np.logaddexp(0, np.where(is_source, -domain_logit, domain_logit)).mean(1)
    predicted = logits.argmax(2)
    return {"label_loss": label_loss.tolist(), "domain_loss": domain_loss.tolist(),
            "source_accuracy": (predicted[:, :n] == ys).mean(1).tolist(),
            "target_accuracy": (predicted[:, n:] == yt).mean(1).tolist(),
            "domain_accuracy": ((domain_logit > 0) == is_source).mean(1).tolist()}


def check_losses(history, epoch, args, saved):
    """Stop with a true sentence when a loss is nan or inf, or has grown DIVERGED-fold over
    its value before training (epoch 0). `saved`: what the last save left behind."""
    K = args.seeds
    for key, loss in (("label_loss", "label loss Ly"), ("domain_loss", "domain loss Ld")):
        for k, value in enumerate(history[-1][key]):
            which = f"{loss} of the {NAME[MODELS[k // K]]} (seed {args.seed + k % K})"
            check_finite(value, f"{which} at epoch {epoch}")
            before = history[0][key][k]
            if value > DIVERGED * before:
                raise UserError(
                    f"training diverged: the {which} reached {value:.3g} at epoch {epoch}, "
                    f"more than {DIVERGED} times its value before training ({before:.3g}); "
                    f"training stopped; {saved}; try a smaller --lr (this run: {args.lr:g})")


def train(args, data, state=None):
    """Algorithm 1 for the standard NN and the DANN of every seed at once: network k < K is
    seed k's standard NN, network K + k its DANN; both start from seed k's init and take the
    same target examples (the authors' order of draws from RandomState(seed + k)). Saves the
    training state every SAVE_EVERY epochs and at the end. Returns the networks and the
    scores of every epoch (epoch 0: before training)."""
    K = args.seeds
    rngs = [np.random.RandomState(args.seed + k) for k in range(K)]
    W, V = (np.stack(weights * 2) for weights in
            zip(*[initial_weights(rng, args.hidden_units) for rng in rngs]))
    M, D = W.shape[:2]
    net = Networks(W, np.zeros((M, D)), V, np.zeros((M, 2)), np.zeros((M, D)), np.zeros(M),
                   [False] * K + [True] * K)
    Xs, ys, Xt, yt = (np.stack([d["train"][i] for d in data] * 2) for i in range(4))
    source, target = with_ones(Xs), with_ones(Xt)
    e_y = np.eye(2)[ys].transpose(1, 0, 2)[..., None]               # (n,M,L,1)
    history, start = [training_scores(net, source, ys, target, yt)], 0
    if state is not None:
        net.load_state(state["networks"])
        for rng, rng_state in zip(rngs, state["rngs"]):
            rng.set_state(rng_state)
        history, start = state["history"], state["epoch"]
    path, saved = os.path.join(args.out, STATE_FILE), "nothing was saved"
    with np.errstate(over="ignore", invalid="ignore"):  # check_losses reports overflow
        for epoch in range(start + 1, args.epochs + 1):
            j = np.stack([rng.randint(Xt.shape[1], size=Xs.shape[1]) for rng in rngs])
            train_epoch(net, source, e_y, target, np.concatenate((j, j)), args.lr,
                        args.lambda_)
            history.append(training_scores(net, source, ys, target, yt))
            check_losses(history, epoch, args, saved)
            if epoch % SAVE_EVERY == 0 or epoch == args.epochs:
                common.save_training_state(path, common.training_settings(args),
                                           networks=net.state(), history=history,
                                           epoch=epoch,
                                           rngs=[rng.get_state() for rng in rngs])
                saved = f"epoch {epoch} of {args.epochs} is saved in {path}"
                common.note_saved(f"{saved}; continue with --resume")
    return net, history


def last_epochs(history, k, count=50):
    """Target accuracy of network k over the last `count` epochs: how much it still moves."""
    values = [h["target_accuracy"][k] for h in history[1:][-count:]]
    return {"epochs": len(values), "mean": float(np.mean(values)),
            "min": float(np.min(values)), "max": float(np.max(values))}


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
    result["target_test"] = common.classification_metrics(yt, predict(network, Xt), ["0", "1"])
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
        hidden = network.features(np.vstack((Xs, Xt))).numpy()
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

        features = lambda X: network.features(X).detach().numpy()  # noqa: E731
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
            common.save_figure(single, os.path.join(out, f"figure2_{model}_{column}.png"))
    fig.tight_layout()
    common.save_figure(fig, os.path.join(out, "figure2.png"))


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
    common.save_figure(fig, os.path.join(out, "data.png"))


def training_curves(history, K, out):
    """Accuracy and losses per epoch (0: before training) of the first seed's two networks."""
    epochs = np.arange(len(history))
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
    common.save_figure(fig, os.path.join(out, "training_curves.png"))




# ---------------------------------------------------------------------------------------
# Report: a template filled from metrics.json and <out>/runs/*/metrics.json alone
# ---------------------------------------------------------------------------------------
# Target accuracy of the authors' own code (GRAAL-Research/domain_adversarial_neural_network,
# experiments_moons.py and DANN.py), re-run on a CPU and scored on its training target points,
# the only target points it has; its source accuracy is 1.0. Their setting besides: rotation
# 35 degrees, noise 0.05, 15 hidden units, lambda 6, learning rate 0.05, 500 epochs. Written
# as they are known, to 3 or 2 digits.
AUTHORS_CODE = (
    {"what": "their Figure-2 run", "n_per_class": 75, "seeds": 1, "seed": 42, "data_seed": 1,
     "nn": "0.827", "dann": "0.973"},
    {"what": "their mean over 5 seeds", "n_per_class": 75, "seeds": 5, "nn": "0.83",
     "dann": "0.95"},
    {"what": "their mean over 5 seeds", "n_per_class": 150, "seeds": 5, "nn": "0.78",
     "dann": "0.89"},
)
AUTHORS_SETTING = {"angle": 35.0, "noise": 0.05, "hidden_units": 15, "lambda_": 6.0,
                   "lr": 0.05, "epochs": 500}


def authors_run(settings):
    """The run of the authors' code with the same setting and number of seeds, or None."""
    if any(settings[key] != value for key, value in AUTHORS_SETTING.items()):
        return None
    for run in AUTHORS_CODE:
        if all(settings[key] == run[key] for key in ("n_per_class", "seeds", "seed", "data_seed")
               if key in run):
            return run
    return None


def versus_authors(name, metrics):
    """One sentence: this code's target accuracy on the training target points against the
    authors' code in the same setting (one seed with one seed, a mean with a mean)."""
    s, K = metrics["settings"], len(metrics["runs"])
    setting = f"{s['n_per_class']} per class, " + (f"seed {s['seed']}, data seed "
                                                    f"{s['data_seed']}" if K == 1
                                                    else f"mean over {K} seeds")
    theirs = authors_run({**s, "seeds": K})
    if theirs is None:
        return (f"{name} ({setting}): the authors' code was not run in this setting, so "
                f"it is not compared with theirs.")
    parts = []
    for model in MODELS:
        ours, value = metrics["summary"][model]["target_train_accuracy"]["mean"], theirs[model]
        digits = len(value.split(".")[1])
        verdict = ("agrees to the digits they give" if abs(ours - float(value))
                   <= 0.5 * 10 ** -digits else f"differs by {ours - float(value):+.{digits}f}")
        parts.append(f"{TITLE[model]} {ours:.4f} against {value} ({verdict})")
    return f"{name} ({setting}; {theirs['what']}): " + "; ".join(parts) + "."


def authors_section(metrics, other_runs):
    lines = [versus_authors("This run", metrics)]
    lines += [versus_authors(f"`runs/{name}`", m) for name, m in other_runs]
    return ("Target accuracy on the training target points, the only target points the "
            "authors' code has (their source accuracy is 1.0). Theirs: the authors' code "
            "(GRAAL-Research/domain_adversarial_neural_network, `experiments_moons.py`, "
            "`DANN.py`) re-run on a CPU; the paper prints no accuracy for this problem "
            "(Ganin et al. 2016, Section 5.1.1).\n\n"
            + "\n".join(f"- {line}" for line in lines))


def other_runs_table(other_runs):
    if not other_runs:
        return "No other runs are saved in `runs/`."
    cell = lambda m, model, score: (  # noqa: E731
        f"{m['summary'][model][score]['mean']:.4f} +- {m['summary'][model][score]['std']:.4f}")
    rows = [f"| `runs/{name}` | `{common.shown_command(m['command'])}` | {m['settings']['n_per_class']} | "
            f"{len(m['runs'])} | {cell(m, 'nn', 'target_test_accuracy')} | "
            f"{cell(m, 'dann', 'target_test_accuracy')} | "
            f"{cell(m, 'nn', 'target_train_accuracy')} | "
            f"{cell(m, 'dann', 'target_train_accuracy')} | {m['timings']['train']} |"
            for name, m in other_runs]
    return ("Each from its own `metrics.json` (mean +- standard deviation over seeds).\n\n"
            "| run | command | per class | seeds | NN target held-out | DANN target held-out "
            "| NN target train | DANN target train | training s |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def accuracy_table(runs, summary):
    lines = ["| model | seed | " + " | ".join(SCORE_NAMES[s] for s in SCORES) + " |",
             "|---|---|" + "---|" * len(SCORES)]
    for model in MODELS:
        for run in runs:
            lines.append(f"| {TITLE[model]} | {run['seed']} / data {run['data_seed']} | "
                         + " | ".join(f"{run[model][s]:.4f}" for s in SCORES) + " |")
        if len(runs) > 1:
            lines.append(f"| **{TITLE[model]}** | **mean +- std** | " + " | ".join(
                f"**{summary[model][s]['mean']:.4f} +- {summary[model][s]['std']:.4f}**"
                for s in SCORES) + " |")
    return "\n".join(lines)


SCORE_NAMES = {"source_train_accuracy": "source train", "target_train_accuracy": "target train",
               "source_test_accuracy": "source held-out",
               "target_test_accuracy": "target held-out",
               "domain_train_accuracy": "domain regressor train",
               "domain_test_accuracy": "domain regressor held-out",
               "representation_domain_accuracy": "domain from hidden layer (SVM)"}


def observations(metrics):
    """The reading of the numbers, each judgement computed from them."""
    s, runs, summary = metrics["settings"], metrics["runs"], metrics["summary"]
    mean = lambda model, score: summary[model][score]["mean"]  # noqa: E731
    over = f"mean over {len(runs)} seeds" if len(runs) > 1 else "one seed"
    n_target = 2 * s["test_per_class"] * len(runs)
    wrong = {model: sum(round((1 - run[model]["target_test_accuracy"]) * 2 * s["test_per_class"])
                        for run in runs) for model in MODELS}
    gain = mean("dann", "target_test_accuracy") - mean("nn", "target_test_accuracy")
    text = [f"On the held-out source points the standard NN reaches "
            f"{mean('nn', 'source_test_accuracy'):.4f} and DANN "
            f"{mean('dann', 'source_test_accuracy'):.4f}; on the held-out target "
            f"{mean('nn', 'target_test_accuracy'):.4f} and "
            f"{mean('dann', 'target_test_accuracy'):.4f} ({over}): DANN classifies "
            + ("more" if gain > 0 else "fewer" if gain < 0 else "as many")
            + f" of the target correctly than the standard NN ({gain:+.4f})."]
    text.append("The paper says DANN's boundary in its Figure 2 classifies the target "
                "perfectly (Ganin et al. 2016, Section 5.1.1); here DANN "
                + (f"classifies all {n_target} held-out target points correctly"
                   if wrong["dann"] == 0 else
                   f"misclassifies {wrong['dann']} of the {n_target} held-out target points")
                + f", the standard NN {wrong['nn']}.")
    svm = {model: mean(model, "representation_domain_accuracy") for model in MODELS}
    text.append(f"A fresh RBF SVM tells the domains apart from the hidden layer with accuracy "
                f"{svm['nn']:.4f} for the standard NN and {svm['dann']:.4f} for DANN (0.5: "
                f"chance): DANN's representation hides the domain "
                + ("better than" if svm["dann"] < svm["nn"] else "no better than")
                + " the standard NN's; in the paper's PCA column the standard NN keeps the "
                  "domains apart and DANN mixes them.")
    regressor = {model: mean(model, "domain_train_accuracy") for model in MODELS}
    closer = abs(regressor["dann"] - 0.5) < abs(regressor["nn"] - 0.5)
    text.append(f"Algorithm 1's own domain regressor is right on {regressor['nn']:.4f} of the "
                f"training points of the standard NN and {regressor['dann']:.4f} of DANN's: "
                f"against DANN it is {'closer to' if closer else 'no closer to'} chance.")
    text.append(last_epochs_sentence(runs, s["epochs"]))
    return "\n\n".join(text)


def last_epochs_sentence(runs, epochs):
    parts = []
    for model in MODELS:
        last = [run[model]["target_train_last_epochs"] for run in runs]
        low, high = np.mean([x["min"] for x in last]), np.mean([x["max"] for x in last])
        parts.append(f"the {NAME[model]}'s " + (f"stays at {low:.4f}" if low == high else
                                                  f"moves between {low:.4f} and {high:.4f}"))
    average = " (averaged over seeds)" if len(runs) > 1 else ""
    return (f"Over the last {runs[0]['dann']['target_train_last_epochs']['epochs']} epochs "
            f"the accuracy on the training target points{average}: " + "; ".join(parts)
            + f". Training stops after a fixed {epochs} epochs, with no early stopping on "
              f"target labels, as the authors' code.")


def choices(s, K):
    """The choices where the paper is silent, written from the run's settings."""
    theirs = {"noise": "the authors' code: 0.05", "angle": "the text and the authors' code: 35",
              "lr": "the authors' code: 0.05", "lambda_": "the authors' code: 6",
              "hidden_units": "the paper: 15", "epochs": "the authors' code: 500"}
    note = {key: "" if s[key] == AUTHORS_SETTING[key] else f" ({text})"
            for key, text in theirs.items()}

    size = {150: "the text's 150 source and 150 target examples per class",
            75: "the authors' code: make_moons(150) per domain"}.get(
        s["n_per_class"], "the text: 150; the authors' code: 75")
    direction = "counter-clockwise" if s["angle"] >= 0 else "clockwise"
    seeds = (f"sample standard deviation (ddof=1) over {K} seeds; repetition k uses seed "
             f"{s['seed']} + k and data seed {s['data_seed']} + 2k, so no two repetitions "
             f"share a moon sample" if K > 1 else
             f"one seed ({s['seed']}, data seed {s['data_seed']}); `--seeds K` repeats with "
             f"seed + k and data seed + 2k")
    items = {
        "Data": f"scikit-learn `make_moons` with noise {s['noise']:g}"
                f"{note['noise']}, {s['n_per_class']} "
                f"examples per class ({size}); source random_state {s['data_seed']}, target "
                f"{s['data_seed'] + 1}; both centred on the source mean and scaled by 2, the "
                f"target rotated {abs(s['angle']):g} degrees {direction} about that mean"
                f"{note['angle']}. "
                f"The text gives no generator; this is the authors' code.",
        "Held-out samples": f"(the paper has none) {s['test_per_class']} per class and domain "
                            f"from make_moons random_state {s['data_seed'] + HELD_OUT_SEED} "
                            f"(source) and {s['data_seed'] + HELD_OUT_SEED + 1} (target), in "
                            f"the training sample's coordinates.",
        "Initialisation and random target draws": (
            f"NumPy `RandomState({s['seed']})`: W then V uniform in +-sqrt(6/(fan_in+fan_out)), "
            f"biases and the regressor at 0, then in each epoch one `randint` per source "
            f"example for its target example: the authors' order of draws. The standard NN "
            f"and DANN of a seed share the init and the draws."),
        "Update": f"Algorithm 1, per-sample SGD with learning rate {s['lr']:g}"
                  f"{note['lr']}, lambda "
                  f"{s['lambda_']:g} for both models{note['lambda_']}, "
                  f"{s['hidden_units']} hidden units{note['hidden_units']}, "
                  f"{s['epochs']} epochs{note['epochs']}, "
                  f"no momentum, no early stopping, float64 as the authors' NumPy code. W, b, V, "
                  f"c step mu down Ly - lambda Ld (the minus is the gradient reversal), u, d "
                  f"step mu * lambda down Ld. The standard NN runs the same loop; its "
                  f"regressor trains, but no domain gradient reaches W or b (the authors' code).",
        "Speed": "Algorithm 1's closed-form updates, every network (both models, all seeds) "
                 "advanced together by NumPy operations over a leading network axis; the "
                 "networks share no parameter, so each gets its own update, and a seed's "
                 "numbers do not depend on how many networks train beside it. The tests "
                 "compare these updates step by step with the autograd version through "
                 "common.py's gradient reversal layer.",
        "Domain regressor accuracy": "the fraction of source (called 1) and target (called 0) "
                                     "points it classifies correctly. Domain from hidden "
                                     "layer: 5-fold cross-validated accuracy of an RBF SVM "
                                     "telling the training source from the training target "
                                     "points by their hidden layer.",
        "Seeds": seeds + ".",
        "Figure": "the authors' plotting conventions (regions at alpha 0.4, black decision "
                  "line, source '+' for label 0 and '-' for label 1, target black dots, the "
                  "authors' A-D reference points, window 1.1x / 1.5x the source range); PCA "
                  "of the hidden layer fitted on the training source and target points.",
    }
    return "\n".join(f"- **{name}**: {text}" for name, text in items.items())


def render_report(metrics, out):
    """report.md, from metrics.json and the runs saved in <out>/runs/."""
    s, runs = metrics["settings"], metrics["runs"]
    other_runs = common.other_runs(out)
    panels = "\n".join(f"| {TITLE[m]} | " + " | ".join(
        f"[{c}](figure2_{m}_{c}.png)" for c in COLUMNS) + " |" for m in MODELS)
    timings = "\n".join(f"| {k} | {v} |" for k, v in metrics["timings"].items())
    t = metrics["throughput"]
    resumed = (f" (resumed at epoch {metrics['resumed_from_epoch']}: the training time covers "
               f"the epochs after it)" if metrics["resumed_from_epoch"] else "")
    setting = (f"{s['n_per_class']} source and {s['n_per_class']} target points per class, "
               f"rotation {s['angle']:g} degrees, {s['hidden_units']} hidden units, lambda "
               f"{s['lambda_']:g}, learning rate {s['lr']:g}, {s['epochs']} epochs, {len(runs)} "
               f"seed(s) from seed {s['seed']} / data seed {s['data_seed']}; held-out: "
               f"{s['test_per_class']} points per class and domain.")
    speed = (f"Training: {t['networks']} networks x {t['steps_per_network']:,} SGD steps in "
             f"{metrics['timings']['train']} s, {t['network_steps_per_second']:,.0f} "
             f"network-steps/s.")
    return f"""# Question 3.1: shallow DANN on the two moons (Ganin et al. 2016, Section 5.1.1, Figure 2)

Command: `{common.shown_command(metrics['command'])}`{resumed}

{setting}

## Figure 2 (seed {runs[0]['seed']}, data seed {runs[0]['data_seed']})

![figure 2](figure2.png)

| model | {' | '.join(COLUMNS)} |
|---|---|---|---|---|
{panels}

## The data

![data](data.png)

## Training curves (seed {runs[0]['seed']}; epoch 0 is the untrained network)

![training curves](training_curves.png)

## Accuracies

{accuracy_table(runs, metrics['summary'])}

## Against the authors' code

{authors_section(metrics, other_runs)}

## Other runs

{other_runs_table(other_runs)}

## Observations

{observations(metrics)}

## Choices where the paper is silent

{choices(s, len(runs))}

## Timings ({metrics['machine']['description']})

| stage | seconds |
|---|---|
{timings}

{speed}
"""


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
def main(argv=None):
    parser = build_parser()
    args = parse_args(argv, parser)
    common.prepare_out(args.out)
    if args.report_only:
        return common.report_only(args.out, render_report)
    if args.device == "cuda":
        common.choose_device("cuda")  # one sentence when there is no GPU
        print("note: the toy problem runs on the CPU (each step is a few tiny operations)")
    if args.eval_only:
        return eval_only(args)
    state = None
    if args.resume:
        state = common.load_training_state(os.path.join(args.out, STATE_FILE), args, parser,
                                           argv)
        print(f"resuming after epoch {state['epoch']} of {args.epochs}")
    K, timings, start = args.seeds, {}, time.perf_counter()
    with stage(timings, "data"):
        data = [make_data(args.n_per_class, args.data_seed + 2 * k, args.angle, args.noise,
                          args.test_per_class) for k in range(K)]
    cpu_start = time.process_time()
    with stage(timings, "train"):
        net, history = train(args, data, state)
    timings["train_cpu"] = round(time.process_time() - cpu_start, 2)
    first = {"nn": net.module(0), "dann": net.module(K)}
    for model, network in first.items():  # the weights before anything else can fail
        common.save_checkpoint(os.path.join(args.out, f"{model}.pt"), KIND[model],
                               {**common.training_settings(args), "seeds": 1, "model": model},
                               network)
    common.note_saved(f"training is finished: the weights are in {args.out}/nn.pt and dann.pt, "
                      f"the training state in {args.out}/{STATE_FILE}; --resume writes the "
                      f"figures and the report")
    with stage(timings, "evaluate"):
        runs = [{"seed": args.seed + k, "data_seed": args.data_seed + 2 * k,
                 **{model: {**evaluate(net.module(m * K + k), data[k]),
                            "target_train_last_epochs": last_epochs(history, m * K + k)}
                    for m, model in enumerate(MODELS)}} for k in range(K)]
    with stage(timings, "figures"):
        figure2(first, data[0], args.out)
        data_figure(data[0], args.out)
        training_curves(history, K, args.out)
    timings["total"] = round(time.perf_counter() - start, 2)
    resumed_from = state["epoch"] if state else 0
    steps = (args.epochs - resumed_from) * 2 * args.n_per_class
    metrics = {
        "command": common.command_line(), "settings": common.training_settings(args),
        "resumed_from_epoch": resumed_from, "machine": common.machine_info(),
        "timings": timings,
        "throughput": {"networks": 2 * K, "steps_per_network": steps,
                       "network_steps_per_second": 2 * K * steps / max(timings["train"], 1e-9)},
        "runs": runs, "summary": summarise(runs)}
    common.write_json(os.path.join(args.out, "metrics.json"), metrics)
    common.write_text(os.path.join(args.out, "report.md"), render_report(metrics, args.out))
    if os.path.exists(os.path.join(args.out, STATE_FILE)):
        os.remove(os.path.join(args.out, STATE_FILE))
    print_summary(metrics)


def eval_only(args):
    """Rebuild the networks from their checkpoints and the data from their settings; write
    Figure 2, the data figure and the scores under <out>/eval/ and compare the scores with
    the metrics.json beside the weights."""
    paths = args.weights or [os.path.join(args.out, f"{m}.pt") for m in MODELS]
    networks, settings = {}, None
    for path in paths:
        state = common.load_checkpoint(path, tuple(KIND.values()))
        these = {k: v for k, v in state["hparams"].items() if k != "model"}
        if settings is not None and these != settings:
            raise UserError(f"{path} was trained with other settings than {paths[0]}; "
                            f"pass the weights of one run")
        settings = these
        networks["nn" if state["kind"] == KIND["nn"] else "dann"] = load_model(path)
    eval_dir = os.path.join(args.out, "eval")
    common.prepare_out(eval_dir)
    data = make_data(settings["n_per_class"], settings["data_seed"], settings["angle"],
                     settings["noise"], settings["test_per_class"])
    scores = {model: evaluate(network, data) for model, network in networks.items()}
    figure2(networks, data, eval_dir)
    data_figure(data, eval_dir)
    common.write_json(os.path.join(eval_dir, "metrics.json"),
                      {"command": common.command_line(), "weights": paths,
                       "settings": settings, "machine": common.machine_info(),
                       "runs": [{"seed": settings["seed"], "data_seed": settings["data_seed"],
                                 **scores}]})
    committed = os.path.join(os.path.dirname(paths[0]), "metrics.json")
    if not os.path.isfile(committed):
        print(f"no {committed} beside the weights: nothing to compare with")
        return
    first_run = common.read_json(committed, "the metrics of the run that wrote the weights")
    first_run = first_run["runs"][0]
    common.compare_with_committed(
        {model: {s: scores[model][s] for s in SCORES} for model in scores},
        {model: {s: first_run[model][s] for s in SCORES} for model in scores}, eval_dir)


def print_summary(metrics):
    for model, s in metrics["summary"].items():
        print(f"{TITLE[model]:>11}: target held-out accuracy "
              f"{s['target_test_accuracy']['mean']:.4f} +- {s['target_test_accuracy']['std']:.4f}, "
              f"source {s['source_test_accuracy']['mean']:.4f}, "
              f"domain regressor {s['domain_train_accuracy']['mean']:.4f}")
    print(f"timings (s): {metrics['timings']}")


if __name__ == "__main__":
    common.run_cli(main)
