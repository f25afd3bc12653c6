"""Question 3.1: shallow DANN on the inter-twinning moons (Ganin et al., JMLR 2016, Section
5.1.1, Algorithm 1, Figure 2), beside a standard network trained the same way.

    python q3_toy_dann.py --lambda 6                  # the text's size: 150 examples per class
    python q3_toy_dann.py --lambda 6 --seeds 5        # mean and spread over 5 seeds
    python q3_toy_dann.py --lambda 6 --n-per-class 75 # the authors' Figure-2 setting
    python q3_toy_dann.py --lambda 6 --epochs 50      # a short run
    python q3_toy_dann.py --eval-only                 # rescore nn.pt, dann.pt into <out>/eval/
    python q3_toy_dann.py --report-only               # rewrite report.md from metrics.json
"""
import argparse
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import ListedColormap
from scipy.special import expit
from torch import nn

import common
from common import UserError, check, grad_reverse, stage

SCRIPT, OUT = "q3_toy_dann.py", "outputs/q3_toy"
KIND = {"nn": "q3_toy_dann/nn", "dann": "q3_toy_dann/dann"}
MODELS, TITLE = ("nn", "dann"), {"nn": "Standard NN", "dann": "DANN"}
ANGLE, NOISE, HIDDEN_UNITS, LR = 35.0, 0.05, 15, 0.05  # the authors' code
DATA_SEED, TEST_PER_CLASS, HELD_OUT_SEED = 1, 1000, 1_000_000  # held-out: data seed + this
CONSTANTS = dict(angle=ANGLE, noise=NOISE, hidden_units=HIDDEN_UNITS, lr=LR,
                 data_seed=DATA_SEED, test_per_class=TEST_PER_CLASS)
LAST_EPOCHS = 50  # how much target accuracy still moves

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-per-class", type=common.positive_int, default=150)
    p.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=common.nonnegative_float,
                   default=6.0)
    p.add_argument("--epochs", type=common.positive_int, default=500)
    p.add_argument("--seeds", type=common.positive_int, default=1)
    common.add_common_args(p, OUT, seed_default=42, data_dir=False, resume=False)
    args = common.parse(p, argv)
    if args.seed + args.seeds > 2 ** 32:
        p.error(f"--seed {args.seed} with --seeds {args.seeds} goes past 2**32 - 1")
    return args

# --- Model: Algorithm 1's shallow network, float64 as the authors' code
class ShallowNetwork(nn.Module):
    """G_f = sigm(b + W x), G_y = softmax(c + V G_f), G_d = sigm(d + u^T G_f) (1: source)."""

    def __init__(self, hidden_units=HIDDEN_UNITS, n_features=2, n_classes=2):
        super().__init__()
        zeros = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=torch.float64))  # noqa
        self.W, self.b = zeros(hidden_units, n_features), zeros(hidden_units)
        self.V, self.c = zeros(n_classes, hidden_units), zeros(n_classes)
        self.u, self.d = zeros(hidden_units), zeros(())

    def features(self, x):
        return torch.sigmoid(F.linear(torch.as_tensor(x, dtype=torch.float64), self.W, self.b))

    def forward(self, x):  # (N, 2) points -> (N, 2) label logits
        return F.linear(self.features(x), self.V, self.c)

    def domain_logit(self, x):  # (N, 2) points -> (N,) logits of G_d, > 0: source
        return self.features(x) @ self.u + self.d

def initial_weights(rng, D, m=2, L=2):
    """W then V uniform in +-sqrt(6 / (fan_in + fan_out)), the authors' order of draws."""
    return np.sqrt(6 / (m + D)) * (2 * rng.rand(D, m) - 1), np.sqrt(6 / (D + L)) * (
        2 * rng.rand(L, D) - 1)

def load_model(path):
    """The ShallowNetwork of nn.pt or dann.pt: (N,2) points -> (N,2) logits."""
    state = common.load_checkpoint(path, tuple(KIND.values()))
    return common.load_weights(ShallowNetwork(state["hparams"]["hidden_units"]), state, path)

# --- Losses and Algorithm 1's step, the reference: autograd through gradient reversal
def reference_step(network, x_i, y_i, x_j, adversarial, lambda_, lr):
    """Ly on (x_i, y_i), Ld on x_i (source, 1) and x_j (target, 0): W, b, V, c step mu down
    Ly - lambda Ld (a DANN's only through the reversal layer); u, d step mu lambda down Ld."""
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

# --- The same step, fast: Algorithm 1's closed form for all networks (models, seeds) at once.
# Wb = [W | b] (M,D,3) acts on [x; 1], Vc = [V | c] (M,L,D+1), ud = [u | d] (M,1,D+1) on [G_f; 1]
class Networks:
    def __init__(self, W, b, V, c, u, d, adversarial):
        self.Wb = np.concatenate((W, b[..., None]), 2)
        self.Vc = np.concatenate((V, c[..., None]), 2)
        self.ud = np.concatenate((u, d[:, None]), 1)[:, None, :]
        self.adversarial = np.asarray(adversarial, dtype=bool)
        self.hidden = np.ones((len(b), b.shape[1] + 1, 2))  # G_f(x_i), G_f(x_j) over 1

    def parameters(self):  # W, b, V, c, u, d
        return (self.Wb[..., :-1], self.Wb[..., -1], self.Vc[..., :-1], self.Vc[..., -1],
                self.ud[:, 0, :-1], self.ud[:, 0, -1])

    def module(self, k):  # network k as a ShallowNetwork
        network = ShallowNetwork(self.Wb.shape[1], self.Wb.shape[2] - 1, self.Vc.shape[1])
        with torch.no_grad():
            for p, value in zip(network.parameters(), self.parameters()):
                p.copy_(torch.from_numpy(np.array(value[k])))
        return network

def algorithm1_step(net, x, x_t, e_y, lr, lambda_):
    """x (M,3,2): columns [x_i; 1] (source), [x_j; 1] (target); x_t its transpose; e_y
    (M,L,1): e(y_i). Every Delta comes from the parameters before the step."""
    h = net.hidden
    expit(net.Wb @ x, out=h[:, :-1])  # G_f(x_i), G_f(x_j)
    h_i, h_ij = h[:, :, :1], h[:, :-1]
    o = net.Vc @ h_i  # G_y(G_f(x_i)) = softmax(c + V h_i)
    o -= o.max(1, keepdims=True)
    np.exp(o, out=o)
    o /= o.sum(1, keepdims=True)
    delta_c = o - e_y  # Delta_c = -(e(y_i) - G_y)
    domain = np.array([[[1.0, 0.0]]]) - expit(net.ud @ h)  # (1 - G_d(x_i), -G_d(x_j))
    # Delta_b at x_i, x_j: a DANN's `tmp` terms lambda (1 - G_d(x_i)) u, -lambda G_d(x_j) u,
    # plus V^T Delta_c at x_i; all times h (1 - h)
    u = net.ud[:, :, :-1].transpose(0, 2, 1)
    delta_b = (lambda_ * net.adversarial[:, None, None]) * u * domain
    delta_b[:, :, :1] += net.Vc[:, :, :-1].transpose(0, 2, 1) @ delta_c
    delta_b *= h_ij * (1 - h_ij)
    net.Wb -= lr * (delta_b @ x_t)  # W -= mu Delta_W, b -= mu Delta_b
    net.Vc -= lr * (delta_c @ h_i.transpose(0, 2, 1))  # V -= mu Delta_V, c -= mu Delta_c
    net.ud += lr * lambda_ * (domain @ h.transpose(0, 2, 1))  # u, d += mu Delta_u, mu Delta_d

# --- Training loop: every source example in turn, with one uniformly random target example
def with_ones(X):  # (..., N, 2) points -> (..., N, 3) rows [x; 1]
    return np.concatenate((X, np.ones(X.shape[:-1] + (1,))), -1)

def train_epoch(net, source, e_y, target, j, lr, lambda_):
    """source (M,n,3), target (M,n',3): rows [x; 1]; e_y (n,M,L,1); j (M,n): target picks."""
    x_t = np.stack((source, np.take_along_axis(target, j[..., None], 1)), 2)  # (M,n,2,3)
    x_t = x_t.transpose(1, 0, 2, 3).copy()  # (n,M,2,3): step i's rows
    x = x_t.transpose(0, 1, 3, 2).copy()  # (n,M,3,2): its columns
    for i in range(source.shape[1]):
        algorithm1_step(net, x[i], x_t[i], e_y[i], lr, lambda_)

def target_accuracy(net, target, yt):  # on the training target, each network
    hidden = with_ones(expit(target @ net.Wb.transpose(0, 2, 1)))  # (M,N,D+1)
    return ((hidden @ net.Vc.transpose(0, 2, 1)).argmax(2) == yt).mean(1)

def train(args, data):
    """Network k < K is seed k's standard NN, K + k its DANN; both draw from RandomState(seed + k)
    (init, target examples). Returns them and each epoch's target accuracy."""
    K, rngs = args.seeds, [np.random.RandomState(args.seed + k) for k in range(args.seeds)]
    W, V = (np.stack(w * 2) for w in zip(*[initial_weights(r, HIDDEN_UNITS) for r in rngs]))
    b, u = np.zeros((2, 2 * K, HIDDEN_UNITS))
    net = Networks(W, b, V, np.zeros((2 * K, 2)), u, np.zeros(2 * K), [False] * K + [True] * K)
    Xs, ys, Xt, yt = (np.stack([d["train"][i] for d in data] * 2) for i in range(4))
    source, target, e_y = with_ones(Xs), with_ones(Xt), np.eye(2)[ys].transpose(1, 0, 2)[..., None]
    history = [target_accuracy(net, target, yt)]  # untrained
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        for epoch in range(1, args.epochs + 1):
            j = np.stack([rng.randint(Xt.shape[1], size=Xs.shape[1]) for rng in rngs])
            train_epoch(net, source, e_y, target, np.concatenate((j, j)), LR, args.lambda_)
            history.append(target_accuracy(net, target, yt))
            if not np.isfinite(net.Wb.sum() + net.Vc.sum() + net.ud.sum()):
                raise UserError(f"the weights became inf or nan at epoch {epoch}; nothing was "
                                f"saved (a smaller --lambda may help)")
    return net, history

def last_epochs(history, k):
    values = [h[k] for h in history[1:][-LAST_EPOCHS:]]
    return {"epochs": len(values), "mean": float(np.mean(values)),
            "min": float(np.min(values)), "max": float(np.max(values))}

# --- Evaluation
def predict(network, X):
    return network(torch.as_tensor(X)).argmax(1).detach().numpy()

def is_source(network, X):
    return (network.domain_logit(torch.as_tensor(X)) > 0).detach().numpy()

def evaluate(network, data):
    """Label and domain regressor accuracies; the domain read from G_f by an RBF SVM."""
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    result = {}
    for split in ("train", "test"):  # Xt, yt: held-out, below
        Xs, ys, Xt, yt = data[split]
        result[f"source_{split}_accuracy"] = float(np.mean(predict(network, Xs) == ys))
        result[f"target_{split}_accuracy"] = float(np.mean(predict(network, Xt) == yt))
        result[f"domain_{split}_accuracy"] = float(np.mean(np.concatenate(
            [is_source(network, Xs), ~is_source(network, Xt)])))
    n, hidden = len(data["train"][0]), network.features(np.vstack(data["train"][::2])).detach()
    result[SCORES_SVM] = float(cross_val_score(
        SVC(), hidden.numpy(), np.r_[np.ones(n), np.zeros(n)], cv=min(5, n)).mean())
    result["target_test"] = common.classification_metrics(yt, predict(network, Xt), ["0", "1"])
    return result

SCORES = {"source_train_accuracy": "source train", "target_train_accuracy": "target train",
          "source_test_accuracy": "source held-out", "target_test_accuracy": "target held-out",
          "domain_train_accuracy": "domain regressor train",
          "domain_test_accuracy": "domain regressor held-out",
          "representation_domain_accuracy": "domain from hidden layer (SVM)"}
SCORES_SVM = "representation_domain_accuracy"

def results_of(runs):  # each seed's, their mean and std (ddof=1; 0 for one seed)
    summary = {model: {score: {"mean": float(np.mean(v)), "values": v,
                               "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                       for score in SCORES for v in [[run[model][score] for run in runs]]}
               for model in MODELS}
    return {"runs": {str(run["seed"]): run for run in runs}, "summary": summary}

# --- Checks: the judgements, on the means over the seeds
def checks_of(results):
    mean = lambda m, s: results["summary"][m][s]["mean"]  # noqa: E731
    gain, svm, chance = (f("dann") - f("nn") for f in (
        lambda m: mean(m, "target_test_accuracy"), lambda m: mean(m, SCORES_SVM),
        lambda m: abs(mean(m, "domain_train_accuracy") - 0.5)))
    wrong = sum(int(np.sum(cm) - np.trace(cm)) for cm in [
        run["dann"]["target_test"]["confusion_matrix"] for run in results["runs"].values()])
    return [check("DANN minus standard NN: target held-out accuracy", gain, "> 0", gain > 0),
            check("held-out target points DANN misclassifies", wrong, "0 (the paper: "
                  "'perfectly')", wrong == 0),
            check("DANN minus standard NN: domain from hidden layer (SVM)", svm, "< 0", svm < 0),
            check("DANN minus standard NN: domain regressor's distance from chance", chance,
                  "< 0", chance < 0)]

# --- Figures, drawn as the authors draw Figure 2
COLUMNS = {"label": "LABEL CLASSIFICATION", "pca": "REPRESENTATION PCA",
           "domain": "DOMAIN CLASSIFICATION", "neurons": "HIDDEN NEURONS"}
COLOURS = {"label": ListedColormap(["#FF0000", "#00FF00"]),  # at alpha 0.4
           "domain": ListedColormap(["#000000", "#0000FF"])}
def draw_points(ax, Xs, ys, Xt, window=None):
    """Source label 0 as red '+', label 1 as green '-', target as black dots."""
    ax.scatter(*Xs[ys == 0].T, marker="+", c="red", s=45, linewidths=1.3, zorder=3)
    ax.scatter(*Xs[ys == 1].T, marker="_", c="green", s=45, linewidths=1.6, zorder=3)
    ax.scatter(*Xt.T, c="black", s=7, zorder=3)
    ax.set(xticks=[], yticks=[], **dict(zip(("xlim", "ylim"), window or ())))

def draw_panel(ax, column, network, data):
    Xs, ys, Xt, _ = data["train"]
    if column == "pca":
        from sklearn.decomposition import PCA

        project = PCA(2).fit(network.features(np.vstack((Xs, Xt))).detach()).transform
        return draw_points(ax, project(network.features(Xs).detach()), ys,
                           project(network.features(Xt).detach()))
    window = [(s * Xs[:, i].min(), s * Xs[:, i].max()) for i, s in ((0, 1.1), (1, 1.5))]
    (x0, x1), (y0, y1) = window
    if column in COLOURS:  # regions and decision line
        xx, yy = np.meshgrid(np.arange(x0, x1, 0.02), np.arange(y0, y1, 0.02))
        Z = (predict if column == "label" else is_source)(network, np.c_[xx.ravel(), yy.ravel()])
        Z = Z.reshape(xx.shape).astype(float)
        ax.contourf(xx, yy, Z, levels=[-0.5, 0.5, 1.5], cmap=COLOURS[column], alpha=0.4)
        if 0 < Z.mean() < 1:
            ax.contour(xx, yy, Z, levels=[0.5], colors="black", linewidths=2)
    W, b = network.W.detach().numpy(), network.b.detach().numpy()
    for k in range(len(b)) if column == "neurons" else []:  # where unit k's sigmoid is 1/2
        ax.plot([x0, x1], [-(W[k, 0] * x + b[k]) / W[k, 1] for x in (x0, x1)],
                color=plt.get_cmap("tab20")(k % 20))
    draw_points(ax, Xs, ys, Xt, window)

def figure2(networks, data, out):
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.2))
    for r, (model, network) in enumerate(networks.items()):
        for c, column in enumerate(COLUMNS):
            draw_panel(axes[r, c], column, network, data)
            axes[r, c].set_title(f"{TITLE[model]}: {COLUMNS[column]}", fontsize=11)
    fig.tight_layout()
    common.save_figure(fig, os.path.join(out, "figure2.png"))

def training_curves(history, K, out):
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, model in enumerate(MODELS):
        ax.plot([h[m * K] for h in history], label=TITLE[model])
    ax.set(title="accuracy on the training target points, first seed", xlabel="epoch")
    ax.legend()
    common.save_figure(fig, os.path.join(out, "training_curves.png"))

# --- The report: a template filled from metrics.json and runs/*/metrics.json
REPORT = """# Question 3.1: shallow DANN on the two moons (Ganin et al. 2016, Section 5.1.1)

Command: `{command}`  
Machine: {machine[description]}

{settings[n_per_class]} source and {settings[n_per_class]} target points per class, lambda \
{settings[lambda_]:g}, {settings[epochs]} epochs, {settings[seeds]} seed(s) from seed \
{settings[seed]}; held-out: 1000 points per class and domain.

## Figure 2 (seed {first[seed]}, data seed {first[data_seed]}) and training curves

![figure 2](figure2.png)

![training curves](training_curves.png)

## Accuracies (mean +- standard deviation over seeds) and checks

{accuracies}

{checks}

The paper prints no accuracy for this problem (Section 5.1.1, pp. 10-16); of its Figure 2 it \
says that DANN classifies the target "perfectly"; its PCA column shows the standard NN keeping \
the domains apart, DANN mixing them.

## Other runs (target accuracy: mean, standard deviation over seeds)

{runs}

## Choices where the paper is silent (the authors' code, unless said)

- **Data**: `make_moons` (noise 0.05), random_state 1 (source) and 2 (target), centred on the \
source mean, scaled by 2, the target rotated 35 degrees about it; {settings[n_per_class]} per \
class (the text: 150; theirs: 75). Held-out (the paper has none): random_state 1000001, 1000002.
- **Training**: `RandomState(seed)` draws W, V, then a target example per source example and \
epoch; per-sample SGD, learning rate 0.05, lambda {settings[lambda_]:g} (theirs: 6), 15 hidden \
units (the paper), {settings[epochs]} epochs (theirs: 500), float64. Seed k: seed + k, random \
states + 2k. The SVM: 5-fold cross-validated on G_f of the training points.

Seconds: {timings}; {training[networks]} networks x {training[steps_per_network]:,} SGD steps.
"""
RUN_COLUMNS = [("per class", "settings.n_per_class", "{}"), ("seeds", "settings.seeds", "{}")] + [
    (f"{TITLE[m]} target {split} {stat}", f"results.summary.{m}.target_{key}_accuracy.{stat}",
     "{:.4f}") for split, key in (("held-out", "test"), ("train", "train")) for m in MODELS
    for stat in ("mean", "std")] + [("training s", "timings.training", "{}"),
                                    ("machine", "machine.description", "{}")]

def render_report(metrics, out):
    r, first = metrics["results"], next(iter(metrics["results"]["runs"]))
    last = metrics["training"]["target_train_last_epochs"][first]
    rows = [[TITLE[m], *(f"{v['mean']:.4f} +- {v['std']:.4f}" for v in r["summary"][m].values()),
             "{min:.4f} - {max:.4f}".format(**last[m])] for m in MODELS]
    return common.fill(
        REPORT, metrics, command=common.shown_command(metrics["command"]), first=r["runs"][first],
        accuracies="\n".join(f"| {' | '.join(row)} |" for row in [
            ["model", *SCORES.values(), f"target train, last {last['nn']['epochs']} epochs, first "
             "seed"], ["---"] * (len(SCORES) + 2), *rows]),
        checks=common.checks_table(metrics["checks"]),
        timings=", ".join(f"{k} {v}" for k, v in metrics["timings"].items()),
        runs=common.runs_table(out, SCRIPT, RUN_COLUMNS) or "No runs in `runs/`.")

# --- Main
def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        return common.report_only(args.out, SCRIPT, render_report)
    common.prepare_out(args.out)
    common.choose_device(args.device)  # checked; the toy uses the CPU
    if args.eval_only:
        return eval_only(args)
    K, timings = args.seeds, {}
    with stage(timings, "data"):
        data = [make_data(args.n_per_class, DATA_SEED + 2 * k) for k in range(K)]
    with stage(timings, "training"):
        net, history = train(args, data)
    networks = [{model: net.module(m * K + k) for m, model in enumerate(MODELS)} for k in range(K)]
    for model, network in networks[0].items():
        common.save_checkpoint(os.path.join(args.out, f"{model}.pt"), KIND[model], {
            **CONSTANTS, **common.settings_of(args), "seeds": 1, "model": model}, network)
    common.note_saved(f"the weights are saved in {args.out}")
    results = measure(args, networks, data, args.out, timings)
    last = {seed: {m: last_epochs(history, i * K + k) for i, m in enumerate(MODELS)}
            for k, seed in enumerate(results["runs"])}  # from training, not the weights
    with stage(timings, "figures"):
        training_curves(history, K, args.out)
    training = {"networks": 2 * K, "steps_per_network": args.epochs * 2 * args.n_per_class,
                "target_train_last_epochs": last}
    metrics = common.record(SCRIPT, args, "cpu", data_record(args), timings, checks_of(results),
                            results, training=training)
    common.write_json(os.path.join(args.out, "metrics.json"), metrics)
    common.write_text(os.path.join(args.out, "report.md"), render_report(metrics, args.out))
    print(*(f"{TITLE[m]}: target held-out accuracy {s['target_test_accuracy']['mean']:.4f}"
            for m, s in results["summary"].items()), sep="\n")

def measure(args, networks, data, out, timings):
    with stage(timings, "evaluation"):
        results = results_of([{"seed": args.seed + k, "data_seed": DATA_SEED + 2 * k, **{
            model: evaluate(network, data[k]) for model, network in networks[k].items()}}
            for k in range(args.seeds)])
    with stage(timings, "figures"):
        figure2(networks[0], data[0], out)
    return results

def eval_only(args):
    """nn.pt, dann.pt scored again into OUT/eval/, compared with the metrics.json beside them."""
    path, weights = (os.path.join(args.out, name) for name in ("metrics.json", "%s.pt"))
    if not os.path.isfile(path):
        raise UserError(f"--eval-only: there is no {path} to compare with; nothing was verified")
    committed = common.read_metrics(path, SCRIPT)
    for model in MODELS:  # evaluate as the run did
        vars(args).update({k: common.load_checkpoint(weights % model, KIND[model])["hparams"][k]
                           for k in ("n_per_class", "lambda_", "epochs", "seed")}, seeds=1)
    timings, eval_dir = {}, common.prepare_out(os.path.join(args.out, "eval"))
    with stage(timings, "data"):
        data = [make_data(args.n_per_class, DATA_SEED)]
    results = measure(args, [{m: load_model(weights % m) for m in MODELS}], data, eval_dir, timings)
    metrics = common.record(SCRIPT, args, "cpu", data_record(args), timings, checks_of(results),
                            results)
    common.write_json(os.path.join(eval_dir, "metrics.json"), metrics)
    if committed["settings"].get("seeds", 1) > 1:  # the weights are the first seed's
        committed = {"checks": [], "results": {"runs": dict(list(
            committed["results"].get("runs", {}).items())[:1])}}
    common.compare_with_committed(metrics, committed, eval_dir)

# --- Data: two moons; the target is a second sample rotated about the source mean
def moons(n_per_class, random_state, noise=NOISE):
    from sklearn.datasets import make_moons
    return make_moons(2 * n_per_class, noise=noise, random_state=random_state)

def make_domains(n_per_class, seed, angle=ANGLE, noise=NOISE, centre=None):
    """(Xs, ys, Xt, yt): source moons from random_state `seed`, target moons from `seed + 1`
    rotated by `angle` degrees counter-clockwise about the source mean; both centred on that
    mean (or `centre`, raw coordinates) and scaled by 2, as the authors' code."""
    Xs, ys = moons(n_per_class, seed, noise)
    Xt, yt = moons(n_per_class, seed + 1, noise)
    centre = Xs.mean(axis=0) if centre is None else np.asarray(centre)
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    return 2 * (Xs - centre), ys, 2 * (Xt - centre) @ np.array([[c, -s], [s, c]]).T, yt

def make_data(n_per_class, data_seed):
    """Training and held-out domains (other random states) in the same coordinates."""
    centre = moons(n_per_class, data_seed)[0].mean(axis=0)
    return {"train": make_domains(n_per_class, data_seed),
            "test": make_domains(TEST_PER_CLASS, data_seed + HELD_OUT_SEED, centre=centre)}

def data_record(args):
    return {"per_class": args.n_per_class, "held_out_per_class": TEST_PER_CLASS,
            "random_states": [DATA_SEED + 2 * k for k in range(args.seeds)]}

if __name__ == "__main__":
    common.run_cli(main)
