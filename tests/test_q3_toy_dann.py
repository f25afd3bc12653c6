"""Tests of q3_toy_dann.py: the data; Algorithm 1's reference update (autograd and the
gradient reversal layer) against its closed-form equations computed independently in NumPy;
the fast lockstep update against the reference, step by step; the training loop's order of
random draws; the script end to end on a tiny problem (weights, eval-only, report-only,
checks); one-sentence answers to bad flags, weights and metrics files."""
import copy
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import common
import q3_toy_dann as q

TINY = ["--epochs", "2", "--n-per-class", "12"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "outputs", "q3_toy")


def sigm(z):
    return 1 / (1 + np.exp(-z))


def cli(argv, capsys):
    """Run the script as from the command line: (exit code, stdout, stderr)."""
    code = 0
    try:
        common.run_cli(q.main, argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence_error(argv, capsys):
    code, _, err = cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def fingerprints(folder):
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- Data
def test_make_domains_sizes_labels_and_centring():
    Xs, ys, Xt, yt = q.make_domains(20, 3)
    assert Xs.shape == Xt.shape == (40, 2)
    assert np.bincount(ys).tolist() == np.bincount(yt).tolist() == [20, 20]
    np.testing.assert_allclose(Xs.mean(0), 0, atol=1e-12)  # centred on the source mean
    raw, _ = q.moons(20, 3)
    np.testing.assert_allclose(Xs, 2 * (raw - raw.mean(0)))  # and scaled by 2
    assert not np.allclose(q.make_domains(20, 4)[0], Xs)  # another seed, another sample


@pytest.mark.parametrize("angle", [35.0, -20.0, 120.0])
def test_rotation_angle_measured_back_from_the_data(angle):
    Xs0, _, Xt0, _ = q.make_domains(30, 5, angle=0.0)
    Xs, _, Xt, yt = q.make_domains(30, 5, angle=angle)
    np.testing.assert_array_equal(Xs, Xs0)  # only the target moves
    cross = np.sum(Xt0[:, 0] * Xt[:, 1] - Xt0[:, 1] * Xt[:, 0])
    measured = np.degrees(np.arctan2(cross, np.sum(Xt0 * Xt)))
    assert measured == pytest.approx(angle, abs=1e-9)  # counter-clockwise is positive
    t = np.deg2rad(measured)
    rotation = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    np.testing.assert_allclose(Xt0 @ rotation.T, Xt, atol=1e-12)  # about the mean: no shift


def test_held_out_samples_share_the_training_coordinates():
    data = q.make_data(50, 1)
    Xs, ys, Xt, yt = data["test"]
    assert Xs.shape == Xt.shape == (2 * q.TEST_PER_CLASS, 2)
    np.testing.assert_allclose(Xs.mean(0), 0, atol=0.1)  # near, not at, the training mean
    assert np.abs(Xs.mean(0)).max() > 0
    train = data["train"][0]
    assert np.min(((Xs[:, None] - train[None]) ** 2).sum(-1)) > 0  # no training point reused


# --- Algorithm 1
def algorithm1_numpy(W, b, V, c, u, d, x_i, y_i, x_j, lam, mu, adversarial):
    """One inner iteration of Algorithm 1 (Ganin et al. 2016, p. 14), line by line. The
    standard NN skips the two `tmp` corrections of the hidden layer."""
    h_i = sigm(b + W @ x_i)
    o = np.exp(c + V @ h_i)
    o /= o.sum()
    e = np.eye(len(c))[y_i]
    dc = -(e - o)
    dV = np.outer(dc, h_i)
    db = (V.T @ dc) * h_i * (1 - h_i)
    dW = np.outer(db, x_i)
    g_i = sigm(d + u @ h_i)                       # from the current domain
    dd = lam * (1 - g_i)
    du = lam * (1 - g_i) * h_i
    if adversarial:
        tmp = lam * (1 - g_i) * u * h_i * (1 - h_i)
        db, dW = db + tmp, dW + np.outer(tmp, x_i)
    h_j = sigm(b + W @ x_j)                       # from the other domain
    g_j = sigm(d + u @ h_j)
    dd -= lam * g_j
    du -= lam * g_j * h_j
    if adversarial:
        tmp = -lam * g_j * u * h_j * (1 - h_j)
        db, dW = db + tmp, dW + np.outer(tmp, x_j)
    return W - mu * dW, b - mu * db, V - mu * dV, c - mu * dc, u + mu * du, d + mu * dd


def random_network(rng, D=15):
    """A network with every parameter non-zero, so that every term of the update counts."""
    net = q.ShallowNetwork(D)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.from_numpy(rng.normal(0, 0.8, p.shape)))
    return net


def numpy_parameters(net):
    return [p.detach().numpy().copy() for p in net.parameters()]


def stacked(modules, adversarial):
    """The modules as one q.Networks (parameters stacked on a leading axis)."""
    return q.Networks(*[np.stack(group) for group in zip(*map(numpy_parameters, modules))],
                      adversarial)


@pytest.mark.parametrize("lam,mu", [(6.0, 0.05), (0.7, 0.3)])
@pytest.mark.parametrize("adversarial", [False, True])
def test_reference_step_equals_algorithm1_closed_form(lam, mu, adversarial):
    rng = np.random.default_rng(0)
    net = random_network(rng)
    start = numpy_parameters(net)
    x_i, x_j = rng.normal(size=2), rng.normal(size=2)
    q.reference_step(net, torch.from_numpy(x_i), torch.tensor(1), torch.from_numpy(x_j),
                     adversarial, lam, mu)
    expected = algorithm1_numpy(*start, x_i, 1, x_j, lam, mu, adversarial)
    for name, got, want, old in zip("WbVcud", numpy_parameters(net), expected, start):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13, err_msg=name)
        assert not np.allclose(got, old), name  # every parameter moved


def test_gradient_reversal_reaches_only_the_dann_hidden_layer():
    """From the same weights, the DANN's step differs from the standard NN's only in W and b,
    by mu x lambda x the plain gradient of Ld (the reversal turns descent into ascent)."""
    rng = np.random.default_rng(1)
    nn_net = random_network(rng)
    dann = copy.deepcopy(nn_net)
    x = torch.from_numpy(rng.normal(size=(2, 2)))
    lam, mu = 2.5, 0.1
    hidden = dann.features(x)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(
        hidden @ dann.u + dann.d, torch.tensor([1.0, 0.0], dtype=torch.float64), reduction="sum")
    grad_W, grad_b = torch.autograd.grad(plain, [dann.W, dann.b])
    q.reference_step(nn_net, x[0], torch.tensor(0), x[1], False, lam, mu)
    q.reference_step(dann, x[0], torch.tensor(0), x[1], True, lam, mu)
    torch.testing.assert_close(dann.W - nn_net.W, mu * lam * grad_W)
    torch.testing.assert_close(dann.b - nn_net.b, mu * lam * grad_b)
    assert grad_W.abs().max() > 0
    for name in "Vcud":
        torch.testing.assert_close(getattr(dann, name), getattr(nn_net, name), rtol=0, atol=0)


def test_fast_lockstep_steps_equal_the_reference_step_by_step():
    """Four networks (two standard NN, two DANN, all different) take 100 steps together in
    algorithm1_step and one by one in reference_step; after every step they agree."""
    rng = np.random.default_rng(2)
    modules = [random_network(rng) for _ in range(4)]
    adversarial = [False, True, False, True]
    net = stacked(modules, adversarial)
    start = copy.deepcopy(net.parameters())
    lam, mu = 6.0, 0.05
    for step in range(100):
        pairs = rng.normal(size=(4, 2, 2))            # x_i, x_j of each network
        labels = rng.integers(0, 2, size=4)
        x_t = q.with_ones(pairs)
        q.algorithm1_step(net, x_t.transpose(0, 2, 1).copy(), x_t,
                          np.eye(2)[labels][..., None], mu, lam)
        for k, module in enumerate(modules):
            q.reference_step(module, torch.from_numpy(pairs[k, 0]), torch.tensor(labels[k]),
                             torch.from_numpy(pairs[k, 1]), adversarial[k], lam, mu)
            for name, fast, ref in zip("WbVcud", net.parameters(), module.parameters()):
                np.testing.assert_allclose(fast[k], ref.detach().numpy(), rtol=0, atol=1e-10,
                                           err_msg=f"network {k}, {name}, step {step}")
    for name, now, then in zip("WbVcud", net.parameters(), start):
        assert np.abs(now - then).min() > 0, name  # every parameter of every network moved


def test_networks_round_trip_and_init_follows_algorithm1():
    rng = np.random.RandomState(42)
    W, V = q.initial_weights(rng, 15)
    bound = np.sqrt(6 / (2 + 15))
    assert np.abs(W).max() <= bound and np.abs(V).max() <= bound and np.abs(W).max() > bound / 2
    rs = np.random.RandomState(42)  # the authors' order of draws: W (15 x 2) then V (2 x 15)
    np.testing.assert_array_equal(W, bound * (2 * rs.rand(15, 2) - 1))
    np.testing.assert_array_equal(V, np.sqrt(6 / 17) * (2 * rs.rand(2, 15) - 1))
    modules = [random_network(np.random.default_rng(k)) for k in range(3)]
    net = stacked(modules, [False, True, True])
    for k, module in enumerate(modules):
        for a, b in zip(net.module(k).parameters(), module.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_loop_equals_algorithm1_with_the_same_random_draws():
    """Three epochs of train() (2 seeds x 2 models), against Algorithm 1 run one network at a
    time in NumPy: the same init and the same target example drawn at each step."""
    args = q.parse_args(["--n-per-class", "6", "--epochs", "3", "--seeds", "2"])
    K, lam, mu = 2, args.lambda_, q.LR
    data = [q.make_data(6, 1 + 2 * k) for k in range(K)]
    net, history = q.train(args, data)
    assert len(history) == 4  # epoch 0 (before training) and three epochs
    for m in range(2 * K):
        k, adversarial = m % K, m >= K
        Xs, ys, Xt, yt = data[k]["train"]
        rs = np.random.RandomState(42 + k)
        W, V = q.initial_weights(rs, 15)
        p = [W, np.zeros(15), V, np.zeros(2), np.zeros(15), np.zeros(())]
        for _ in range(3):
            for i in range(len(Xs)):
                j = rs.randint(len(Xt))
                p = algorithm1_numpy(*p, Xs[i], ys[i], Xt[j], lam, mu, adversarial)
        for got, want in zip(net.parameters(), p):
            np.testing.assert_allclose(got[m], want, rtol=1e-9, atol=1e-10)
        h = sigm(q.with_ones(Xt) @ np.c_[p[0], p[1]].T)
        assert history[-1][m] == np.mean((np.c_[h, np.ones(len(h))] @ np.c_[p[2], p[3]].T)
                                         .argmax(1) == yt)


# --- The script end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("q3toy")
    q.main(TINY + ["--seeds", "2", "--out", str(out)])
    return out


def test_end_to_end_writes_its_outputs_and_beats_an_untrained_network(trained):
    for name in ["figure2.png", "training_curves.png", "nn.pt", "dann.pt", "metrics.json",
                 "report.md"]:
        assert (trained / name).stat().st_size > 0, name
    metrics = common.read_metrics(str(trained / "metrics.json"), q.SCRIPT)
    assert list(metrics)[:4] == ["script", "command", "settings", "machine"]
    assert metrics["settings"] == {"n_per_class": 12, "lambda_": 6.0, "epochs": 2, "seeds": 2,
                                   "seed": 42}
    assert list(metrics["timings"]) == ["data", "training", "evaluation", "figures", "total"]
    runs = metrics["results"]["runs"]
    assert list(runs) == ["42", "43"] and runs["43"]["data_seed"] == 3
    for model in q.MODELS:
        for score in q.SCORES:
            values = [run[model][score] for run in runs.values()]
            assert metrics["results"]["summary"][model][score]["mean"] == pytest.approx(
                np.mean(values))
    last = metrics["training"]["target_train_last_epochs"]["43"]["dann"]
    assert last["epochs"] == 2 and last["min"] <= last["mean"] <= last["max"]
    data = q.make_data(12, 1)  # two epochs classify the held-out source better than the init
    W, V = q.initial_weights(np.random.RandomState(42), 15)
    untrained = q.Networks(W[None], np.zeros((1, 15)), V[None], np.zeros((1, 2)),
                           np.zeros((1, 15)), np.zeros(1), [False]).module(0)
    before = q.evaluate(untrained, data)["source_test_accuracy"]
    assert runs["42"]["nn"]["source_test_accuracy"] > before + 0.1


def test_load_model_maps_points_to_label_logits(trained):
    model = q.load_model(str(trained / "dann.pt"))
    assert model(torch.zeros(5, 2)).shape == (5, 2)
    metrics = json.loads((trained / "metrics.json").read_text())
    Xs, ys, Xt, yt = q.make_data(12, 1)["test"]
    accuracy = (model(torch.from_numpy(Xt)).argmax(1).numpy() == yt).mean()
    assert accuracy == metrics["results"]["runs"]["42"]["dann"]["target_test_accuracy"]


def test_first_seed_of_several_equals_the_single_run_bit_for_bit(trained, tmp_path):
    q.main(TINY + ["--out", str(tmp_path)])
    for model in q.MODELS:
        alone = torch.load(tmp_path / f"{model}.pt", weights_only=False)["model"]
        beside = torch.load(trained / f"{model}.pt", weights_only=False)["model"]
        for key in alone:
            torch.testing.assert_close(alone[key], beside[key], rtol=0, atol=0)
    one = json.loads((tmp_path / "metrics.json").read_text())["results"]["runs"]["42"]
    two = json.loads((trained / "metrics.json").read_text())["results"]["runs"]["42"]
    assert one == two


def test_checks_follow_the_numbers(trained):
    results = json.loads((trained / "metrics.json").read_text())["results"]

    def holds(means):
        changed = copy.deepcopy(results)
        for (model, score), value in means.items():
            changed["summary"][model][score]["mean"] = value
        return [c["holds"] for c in q.checks_of(changed)]

    assert holds({("nn", "target_test_accuracy"): 0.7, ("dann", "target_test_accuracy"): 0.8,
                    ("nn", q.SCORES_SVM): 0.8, ("dann", q.SCORES_SVM): 0.6,
                    ("nn", "domain_train_accuracy"): 0.7, ("dann", "domain_train_accuracy"): 0.45}
                 ) == [True, False, True, True]
    assert holds({("nn", "target_test_accuracy"): 0.8, ("dann", "target_test_accuracy"): 0.8,
                    ("nn", q.SCORES_SVM): 0.6, ("dann", q.SCORES_SVM): 0.6,
                    ("nn", "domain_train_accuracy"): 0.4, ("dann", "domain_train_accuracy"): 0.7}
                 ) == [False, False, False, False]
    perfect = copy.deepcopy(results)
    for run in perfect["runs"].values():
        run["dann"]["target_test"]["confusion_matrix"] = [[5, 0], [0, 7]]
    assert q.checks_of(perfect)[1]["holds"] and q.checks_of(results)[1]["value"] == sum(
        round((1 - run["dann"]["target_test_accuracy"]) * 2 * q.TEST_PER_CLASS)
        for run in results["runs"].values())


def test_eval_only_writes_only_under_eval_and_reproduces_every_number(trained, tmp_path,
                                                                      capsys):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    before = fingerprints(out)
    code, printed, err = cli(["--eval-only", "--out", str(out)], capsys)
    assert code == 0, err
    after = fingerprints(out)
    assert {k: v for k, v in after.items() if not k.startswith("eval/")} == before
    assert {"eval/figure2.png", "eval/metrics.json", "eval/comparison.json"} <= set(after)
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    committed = json.loads((out / "metrics.json").read_text())  # two seeds: the first's
    assert comparison["compared"] == len(common.comparable(
        {"checks": [], "results": {"runs": {"42": committed["results"]["runs"]["42"]}}})) > 30
    assert comparison["reproduced"] == comparison["compared"]
    metrics = json.loads(json.dumps(committed))
    metrics["results"]["runs"]["42"]["dann"]["target_test_accuracy"] -= 0.25
    (out / "metrics.json").write_text(json.dumps(metrics))
    code, printed, _ = cli(["--eval-only", "--out", str(out)], capsys)
    line = next(x for x in printed.splitlines() if "42.dann.target_test_accuracy" in x)
    assert "differs by +0.25" in line


def test_report_only_reproduces_the_report_and_follows_the_numbers(trained, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    shutil.copy(trained / "metrics.json", out / "metrics.json")
    code, _, err = cli(["--report-only", "--out", str(out)], capsys)
    assert code == 0, err
    assert (out / "report.md").read_text() == (trained / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["results"]["summary"]["dann"]["target_test_accuracy"]["mean"] = 0.123456
    metrics["settings"]["lambda_"] = 0.75
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert cli(["--report-only", "--out", str(out)], capsys)[0] == 0
    report = (out / "report.md").read_text()
    assert "| 0.1235 +- " in report and "lambda 0.75 (theirs: 6)" in report


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMMITTED, "metrics.json")),
                    reason="no committed outputs")
def test_report_only_reproduces_the_committed_report(tmp_path, capsys):
    out = tmp_path / "q3_toy"
    shutil.copytree(COMMITTED, out, ignore=shutil.ignore_patterns("*.pt", "*.png", "eval"))
    os.remove(out / "report.md")
    assert cli(["--report-only", "--out", str(out)], capsys)[0] == 0
    with open(os.path.join(COMMITTED, "report.md")) as f:
        assert (out / "report.md").read_text() == f.read()
    run = json.loads((out / "runs" / "seeds5" / "metrics.json").read_text())
    run["results"]["summary"]["dann"]["target_test_accuracy"]["mean"] = 0.123456
    (out / "runs" / "seeds5" / "metrics.json").write_text(json.dumps(run))
    assert cli(["--report-only", "--out", str(out)], capsys)[0] == 0
    assert "| 0.1235 |" in (out / "report.md").read_text()


# --- Issue 19: foreign or missing metrics are one sentence, before any work
def foreign_metrics(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"script": "q1_vae.py", "settings": {}, "checks": [],
                                "results": {}}))


def test_report_only_with_the_metrics_of_another_script_is_one_sentence(trained, tmp_path,
                                                                          capsys):
    foreign_metrics(tmp_path / "here" / "metrics.json")
    err = one_sentence_error(["--report-only", "--out", str(tmp_path / "here")], capsys)
    assert "q1_vae.py" in err and not (tmp_path / "here" / "report.md").exists()
    out = tmp_path / "runs_x"
    out.mkdir()
    shutil.copy(trained / "metrics.json", out / "metrics.json")
    foreign_metrics(out / "runs" / "x" / "metrics.json")
    err = one_sentence_error(["--report-only", "--out", str(out)], capsys)
    assert os.path.join("runs", "x", "metrics.json") in err and "q1_vae.py" in err
    err = one_sentence_error(["--report-only", "--out", str(tmp_path / "none")], capsys)
    assert "metrics.json" in err


def test_eval_only_with_unexpected_metrics_is_one_sentence_before_any_work(trained, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.setattr(q, "evaluate", lambda *a: pytest.fail("evaluated"))
    out = tmp_path / "foreign"
    shutil.copytree(trained, out)
    foreign_metrics(out / "metrics.json")
    err = one_sentence_error(["--eval-only", "--out", str(out)], capsys)
    assert "q1_vae.py" in err and not (out / "eval").exists()
    (out / "metrics.json").write_text(json.dumps({"runs": [], "summary": {}}))  # the old layout
    err = one_sentence_error(["--eval-only", "--out", str(out)], capsys)
    assert "not q3_toy_dann.py" in err and not (out / "eval").exists()


def test_eval_only_with_nothing_to_compare_is_not_a_success(trained, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setattr(q, "evaluate", lambda *a: pytest.fail("evaluated"))
    out = tmp_path / "weights_only"
    out.mkdir()
    for name in ("nn.pt", "dann.pt"):
        shutil.copy(trained / name, out / name)
    err = one_sentence_error(["--eval-only", "--out", str(out)], capsys)
    assert "metrics.json" in err and "nothing was verified" in err
    assert not (out / "eval").exists()


# --- Bad flags, weights and data: one sentence
@pytest.mark.parametrize("argv", [["--lambda", "-1"], ["--epochs", "0"], ["--n-per-class", "0"],
                                  ["--seed", "-1"], ["--seed", str(2 ** 32)], ["--lr", "0.1"],
                                  ["--seed", str(2 ** 32 - 1), "--seeds", "2"], ["--resume"],
                                  ["--eval-only", "--report-only"]])
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        q.parse_args(argv)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err


def test_bad_out_is_one_sentence_before_any_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(q, "make_data", lambda *a: pytest.fail("data made before --out check"))
    afile = tmp_path / "file"
    afile.write_text("x")
    assert "--out" in one_sentence_error(TINY + ["--out", str(afile)], capsys)


def test_wrong_truncated_or_missing_weights_are_one_sentence(trained, tmp_path, capsys):
    out = tmp_path / "bad"
    shutil.copytree(trained, out)
    common.save_checkpoint(str(out / "nn.pt"), "q1_vae", {"latent": 16}, nn.Linear(2, 2))
    assert "q1_vae" in one_sentence_error(["--eval-only", "--out", str(out)], capsys)
    shutil.copy(trained / "dann.pt", out / "nn.pt")  # a DANN where the standard NN belongs
    assert "'q3_toy_dann/nn'" in one_sentence_error(["--eval-only", "--out", str(out)], capsys)
    (out / "nn.pt").write_bytes((trained / "nn.pt").read_bytes()[:300])
    assert "truncated" in one_sentence_error(["--eval-only", "--out", str(out)], capsys)
    os.remove(out / "nn.pt")
    assert "does not exist" in one_sentence_error(["--eval-only", "--out", str(out)], capsys)


@pytest.mark.parametrize("how", ["nan in the data", "huge lambda"])
def test_diverging_training_stops_with_one_sentence(how, tmp_path, monkeypatch, capsys):
    argv = TINY + ["--out", str(tmp_path)]
    if how == "huge lambda":
        argv += ["--lambda", "1e300"]
    else:
        real = q.make_domains

        def one_nan_point(*args, **kwargs):
            Xs, ys, Xt, yt = real(*args, **kwargs)
            Xs[0, 0] = np.nan
            return Xs, ys, Xt, yt
        monkeypatch.setattr(q, "make_domains", one_nan_point)
    err = one_sentence_error(argv, capsys)
    assert "the weights became inf or nan at epoch 1; nothing was saved" in err
    assert not (tmp_path / "nn.pt").exists()


def test_interrupt_after_training_says_the_weights_are_saved(tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(q, "evaluate", interrupted)
    code, _, err = cli(TINY + ["--out", str(tmp_path)], capsys)
    assert code == 130 and err.strip() == f"interrupted: the weights are saved in {tmp_path}"
    assert (tmp_path / "nn.pt").exists() and not (tmp_path / "metrics.json").exists()
