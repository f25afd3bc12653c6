"""Tests of q3_toy_dann.py: the data, Algorithm 1's update (against its closed-form
equations, computed independently in NumPy), the gradient reversal, the training loop's
order of random draws, and the script end to end on a tiny problem."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import q3_toy_dann as q
from common import run_cli, save_checkpoint

TINY = ["--epochs", "2", "--n-per-class", "12", "--test-per-class", "25"]


def sigm(z):
    return 1 / (1 + np.exp(-z))


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
    # best rotation about the origin (= the source mean) taking Xt0 onto Xt
    cross = np.sum(Xt0[:, 0] * Xt[:, 1] - Xt0[:, 1] * Xt[:, 0])
    dot = np.sum(Xt0 * Xt)
    measured = np.degrees(np.arctan2(cross, dot))
    assert measured == pytest.approx(angle, abs=1e-9)  # counter-clockwise is positive
    theta = np.radians(measured)
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    np.testing.assert_allclose(Xt0 @ R.T, Xt, atol=1e-12)  # a pure rotation, no shift


def test_held_out_samples_share_the_training_coordinates():
    data = q.make_data(50, 1, 35.0, 0.05, 400)
    Xs, ys, Xt, yt = data["test"]
    assert Xs.shape == Xt.shape == (800, 2)
    np.testing.assert_allclose(Xs.mean(0), 0, atol=0.1)  # near, not at, the training mean
    assert np.abs(Xs.mean(0)).max() > 0  # its own mean is not used
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
    return [p.detach().numpy().copy() for p in (net.W, net.b, net.V, net.c, net.u, net.d)]


@pytest.mark.parametrize("lam,mu", [(6.0, 0.05), (0.7, 0.3)])
def test_one_sgd_step_equals_algorithm1_closed_form(lam, mu):
    rng = np.random.default_rng(0)
    nets = [random_network(rng)]
    nets.append(copy.deepcopy(nets[0]))  # standard NN and DANN, from the same weights
    before = [numpy_parameters(n) for n in nets]
    x_i, x_j = rng.normal(size=2), rng.normal(size=2)
    y_i = 1
    params = q.stack_parameters(nets)
    pairs = torch.from_numpy(np.stack([[x_i, x_j]] * 2))
    labels = torch.tensor([y_i, q.UNLABELLED] * 2)
    domains = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 2, 1).expand(2, 2, 1)
    adversarial = torch.tensor([False, True]).view(2, 1, 1)
    q.sgd_step(params, pairs, labels, domains, adversarial, lam, mu)
    q.unstack_parameters(params, nets)
    for net, start, adv in zip(nets, before, (False, True)):
        expected = algorithm1_numpy(*start, x_i, y_i, x_j, lam, mu, adv)
        for name, got, want, old in zip("WbVcud", numpy_parameters(net), expected, start):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13,
                                       err_msg=f"{'DANN' if adv else 'NN'} {name}")
            assert not np.allclose(got, old)  # every parameter moved
    # the two models differ only in the hidden layer
    nn_, dann = (numpy_parameters(n) for n in nets)
    assert not np.allclose(nn_[0], dann[0]) and not np.allclose(nn_[1], dann[1])
    for k in (2, 3, 4, 5):
        np.testing.assert_allclose(nn_[k], dann[k], rtol=1e-12)


def test_gradient_reversal_reaches_only_the_dann_hidden_layer():
    rng = np.random.default_rng(1)
    nets = [random_network(rng)] * 2  # the same weights for both models
    params = q.stack_parameters(nets)
    pairs = torch.from_numpy(rng.normal(size=(2, 2, 2)))
    labels = torch.tensor([0, q.UNLABELLED] * 2)
    domains = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 2, 1).expand(2, 2, 1)
    lam = 2.5
    _, loss_d = q.algorithm1_losses(params, pairs, labels, domains,
                                    torch.tensor([False, True]).view(2, 1, 1), lam)
    grads = torch.autograd.grad(loss_d, params, allow_unused=True, materialize_grads=True)
    # the plain domain loss, without any reversal
    hidden, _ = q.forward(params, pairs)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(
        q.domain_logits(params, hidden), domains, reduction="sum")
    plain_grads = torch.autograd.grad(plain, params, allow_unused=True, materialize_grads=True)
    for k in (0, 1):  # W, b: NN none, DANN -lambda x the domain gradient
        assert torch.count_nonzero(grads[k][0]) == 0
        torch.testing.assert_close(grads[k][1], -lam * plain_grads[k][1])
        assert plain_grads[k][1].abs().max() > 0
    for k in (2, 3):  # V, c: the domain loss does not touch the label predictor
        assert torch.count_nonzero(grads[k]) == 0
    for k in (4, 5):  # u, d: the regressor descends on its own loss in both models
        torch.testing.assert_close(grads[k], plain_grads[k])


def test_init_follows_algorithm1_and_is_shared_by_both_models(tmp_path):
    net = q.init_network(q.ShallowNetwork(15), np.random.RandomState(42))
    bound = np.sqrt(6 / (2 + 15))
    assert net.W.abs().max() <= bound and net.V.abs().max() <= bound
    assert net.W.abs().max() > bound / 2
    for p in (net.b, net.c, net.u, net.d):
        assert torch.count_nonzero(p) == 0
    # the authors' order of draws: W (15 x 2) then V (2 x 15) from RandomState(42)
    rs = np.random.RandomState(42)
    np.testing.assert_array_equal(net.W.detach().numpy(), bound * (2 * rs.rand(15, 2) - 1))


def test_training_loop_equals_algorithm1_with_the_same_random_draws(tmp_path):
    """A few epochs of the lockstep training loop, against Algorithm 1 run one network at
    a time in NumPy: same init, same target example drawn at each step."""
    args = q.parse_args(["--n-per-class", "6", "--epochs", "3", "--seeds", "2",
                         "--out", str(tmp_path)])
    K, lam, mu = 2, args.lambda_, args.lr
    data = [q.make_domains(6, 1 + 2 * k) for k in range(K)]
    rngs = [np.random.RandomState(42 + k) for k in range(K)]
    nets = [q.ShallowNetwork() for _ in range(2 * K)]
    for k in range(K):
        q.init_network(nets[k], rngs[k])
        nets[K + k].load_state_dict(nets[k].state_dict())
    start = [numpy_parameters(n) for n in nets]
    nets, history = q.train(nets, [False] * K + [True] * K, rngs, data * 2, args, str(tmp_path))
    assert len(history) == 3 and not (tmp_path / "train_state.pt").exists()
    for m in range(2 * K):
        k, adversarial = m % K, m >= K
        Xs, ys, Xt, _ = data[k]
        rs = np.random.RandomState(42 + k)
        rs.rand(15 * 2 + 2 * 15)  # the init draws
        p = start[m]
        for _ in range(3):
            for i in range(len(Xs)):
                j = rs.randint(len(Xt))
                p = algorithm1_numpy(*p, Xs[i], ys[i], Xt[j], lam, mu, adversarial)
        for got, want in zip(numpy_parameters(nets[m]), p):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


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


def test_end_to_end_writes_every_output(trained):
    for name in FILES:
        assert (trained / name).stat().st_size > 0, name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["settings"]["epochs"] == 2 and metrics["machine"]["cpu_cores"] >= 1
    assert len(metrics["runs"]) == 2 and metrics["runs"][1]["seed"] == 43
    for model in q.MODELS:
        for score in q.SCORES:
            values = [run[model][score] for run in metrics["runs"]]
            assert 0 <= metrics["summary"][model][score]["mean"] <= 1
            assert metrics["summary"][model][score]["mean"] == pytest.approx(np.mean(values))
    assert metrics["throughput"]["network_steps_per_second"] > 0
    report = (trained / "report.md").read_text()
    for name in FILES:
        if name.endswith(".png"):
            assert f"({name})" in report, name
    assert "mean +- std" in report and "Choices where the paper is silent" in report


def test_load_model_maps_points_to_label_logits(trained):
    model = q.load_model(str(trained / "dann.pt"))
    logits = model(torch.zeros(5, 2, dtype=torch.float32))
    assert logits.shape == (5, 2)
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


def test_eval_only_redraws_and_rescores_from_the_weights(trained):
    for name in FILES:
        if name.endswith(".png") and name != "training_curves.png":
            os.remove(trained / name)
    q.main(["--eval-only", "--out", str(trained)])
    for name in FILES:
        assert (trained / name).exists(), name
    trained_run = json.loads((trained / "metrics.json").read_text())["runs"][0]
    evaluated = json.loads((trained / "eval_metrics.json").read_text())["runs"][0]
    for model in q.MODELS:
        for score in q.SCORES:
            assert evaluated[model][score] == trained_run[model][score]
    assert (trained / "eval_report.md").exists()


def test_same_seed_same_numbers_and_resume_after_interrupt(tmp_path, monkeypatch):
    argv = TINY[:1] + ["4"] + TINY[2:]
    q.main(argv + ["--out", str(tmp_path / "straight")])
    calls = {"n": 0}
    real = q.epoch_history

    def interrupt_at_third_epoch(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(q, "epoch_history", interrupt_at_third_epoch)
    with pytest.raises(SystemExit) as stop:
        q.main(argv + ["--out", str(tmp_path / "resumed")])
    assert stop.value.code == 130 and (tmp_path / "resumed" / "train_state.pt").exists()
    monkeypatch.setattr(q, "epoch_history", real)
    q.main(argv + ["--out", str(tmp_path / "resumed"), "--resume"])
    assert not (tmp_path / "resumed" / "train_state.pt").exists()
    for model in q.MODELS:
        a = torch.load(tmp_path / "straight" / f"{model}.pt", weights_only=False)["model"]
        b = torch.load(tmp_path / "resumed" / f"{model}.pt", weights_only=False)["model"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--lambda", "-1"), ("--epochs", "0"),
                                        ("--n-per-class", "0"), ("--angle", "abc"),
                                        ("--angle", "nan"), ("--lr", "0")])
def test_bad_arguments_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        q.parse_args([flag, value])
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err


def one_sentence_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: q.main(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_weights_of_another_script_or_truncated_are_one_sentence(tmp_path, trained, capsys):
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


def test_nan_loss_stops_training_with_a_message(tmp_path, monkeypatch, capsys):
    real = q.make_domains

    def one_nan_point(*args, **kwargs):
        Xs, ys, Xt, yt = real(*args, **kwargs)
        Xs[0, 0] = np.nan
        return Xs, ys, Xt, yt

    monkeypatch.setattr(q, "make_domains", one_nan_point)
    err = one_sentence_error(TINY + ["--out", str(tmp_path)], capsys)
    assert "loss at epoch 1 became nan" in err
