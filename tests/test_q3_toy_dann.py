"""Tests of q3_toy_dann.py: the data; Algorithm 1's reference update (autograd and the
gradient reversal layer) against its closed-form equations computed independently in NumPy;
the fast lockstep update against the reference, step by step; the training loop's order of
random draws; the script end to end on a tiny problem (weights, eval-only, report-only,
resume, interruptions, divergence); and every branch of the report's judgements."""
import copy
import hashlib
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from torch import nn

import q3_toy_dann as q
from common import run_cli, save_checkpoint

TINY = ["--epochs", "2", "--n-per-class", "12", "--test-per-class", "25"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "outputs", "q3_toy")


def sigm(z):
    return 1 / (1 + np.exp(-z))


def cli(argv, capsys):
    """Run the script as from the command line: (exit code, stdout, stderr)."""
    code = 0
    try:
        run_cli(q.main, argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence_error(argv, capsys):
    code, _, err = cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
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
    np.testing.assert_allclose(Xt0 @ q.rotation(measured).T, Xt, atol=1e-12)  # no shift


def test_held_out_samples_share_the_training_coordinates():
    data = q.make_data(50, 1, 35.0, 0.05, 400)
    Xs, ys, Xt, yt = data["test"]
    assert Xs.shape == Xt.shape == (800, 2)
    np.testing.assert_allclose(Xs.mean(0), 0, atol=0.1)  # near, not at, the training mean
    assert np.abs(Xs.mean(0)).max() > 0
    train = data["train"][0]
    assert np.min(((Xs[:, None] - train[None]) ** 2).sum(-1)) > 0  # no training point reused


# ---------------------------------------------------------------------------------------
# Algorithm 1
# ---------------------------------------------------------------------------------------
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
    """Four networks (two standard NN, two DANN, all different) take 300 steps together in
    algorithm1_step and one by one in reference_step; after every step they agree."""
    rng = np.random.default_rng(2)
    modules = [random_network(rng) for _ in range(4)]
    adversarial = [False, True, False, True]
    net = q.Networks.from_modules(modules, adversarial)
    start = copy.deepcopy(net.parameters())
    lam, mu = 6.0, 0.05
    for step in range(300):
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
    net = q.Networks.from_modules(modules, [False, True, True])
    for k, module in enumerate(modules):
        for a, b in zip(net.module(k).parameters(), module.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_loop_equals_algorithm1_with_the_same_random_draws(tmp_path):
    """Three epochs of train() (2 seeds x 2 models), against Algorithm 1 run one network at a
    time in NumPy: the same init and the same target example drawn at each step."""
    args = q.parse_args(["--n-per-class", "6", "--epochs", "3", "--seeds", "2",
                         "--out", str(tmp_path)])
    K, lam, mu = 2, args.lambda_, args.lr
    data = [q.make_data(6, 1 + 2 * k, 35.0, 0.05, 5) for k in range(K)]
    net, history = q.train(args, data)
    assert len(history) == 4  # epoch 0 (before training) and three epochs
    for m in range(2 * K):
        k, adversarial = m % K, m >= K
        Xs, ys, Xt, _ = data[k]["train"]
        rs = np.random.RandomState(42 + k)
        W, V = q.initial_weights(rs, 15)
        p = [W, np.zeros(15), V, np.zeros(2), np.zeros(15), np.zeros(())]
        for _ in range(3):
            for i in range(len(Xs)):
                j = rs.randint(len(Xt))
                p = algorithm1_numpy(*p, Xs[i], ys[i], Xt[j], lam, mu, adversarial)
        for got, want in zip(net.parameters(), p):
            np.testing.assert_allclose(got[m], want, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------
FILES = (["figure2.png", "data.png", "training_curves.png", "nn.pt", "dann.pt",
          "metrics.json", "report.md"]
         + [f"figure2_{m}_{c}.png" for m in q.MODELS for c in q.COLUMNS])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("q3toy")
    q.main(TINY + ["--seeds", "2", "--out", str(out)])
    return out


def test_end_to_end_writes_every_output_and_beats_an_untrained_network(trained):
    for name in FILES:
        assert (trained / name).stat().st_size > 0, name
    assert not (trained / q.STATE_FILE).exists()
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["settings"]["epochs"] == 2 and metrics["machine"]["cpu_cores"] >= 1
    assert len(metrics["runs"]) == 2 and metrics["runs"][1]["seed"] == 43
    for model in q.MODELS:
        for score in q.SCORES:
            values = [run[model][score] for run in metrics["runs"]]
            assert metrics["summary"][model][score]["mean"] == pytest.approx(np.mean(values))
    # two epochs already classify the held-out source better than the untrained network
    data = q.make_data(12, 1, 35.0, 0.05, 25)
    W, V = q.initial_weights(np.random.RandomState(42), 15)
    untrained = q.Networks(W[None], np.zeros((1, 15)), V[None], np.zeros((1, 2)),
                           np.zeros((1, 15)), np.zeros(1), [False]).module(0)
    before = q.evaluate(untrained, data)["source_test_accuracy"]
    assert metrics["runs"][0]["nn"]["source_test_accuracy"] > before + 0.1
    report = (trained / "report.md").read_text()
    for name in FILES:
        if name.endswith(".png"):
            assert f"({name})" in report, name


def test_load_model_maps_points_to_label_logits(trained):
    model = q.load_model(str(trained / "dann.pt"))
    assert model(torch.zeros(5, 2)).shape == (5, 2)
    metrics = json.loads((trained / "metrics.json").read_text())
    Xs, ys, Xt, yt = q.make_data(12, 1, 35.0, 0.05, 25)["test"]
    accuracy = (model(torch.from_numpy(Xt)).argmax(1).numpy() == yt).mean()
    assert accuracy == metrics["runs"][0]["dann"]["target_test_accuracy"]


def test_first_seed_of_several_equals_the_single_run_bit_for_bit(trained, tmp_path):
    q.main(TINY + ["--out", str(tmp_path)])
    for model in q.MODELS:
        alone = torch.load(tmp_path / f"{model}.pt", weights_only=False)["model"]
        beside = torch.load(trained / f"{model}.pt", weights_only=False)["model"]
        for key in alone:
            torch.testing.assert_close(alone[key], beside[key], rtol=0, atol=0)


def fingerprints(folder):
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_only_writes_only_under_eval_and_compares(trained, capsys):
    before = fingerprints(trained)
    code, out, err = cli(["--eval-only", "--out", str(trained)], capsys)
    assert code == 0, err
    after = fingerprints(trained)
    assert {k: v for k, v in after.items() if not k.startswith("eval/")} == before
    for name in ["figure2.png", "data.png", "metrics.json", "comparison.json"]:
        assert f"eval/{name}" in after, name
    comparison = json.loads((trained / "eval" / "comparison.json").read_text())
    assert comparison["compared"] == 2 * len(q.SCORES)
    assert comparison["reproduced"] == comparison["compared"]
    assert out.count("reproduced") >= comparison["compared"]


def test_eval_only_reports_a_difference(trained, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["runs"][0]["dann"]["target_test_accuracy"] -= 0.25
    (out / "metrics.json").write_text(json.dumps(metrics))
    code, printed, _ = cli(["--eval-only", "--out", str(out)], capsys)
    assert code == 0
    line = next(x for x in printed.splitlines() if "dann.target_test_accuracy" in x)
    assert "differs by +0.25" in line


def test_report_only_reproduces_the_report_and_follows_the_numbers(trained, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    shutil.copy(trained / "metrics.json", out / "metrics.json")
    code, _, err = cli(["--report-only", "--out", str(out)], capsys)
    assert code == 0, err
    assert (out / "report.md").read_text() == (trained / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["runs"][0]["dann"]["target_test_accuracy"] = 0.123456
    metrics["summary"]["dann"]["target_test_accuracy"]["mean"] = 0.123456
    (out / "metrics.json").write_text(json.dumps(metrics))
    assert cli(["--report-only", "--out", str(out)], capsys)[0] == 0
    report = (out / "report.md").read_text()
    assert "0.1235" in report and "DANN classifies fewer of the target" in report


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMMITTED, "metrics.json")),
                    reason="no committed outputs")
def test_report_only_reproduces_the_committed_report_byte_for_byte(tmp_path, capsys):
    out = tmp_path / "q3_toy"
    out.mkdir()
    shutil.copy(os.path.join(COMMITTED, "metrics.json"), out / "metrics.json")
    if os.path.isdir(os.path.join(COMMITTED, "runs")):
        shutil.copytree(os.path.join(COMMITTED, "runs"), out / "runs")
    assert cli(["--report-only", "--out", str(out)], capsys)[0] == 0
    with open(os.path.join(COMMITTED, "report.md")) as f:
        assert (out / "report.md").read_text() == f.read()


def test_report_only_without_metrics_is_one_sentence(tmp_path, capsys):
    err = one_sentence_error(["--report-only", "--out", str(tmp_path)], capsys)
    assert "metrics.json" in err


# ---------------------------------------------------------------------------------------
# Resume and interruptions
# ---------------------------------------------------------------------------------------
def interrupt_in(monkeypatch, name, after_calls, how="sigterm"):
    """Make the `after_calls`-th call of q.<name> deliver SIGTERM (or Ctrl-C) to this process."""
    real, calls = getattr(q, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after_calls:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(q, name, wrapper)


def same_weights(a, b):
    for model in q.MODELS:
        x = torch.load(a / f"{model}.pt", weights_only=False)["model"]
        y = torch.load(b / f"{model}.pt", weights_only=False)["model"]
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def runs_of(folder):
    runs = json.loads((folder / "metrics.json").read_text())["runs"]
    return json.dumps(runs, sort_keys=True)


def test_sigterm_in_training_then_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(q, "SAVE_EVERY", 2)
    argv = ["--epochs", "5", "--n-per-class", "12", "--test-per-class", "25", "--seeds", "2"]
    q.main(argv + ["--out", str(tmp_path / "straight")])
    interrupt_in(monkeypatch, "train_epoch", 4)  # in epoch 4: epoch 2 is saved
    code, _, err = cli(argv + ["--out", str(tmp_path / "resumed")], capsys)
    assert code == 130 and err.strip().count("\n") == 0 and "Traceback" not in err
    state = tmp_path / "resumed" / q.STATE_FILE
    assert err.strip() == f"interrupted: epoch 2 of 5 is saved in {state}; continue with --resume"
    monkeypatch.undo()
    monkeypatch.setattr(q, "SAVE_EVERY", 2)
    code, out, err = cli(["--resume", "--out", str(tmp_path / "resumed")], capsys)  # flags
    assert code == 0, err                                                       # from the state
    assert "resuming after epoch 2 of 5" in out and not state.exists()
    same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert runs_of(tmp_path / "straight") == runs_of(tmp_path / "resumed")


@pytest.mark.parametrize("stage", ["evaluate", "figure2"])
def test_interrupt_after_training_keeps_the_weights_and_resume_finishes(stage, tmp_path,
                                                                        monkeypatch, capsys):
    interrupt_in(monkeypatch, stage, 1, how="ctrl-c")
    code, _, err = cli(TINY + ["--out", str(tmp_path)], capsys)
    assert code == 130 and err.strip().startswith("interrupted: ") and err.count("\n") <= 2
    assert "nn.pt" in err and (tmp_path / "nn.pt").exists() and (tmp_path / "dann.pt").exists()
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.undo()
    code, out, err = cli(["--resume", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert (tmp_path / "report.md").exists() and (tmp_path / "figure2.png").exists()


def test_resume_refuses_other_settings_and_needs_a_saved_run(tmp_path, monkeypatch, capsys):
    err = one_sentence_error(TINY + ["--resume", "--out", str(tmp_path)], capsys)
    assert "no interrupted run" in err
    interrupt_in(monkeypatch, "evaluate", 1, how="ctrl-c")
    assert cli(TINY + ["--out", str(tmp_path)], capsys)[0] == 130
    monkeypatch.undo()
    err = one_sentence_error(["--resume", "--lr", "0.1", "--out", str(tmp_path)], capsys)
    assert "--lr 0.1 (the run has 0.05)" in err


# ---------------------------------------------------------------------------------------
# Bad input and divergence
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--lambda", "-1"), ("--epochs", "0"),
                                        ("--n-per-class", "0"), ("--angle", "abc"),
                                        ("--angle", "nan"), ("--lr", "0"), ("--seed", "-1"),
                                        ("--seed", str(2 ** 32)), ("--data-seed", "-1")])
def test_bad_arguments_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        q.parse_args([flag, value])
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err


def test_seeds_past_the_seed_range_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as stop:
        q.parse_args(["--seed", str(2 ** 32 - 1), "--seeds", "2"])
    assert stop.value.code == 2 and "--seeds" in capsys.readouterr().err


def test_bad_out_is_one_sentence_before_any_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(q, "make_data", lambda *a: pytest.fail("data made before --out check"))
    afile = tmp_path / "file"
    afile.write_text("x")
    err = one_sentence_error(TINY + ["--out", str(afile)], capsys)
    assert "--out" in err


def test_weights_of_another_script_truncated_or_missing_are_one_sentence(tmp_path, trained,
                                                                         capsys):
    other = tmp_path / "vae.pt"
    save_checkpoint(str(other), "q1_vae", {"latent": 16}, nn.Linear(2, 2))
    err = one_sentence_error(["--eval-only", "--weights", str(other), "--out", str(tmp_path)],
                             capsys)
    assert "q1_vae" in err
    cut = tmp_path / "cut.pt"
    cut.write_bytes((trained / "nn.pt").read_bytes()[:300])
    err = one_sentence_error(["--eval-only", "--weights", str(cut), "--out", str(tmp_path)],
                             capsys)
    assert "truncated" in err
    err = one_sentence_error(["--eval-only", "--out", str(tmp_path / "empty")], capsys)
    assert "does not exist" in err


def test_nan_in_the_data_stops_training_with_a_true_message(tmp_path, monkeypatch, capsys):
    real = q.make_domains

    def one_nan_point(*args, **kwargs):
        Xs, ys, Xt, yt = real(*args, **kwargs)
        Xs[0, 0] = np.nan
        return Xs, ys, Xt, yt

    monkeypatch.setattr(q, "make_domains", one_nan_point)
    err = one_sentence_error(TINY + ["--out", str(tmp_path)], capsys)
    assert "label loss Ly of the standard NN (seed 42) at epoch 1 became nan" in err
    assert "nothing was saved" in err


def test_a_huge_learning_rate_stops_with_a_true_message(tmp_path, capsys):
    err = one_sentence_error(TINY + ["--lr", "1e300", "--out", str(tmp_path)], capsys)
    assert "training diverged: the label loss Ly of the standard NN (seed 42) reached " in err
    assert "at epoch 1, more than 100 times its value before training" in err
    assert "training stopped; nothing was saved; try a smaller --lr (this run: 1e+300)" in err
    assert not (tmp_path / "nn.pt").exists()


# ---------------------------------------------------------------------------------------
# Every judgement of the report, both ways
# ---------------------------------------------------------------------------------------
@pytest.fixture
def metrics(trained):
    return json.loads((trained / "metrics.json").read_text())


def set_score(metrics, model, score, values):
    for run, value in zip(metrics["runs"], values):
        run[model][score] = value
    metrics["summary"][model][score]["mean"] = float(np.mean(values))


def test_judgement_dann_versus_standard_nn_on_the_target(metrics):
    set_score(metrics, "nn", "target_test_accuracy", [0.8, 0.8])
    set_score(metrics, "dann", "target_test_accuracy", [0.9, 1.0])
    text = q.observations(metrics)
    assert "DANN classifies more of the target" in text
    assert "misclassifies 5 of the 100 held-out target points, the standard NN 20" in text
    set_score(metrics, "dann", "target_test_accuracy", [1.0, 1.0])
    assert "classifies all 100 held-out target points correctly" in q.observations(metrics)
    set_score(metrics, "dann", "target_test_accuracy", [0.7, 0.7])
    assert "DANN classifies fewer of the target" in q.observations(metrics)
    set_score(metrics, "dann", "target_test_accuracy", [0.8, 0.8])
    assert "DANN classifies as many of the target" in q.observations(metrics)


def test_judgement_domain_in_the_representation_and_the_regressor(metrics):
    set_score(metrics, "nn", "representation_domain_accuracy", [0.8, 0.8])
    set_score(metrics, "dann", "representation_domain_accuracy", [0.55, 0.55])
    set_score(metrics, "nn", "domain_train_accuracy", [0.6, 0.6])
    set_score(metrics, "dann", "domain_train_accuracy", [0.52, 0.52])
    text = q.observations(metrics)
    assert "hides the domain better than" in text and "it is closer to chance" in text
    set_score(metrics, "dann", "representation_domain_accuracy", [0.9, 0.9])
    set_score(metrics, "dann", "domain_train_accuracy", [0.3, 0.3])
    text = q.observations(metrics)
    assert "hides the domain no better than" in text and "it is no closer to chance" in text


def test_judgement_how_much_the_last_epochs_move(metrics):
    for run in metrics["runs"]:
        run["dann"]["target_train_last_epochs"].update(min=0.8, max=0.9)
        run["nn"]["target_train_last_epochs"].update(min=0.7, max=0.7)
    text = q.observations(metrics)
    assert "DANN's moves between 0.8000 and 0.9000" in text
    assert "standard NN's stays at 0.7000" in text


def test_judgement_against_the_authors_code_like_with_like(metrics):
    one = copy.deepcopy(metrics)
    one["settings"].update(n_per_class=75, seeds=1, epochs=500)
    one["runs"] = one["runs"][:1]
    set_score(one, "nn", "target_train_accuracy", [0.8267])
    set_score(one, "dann", "target_train_accuracy", [0.9733])
    line = q.versus_authors("This run", one)
    assert "their Figure-2 run" in line and line.count("agrees to the digits they give") == 2
    set_score(one, "dann", "target_train_accuracy", [0.9])
    assert "DANN 0.9000 against 0.973 (differs by -0.073)" in q.versus_authors("x", one)
    one["settings"]["seed"] = 7  # another seed: no one-seed run of theirs to compare with
    assert "not compared" in q.versus_authors("x", one)
    five = copy.deepcopy(metrics)
    five["settings"].update(n_per_class=150, epochs=500)
    five["runs"] = five["runs"] * 3  # 6 seeds: their mean is over 5
    assert "not compared" in q.versus_authors("x", five)
    five["runs"] = five["runs"][:5]
    set_score(five, "dann", "target_train_accuracy", [0.89] * 5)
    set_score(five, "nn", "target_train_accuracy", [0.70] * 5)
    line = q.versus_authors("x", five)
    assert "their mean over 5 seeds" in line and "(agrees to the digits they give)" in line
    assert "Standard NN 0.7000 against 0.78 (differs by -0.08)" in line


def test_choices_are_written_from_the_flags(metrics):
    s = dict(metrics["settings"])
    text = q.choices(s, 2)
    assert "noise 0.05," in text and "rotated 35 degrees counter-clockwise" in text
    assert "2 epochs (the authors' code: 500)" in text and "over 2 seeds" in text
    s.update(angle=-20.0, epochs=500, noise=0.1)
    text = q.choices(s, 1)
    assert "rotated 20 degrees clockwise" in text and "(the text and the authors' code: 35)" in text
    assert "500 epochs," in text and "noise 0.1 (the authors' code: 0.05)" in text
    assert "one seed (42" in text
