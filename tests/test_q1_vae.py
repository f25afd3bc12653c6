import json
import os
import subprocess
import sys

import pytest
import torch

import common
import q1_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--no-download", "--device", "cpu", "--svm-train-size", "300", "--tsne-points", "60",
        "--hidden", "64", "--batch-size", "50"]
OUTPUTS = ["vae.pt", "samples.png", "reconstruction_progress.png", "training_curves.png",
           "tsne_latent.png", "svm_confusion_matrix.png", "metrics.json", "report.md"]


def run(args):
    """Run the script in-process as a user would; return (exit code, metrics or stderr)."""
    try:
        return 0, q1_vae.main(args)
    except common.UserError as error:
        return 2, str(error)


@pytest.fixture(scope="module")
def trained(fake_mnist_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q1"))
    code, metrics = run(["--data-dir", fake_mnist_dir, "--out", out, "--epochs", "1", *FAST])
    assert code == 0
    return out, metrics


def test_one_epoch_run_writes_every_output(trained):
    out, metrics = trained
    for name in OUTPUTS:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["epochs_trained"] == 1 and len(saved["history"]) == 1
    assert saved["svm"]["fitted_on"] == 300 and saved["svm"]["test"]["n"] == 100
    assert 0 < saved["test"]["negative_elbo"] < 784 * 0.7  # better than an untrained model
    assert saved["test"]["negative_elbo"] == pytest.approx(
        saved["test"]["reconstruction"] + saved["test"]["kl"])
    assert "python" in saved["command"] and saved["hparams"]["latent"] == 16
    report = open(os.path.join(out, "report.md")).read()
    for name in OUTPUTS[1:6]:
        assert f"({name})" in report


def test_eval_only_reproduces_the_saved_metrics(trained, fake_mnist_dir, tmp_path):
    out, metrics = trained
    code, again = run(["--eval-only", "--weights", os.path.join(out, "vae.pt"),
                       "--data-dir", fake_mnist_dir, "--out", str(tmp_path),
                       "--no-download", "--svm-train-size", "300", "--tsne-points", "60"])
    assert code == 0
    assert again["test"] == metrics["test"]
    assert again["svm"]["test"]["accuracy"] == metrics["svm"]["test"]["accuracy"]
    assert again["svm"]["test"]["confusion_matrix"] == metrics["svm"]["test"]["confusion_matrix"]
    assert again["hparams"]["hidden"] == 64  # rebuilt from the checkpoint, no flags repeated
    for name in OUTPUTS[1:]:
        assert os.path.exists(tmp_path / name), name


def test_load_model_as_a_library(trained):
    out, _ = trained
    model = q1_vae.load_model(os.path.join(out, "vae.pt"), device="cpu")
    assert not model.training and model.latent_dim == 16
    x = torch.rand(5, 1, 28, 28)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 16)
    images = model.decode(mu)
    assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1


def test_resume_after_interruption_gives_the_same_model(fake_mnist_dir, tmp_path, monkeypatch):
    common_args = ["--data-dir", fake_mnist_dir, *FAST, "--seed", "3"]
    straight = str(tmp_path / "straight")
    assert run(["--out", straight, "--epochs", "2", *common_args])[0] == 0

    interrupted = str(tmp_path / "interrupted")
    real_train_epoch = q1_vae.train_epoch

    def ctrl_c_in_epoch_2(model, optimizer, images, hparams, epoch, device):
        if epoch == 2:  # Ctrl-C after two optimiser steps of epoch 2
            real_step, steps = optimizer.step, []

            def step():
                if len(steps) == 2:
                    raise KeyboardInterrupt
                steps.append(real_step())
            optimizer.step = step
        return real_train_epoch(model, optimizer, images, hparams, epoch, device)

    monkeypatch.setattr(q1_vae, "train_epoch", ctrl_c_in_epoch_2)
    code, message = run(["--out", interrupted, "--epochs", "2", *common_args])
    assert code == 2 and "interrupted during epoch 2" in message and "--resume" in message
    assert common.load_checkpoint(os.path.join(interrupted, "vae.pt"), "q1_vae")["epoch"] == 1
    monkeypatch.setattr(q1_vae, "train_epoch", real_train_epoch)

    code, resumed = run(["--out", interrupted, "--epochs", "2", "--resume", *common_args])
    assert code == 0 and resumed["epochs_trained"] == 2
    a = common.load_checkpoint(os.path.join(straight, "vae.pt"), "q1_vae")["model"]
    b = common.load_checkpoint(os.path.join(interrupted, "vae.pt"), "q1_vae")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(trained, fake_mnist_dir,
                                                                    tmp_path, monkeypatch):
    out, _ = trained
    weights = str(tmp_path / "vae.pt")
    with open(os.path.join(out, "vae.pt"), "rb") as src, open(weights, "wb") as dst:
        dst.write(src.read())
    monkeypatch.setattr(q1_vae, "negative_elbo",
                        lambda *a: tuple(torch.tensor(float("nan"), requires_grad=True)
                                         for _ in range(3)))
    code, message = run(["--resume", "--weights", weights, "--epochs", "2",
                         "--data-dir", fake_mnist_dir, "--out", str(tmp_path), *FAST])
    assert code == 2 and "became nan" in message
    assert common.load_checkpoint(weights, "q1_vae")["epoch"] == 1


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--latent", "-2"),
                                        ("--batch-size", "0"), ("--beta", "-1"),
                                        ("--lr", "abc")])
def test_bad_numbers_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        q1_vae.parse_args([flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_bad_weights_get_one_sentence(trained, fake_mnist_dir, tmp_path):
    out, _ = trained
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(os.path.join(out, "vae.pt"), "rb").read()[:2000])
    other = tmp_path / "other.pt"
    common.save_checkpoint(str(other), "q1_vae", {"latent": 16, "hidden": 64},
                           torch.nn.Linear(2, 2))
    foreign = tmp_path / "foreign.pt"
    common.save_checkpoint(str(foreign), "q3_toy_dann", {}, torch.nn.Linear(2, 2))
    for path, expected in ((tmp_path / "missing.pt", "does not exist"),
                           (truncated, "truncated"), (other, "does not fit"),
                           (foreign, "'q3_toy_dann' model")):
        code, message = run(["--eval-only", "--weights", str(path), "--data-dir",
                             fake_mnist_dir, "--out", str(tmp_path), "--no-download"])
        assert code == 2 and expected in message


def test_missing_mnist_exits_2_with_one_sentence_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "q1_vae.py"), "--data-dir",
                             str(tmp_path), "--out", str(tmp_path / "out"), "--no-download"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-images-idx3-ubyte" in lines[0]
    assert os.path.join(str(tmp_path), "MNIST", "raw") in lines[0]


def test_import_does_not_train_or_read_argv():
    code = ("import sys; sys.argv = ['x', '--epochs', 'oops']; import q1_vae; "
            "print(hasattr(q1_vae, 'load_model'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True"


def test_kl_warmup_ramps_the_kl_weight_linearly_to_beta():
    hparams = {"beta": 2.0, "kl_warmup": 4.0}
    assert q1_vae.kl_weight(hparams, epoch=1, fraction=0.0) == 0.0
    assert q1_vae.kl_weight(hparams, epoch=2, fraction=0.5) == pytest.approx(2.0 * 1.5 / 4)
    assert q1_vae.kl_weight(hparams, epoch=5, fraction=0.0) == 2.0
    assert q1_vae.kl_weight(hparams, epoch=30, fraction=0.9) == 2.0
    assert q1_vae.kl_weight({"beta": 2.0, "kl_warmup": 0.0}, epoch=1, fraction=0.0) == 2.0
    assert q1_vae.kl_weight({"beta": 2.0}, epoch=1, fraction=0.0) == 2.0  # older checkpoints
