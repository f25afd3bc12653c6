import copy
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import q1_vae
from conftest import fake_digits, write_fake_mnist, write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "outputs", "q1")
FAST = ["--no-download", "--device", "cpu", "--svm-train-size", "300", "--tsne-points", "60",
        "--hidden", "64", "--batch-size", "50"]
FIGURES = ["samples.png", "reconstruction_progress.png", "training_curves.png",
           "latent_traversal.png", "tsne_latent.png", "svm_confusion_matrix.png"]


def cli(argv, capsys):
    """Run the script as the command line does; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        common.run_cli(q1_vae.main, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def without_times(history):
    return [{k: v for k, v in h.items() if k not in ("train_seconds", "images_per_second")}
            for h in history]


@pytest.fixture(scope="module")
def trained(fake_mnist_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q1"))
    q1_vae.main(["--data-dir", fake_mnist_dir, "--out", out, "--epochs", "2", *FAST])
    return out, read_metrics(out)


# ------------------------------------------------------------------------------ training
def test_run_writes_every_output_and_beats_an_untrained_model(trained, fake_mnist_dir):
    out, metrics = trained
    for name in FIGURES + ["vae.pt", "training_state.pt", "metrics.json", "report.md"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    report = open(os.path.join(out, "report.md")).read()
    assert all(f"({name})" in report for name in FIGURES)
    assert len(metrics["history"]) == 2 and metrics["svm"]["fitted_on"] == 300
    test = metrics["test"]
    assert test["negative_elbo"] == pytest.approx(test["reconstruction"] + test["kl"])
    assert sum(metrics["kl_per_unit"]) == pytest.approx(test["kl"], rel=1e-4)
    assert metrics["active_units"] == sum(kl > q1_vae.ACTIVE_KL for kl in metrics["kl_per_unit"])

    common.seed_everything(0)  # the run's own initial model, never trained
    untrained = q1_vae.VAE(16, 64)
    data = q1_vae.load_data(SimpleNamespace(data_dir=fake_mnist_dir, no_download=True), "cpu")
    before = q1_vae.evaluate(untrained, data.test, beta=1.0)["negative_elbo"]
    assert metrics["progress"][0]["reconstruction"] > metrics["progress"][-1]["reconstruction"]
    assert test["negative_elbo"] < before - 20, (test["negative_elbo"], before)


def test_train_step_takes_one_gradient_step_and_returns_the_terms():
    torch.manual_seed(0)
    model = q1_vae.VAE(4, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(8, 1, 28, 28)
    before = [p.detach().clone() for p in model.parameters()]
    loss, reconstruction, kl = q1_vae.train_step(model, optimizer, x, 0.5,
                                                  torch.Generator().manual_seed(1))
    assert loss == pytest.approx(reconstruction + 0.5 * kl, rel=1e-5)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.state[next(model.parameters())]["step"] == 1


def test_kl_warmup_ramps_the_kl_weight_linearly_to_beta():
    settings = SimpleNamespace(beta=2.0, kl_warmup=4.0)
    assert q1_vae.kl_weight(settings, epoch=1, fraction=0.0) == 0.0
    assert q1_vae.kl_weight(settings, epoch=2, fraction=0.5) == pytest.approx(2.0 * 1.5 / 4)
    assert q1_vae.kl_weight(settings, epoch=5, fraction=0.0) == 2.0
    assert q1_vae.kl_weight(SimpleNamespace(beta=2.0, kl_warmup=0.0), 1, 0.0) == 2.0


def test_traversal_rows_are_the_units_ordered_by_kl(monkeypatch):
    figures = []
    monkeypatch.setattr(common, "save_figure", lambda fig, path: figures.append(fig))
    unit_kl = np.array([0.5, 0.001, 2.0, 0.2])
    q1_vae.plot_latent_traversal(q1_vae.VAE(4, 32), torch.rand(1, 1, 28, 28), unit_kl, "x", 1.0)
    labels = [t.get_text() for t in figures[0].axes[0].get_yticklabels()]
    assert [label.split()[0] for label in labels] == ["z2", "z0", "z3", "z1"]
    assert "(inactive)" in labels[-1] and "(inactive)" not in labels[-2]
    assert len(figures[0].axes[0].get_xticklabels()) == len(q1_vae.TRAVERSAL_VALUES)


# ------------------------------------------------------------------------------ resume
def test_interrupted_then_resumed_run_is_bit_identical(fake_mnist_dir, tmp_path, monkeypatch,
                                                       capsys):
    settings = ["--epochs", "2", "--seed", "3", *FAST]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    assert cli(["--data-dir", fake_mnist_dir, "--out", straight, *settings], capsys)[0] == 0

    real_step, calls = q1_vae.train_step, []

    def ctrl_c_in_epoch_2(*args):  # 6 steps an epoch: Ctrl-C at the 2nd step of epoch 2
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(q1_vae, "train_step", ctrl_c_in_epoch_2)
    code, _, err = cli(["--data-dir", fake_mnist_dir, "--out", interrupted, *settings], capsys)
    state_path = os.path.join(interrupted, "training_state.pt")
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"interrupted: epoch 1 of 2 is saved in {state_path}; continue with --resume"]
    monkeypatch.setattr(q1_vae, "train_step", real_step)

    # only --resume: every setting (epochs, seed, sizes) comes from the saved run
    code, _, err = cli(["--resume", "--data-dir", fake_mnist_dir, "--out", interrupted,
                        "--no-download", "--device", "cpu"], capsys)
    assert code == 0, err
    a = common.load_checkpoint(os.path.join(straight, "vae.pt"), "q1_vae")["model"]
    b = common.load_checkpoint(os.path.join(interrupted, "vae.pt"), "q1_vae")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first, resumed = read_metrics(straight), read_metrics(interrupted)
    assert resumed["mode"] == "resume" and resumed["settings"] == first["settings"]
    for key in ("test", "kl_per_unit", "active_units", "svm", "silhouette", "progress"):
        assert resumed[key] == first[key], key
    assert without_times(resumed["history"]) == without_times(first["history"])


def test_resume_refuses_other_settings_and_never_starts_over(trained, tmp_path, capsys):
    out, _ = trained
    code, _, err = cli(["--resume", "--out", out, "--epochs", "3", "--lr", "0.01"], capsys)
    assert code == 2 and "--epochs 3 (the run has 2)" in err and "--lr 0.01" in err
    code, _, err = cli(["--resume", "--out", str(tmp_path)], capsys)
    assert code == 2 and "no interrupted run" in err
    assert os.listdir(tmp_path) == []


def test_nan_loss_stops_with_a_true_message(fake_mnist_dir, tmp_path, monkeypatch, capsys):
    real, calls = q1_vae.negative_elbo, []

    def nan_in_epoch_2(*args):
        calls.append(1)
        loss, reconstruction, kl = real(*args)
        return (loss * float("nan") if len(calls) > 6 else loss), reconstruction, kl

    monkeypatch.setattr(q1_vae, "negative_elbo", nan_in_epoch_2)
    code, _, err = cli(["--data-dir", fake_mnist_dir, "--out", str(tmp_path), "--epochs", "2",
                        *FAST], capsys)
    state_path = os.path.join(str(tmp_path), "training_state.pt")
    assert code == 2 and "the training loss became nan; training stopped" in err
    assert f"epoch 1 of 2 is saved in {state_path}" in err
    assert len(torch.load(state_path, weights_only=False)["history"]) == 1
    assert not os.path.exists(tmp_path / "vae.pt")


def test_weights_are_written_before_the_figures(fake_mnist_dir, tmp_path, monkeypatch, capsys):
    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(q1_vae, "plot_samples", ctrl_c)
    code, _, err = cli(["--data-dir", fake_mnist_dir, "--out", str(tmp_path), "--epochs", "1",
                        *FAST], capsys)
    weights = os.path.join(str(tmp_path), "vae.pt")
    assert code == 130 and f"training finished; the weights are in {weights}" in err
    assert q1_vae.load_model(weights).latent_dim == 16


# ------------------------------------------------------------------------------ eval-only
def test_eval_only_writes_under_eval_and_compares_with_the_saved_metrics(trained,
                                                                        fake_mnist_dir, capsys):
    out, metrics = trained
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)
              if os.path.isfile(os.path.join(out, name))}
    code, printed, err = cli(["--eval-only", "--out", out, "--data-dir", fake_mnist_dir,
                              "--no-download", "--device", "cpu"], capsys)
    assert code == 0, err
    after = {name: open(os.path.join(out, name), "rb").read() for name in before}
    assert after == before  # the run's own files are untouched
    eval_dir = os.path.join(out, "eval")
    assert all(os.path.getsize(os.path.join(eval_dir, name)) > 0 for name in FIGURES
               if name not in ("reconstruction_progress.png", "training_curves.png"))
    again = read_metrics(eval_dir)
    assert again["test"] == metrics["test"] and again["svm"] == metrics["svm"]
    comparison = json.load(open(os.path.join(eval_dir, "comparison.json")))
    assert comparison["compared"] >= 8 and comparison["reproduced"] == comparison["compared"]
    assert "test.negative_elbo" in printed and "differs" not in printed


def test_load_model_as_a_library(trained):
    out, _ = trained
    model = q1_vae.load_model(os.path.join(out, "vae.pt"), device="cpu")
    assert not model.training and model.latent_dim == 16
    mu, logvar = model.encode(torch.rand(5, 1, 28, 28))
    assert mu.shape == logvar.shape == (5, 16)
    images = model.decode(mu)
    assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1


def test_bad_weights_get_one_sentence(trained, tmp_path, capsys):
    out, _ = trained
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(os.path.join(out, "vae.pt"), "rb").read()[:2000])
    other = tmp_path / "other.pt"
    common.save_checkpoint(str(other), "q1_vae", {"latent": 16, "hidden": 64},
                           torch.nn.Linear(2, 2))
    foreign = tmp_path / "foreign.pt"
    common.save_checkpoint(str(foreign), "q3_toy_dann", {}, torch.nn.Linear(2, 2))
    for path, expected in ((tmp_path / "missing.pt", "does not exist"), (tmp_path, "a folder"),
                           (truncated, "truncated"), (other, "does not fit"),
                           (foreign, "'q3_toy_dann' model")):
        code, _, err = cli(["--eval-only", "--weights", str(path), "--out", str(tmp_path),
                            "--no-download"], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------ the user's mistakes
@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--latent", "-2"),
                                        ("--batch-size", "0"), ("--beta", "-1"),
                                        ("--lr", "abc"), ("--seed", "-1"),
                                        ("--seed", str(2**32))])
def test_bad_numbers_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        q1_vae.main([flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_modes_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        q1_vae.main(["--eval-only", "--resume"])
    assert exit_.value.code == 2 and "exclude each other" in capsys.readouterr().err


def test_out_is_checked_before_the_data(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, _, err = cli(["--out", str(a_file), "--data-dir", str(tmp_path / "none"),
                        "--no-download"], capsys)
    assert code == 2 and err.startswith(f"error: --out {a_file} is a file")


@pytest.mark.parametrize("damage,expected", [("label 12", "the label 12, outside 0-9"),
                                             ("fewer labels", "holds 300 images but")])
def test_corrupt_mnist_stops_before_training(damage, expected, tmp_path, monkeypatch, capsys):
    data = write_fake_mnist(str(tmp_path / "data"))
    images, labels = fake_digits(300, 0)
    labels = labels.copy()
    if damage == "label 12":
        labels[7] = 12
    else:
        labels = labels[:299]
    labels_path = os.path.join(data, "MNIST", "raw", "train-labels-idx1-ubyte")
    write_idx(labels_path, labels)
    monkeypatch.setattr(q1_vae, "train_step", lambda *a: pytest.fail("training started"))
    code, _, err = cli(["--data-dir", data, "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2 and expected in err and "train-labels-idx1-ubyte" in err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "out") == []


def test_download_only_fetches_and_stops(fake_mnist_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code, printed, _ = cli(["--download-only", "--data-dir", fake_mnist_dir, "--out", str(out)],
                           capsys)
    assert code == 0 and "MNIST is in" in printed and not out.exists()


def test_missing_mnist_exits_2_with_one_sentence_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "q1_vae.py"), "--data-dir",
                             str(tmp_path), "--out", str(tmp_path / "out"), "--no-download"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-images-idx3-ubyte" in lines[0]
    assert os.path.join(str(tmp_path), "MNIST", "raw") in lines[0]


def test_import_does_not_train_or_read_argv():
    code = ("import sys; sys.argv = ['x', '--epochs', 'oops']; import q1_vae; "
            "print(hasattr(q1_vae, 'train_step'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True"


# ------------------------------------------------------------------------------ the report
def copy_committed(folder, dest):
    """metrics.json, runs/*/metrics.json and beta4/metrics.json of a committed folder."""
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(folder, "metrics.json"), dest)
    runs = os.path.join(folder, "runs")
    for sub in ["beta4"] + [os.path.join("runs", n)
                            for n in (sorted(os.listdir(runs)) if os.path.isdir(runs) else [])]:
        if os.path.isfile(os.path.join(folder, sub, "metrics.json")):
            os.makedirs(os.path.join(dest, sub), exist_ok=True)
            shutil.copy(os.path.join(folder, sub, "metrics.json"), os.path.join(dest, sub))


@pytest.mark.parametrize("folder", [COMMITTED, os.path.join(COMMITTED, "beta4")])
def test_report_only_reproduces_the_committed_report(folder, tmp_path, capsys):
    copy_committed(folder, str(tmp_path))
    code, _, err = cli(["--report-only", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert (tmp_path / "report.md").read_bytes() == open(os.path.join(folder, "report.md"),
                                                         "rb").read()


def test_report_follows_the_metrics(tmp_path, capsys):
    copy_committed(COMMITTED, str(tmp_path))
    metrics = read_metrics(str(tmp_path))
    metrics["test"]["negative_elbo"] = 123.45
    metrics["svm"]["test"]["accuracy"] = 0.5
    common.write_json(os.path.join(str(tmp_path), "metrics.json"), metrics)
    assert cli(["--report-only", "--out", str(tmp_path)], capsys)[0] == 0
    report = (tmp_path / "report.md").read_text()
    assert "**123.45**" in report and "above the target of at most 100 nats" in report
    assert "**test accuracy 0.5000**" in report and "short of the target" in report


def test_report_only_needs_a_metrics_json_of_this_layout(tmp_path, capsys):
    code, _, err = cli(["--report-only", "--out", str(tmp_path)], capsys)
    assert code == 2 and "metrics.json" in err and "does not exist" in err
    common.write_json(str(tmp_path / "metrics.json"), {"command": "python q1_vae.py"})
    code, _, err = cli(["--report-only", "--out", str(tmp_path)], capsys)
    assert code == 2 and "lacks 'settings'" in err and len(err.strip().splitlines()) == 1


def test_every_judgement_has_both_branches(trained, tmp_path):
    out, metrics = trained
    good = copy.deepcopy(metrics)
    good["test"]["negative_elbo"], good["svm"]["test"]["accuracy"] = 90.0, 0.99
    good["kl_per_unit"], good["active_units"] = [1.0] * 16, 16
    good["silhouette"] = 0.2
    bad = copy.deepcopy(good)
    bad["test"]["negative_elbo"], bad["svm"]["test"]["accuracy"] = 120.0, 0.9
    bad["kl_per_unit"], bad["active_units"] = [1.0] * 14 + [0.001, 0.0], 14
    bad["silhouette"] = -0.1
    assert "whole test set: -0.100. For each image" in q1_vae.render_report(bad, str(tmp_path))
    bad["settings"]["kl_warmup"], bad["settings"]["svm_c"] = 0.0, 1.0
    g, b = q1_vae.render_report(good, str(tmp_path)), q1_vae.render_report(bad, str(tmp_path))
    for good_text, bad_text in (("within the target", "above the target"),
                                ("meeting the target", "short of the target"),
                                ("16 of the 16 latent units are active", "the other 2 (z14, z15)"),
                                ("are the script's fixed defaults",
                                 "--kl-warmup 0 (default 10), --svm-c 1 (default 10)")):
        assert good_text in g and good_text not in b
        assert bad_text in b and bad_text not in g
    assert "## beta-VAE" not in g and "## Other runs" not in g

    beta4 = copy.deepcopy(bad)
    beta4["settings"]["beta"], beta4["command"] = 4.0, "python q1_vae.py --beta 4"
    common.write_json(str(tmp_path / "beta4" / "metrics.json"), beta4)
    common.write_json(str(tmp_path / "runs" / "seed1" / "metrics.json"), good)
    with_runs = q1_vae.render_report(good, str(tmp_path))
    assert "## beta-VAE: beta = 4 beside beta = 1" in with_runs
    assert "keeps fewer active units\n(14 against 16)" in with_runs
    assert "![traversal beta 4](beta4/latent_traversal.png)" in with_runs
    assert "| seed1 |" in with_runs
    assert "keeps as many active units" in q1_vae.render_report(bad, str(tmp_path))
