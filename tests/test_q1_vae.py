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
        "--hidden", "64"]
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


def files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


def no_training(monkeypatch):
    monkeypatch.setattr(q1_vae, "train_step", lambda *a: pytest.fail("training started"))
    monkeypatch.setattr(q1_vae, "measure", lambda *a: pytest.fail("evaluation started"))


@pytest.fixture(scope="module")
def trained(fake_mnist_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q1"))
    q1_vae.main(["--data-dir", fake_mnist_dir, "--out", out, "--epochs", "4", *FAST])
    return out, read_metrics(out)


# --- training
def test_run_writes_every_output_and_beats_an_untrained_model(trained, fake_mnist_dir):
    out, metrics = trained
    for name in FIGURES + ["vae.pt", "training_state.pt", "metrics.json", "report.md"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    report = open(os.path.join(out, "report.md")).read()
    assert all(f"({name})" in report for name in FIGURES)
    assert {"script", "command", "settings", "machine", "timestamp", "data", "timings", "checks",
            "results", "training"} == set(metrics)
    assert list(metrics["timings"]) == ["data", "training", "evaluation", "figures", "total"]
    r = metrics["results"]
    assert len(metrics["training"]["history"]) == 4 and r["svm"]["fitted_on"] == 300
    assert r["test"]["negative_elbo"] == pytest.approx(r["test"]["reconstruction"]
                                                       + r["test"]["kl"])
    assert sum(r["kl_per_unit"].values()) == pytest.approx(r["test"]["kl"], rel=1e-4)
    assert r["active_units"] == sum(kl > q1_vae.ACTIVE_KL for kl in r["kl_per_unit"].values())
    common.seed_everything(0)  # the run's own initial model, never trained
    data = q1_vae.load_data(SimpleNamespace(data_dir=fake_mnist_dir, no_download=True), "cpu",
                            {})
    before = q1_vae.evaluate(q1_vae.VAE(16, 64), data.test, beta=1.0)["negative_elbo"]
    assert r["test"]["negative_elbo"] < before - 20, (r["test"]["negative_elbo"], before)


def test_train_step_takes_one_gradient_step_and_returns_the_terms():
    torch.manual_seed(0)
    model = q1_vae.VAE(4, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss, reconstruction, kl = q1_vae.train_step(model, optimizer, torch.rand(8, 1, 28, 28), 0.5,
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


def test_checks_follow_the_numbers(trained):
    results = json.loads(json.dumps(trained[1]["results"]))
    results["test"]["negative_elbo"], results["svm"]["test"]["accuracy"] = 99.0, 0.97
    assert [c["holds"] for c in q1_vae.checks_of(results)] == [True, False]
    results["test"]["negative_elbo"], results["svm"]["test"]["accuracy"] = 101.0, 0.98
    assert [c["holds"] for c in q1_vae.checks_of(results)] == [False, True]


# --- resume
def test_resume_is_bit_identical_refuses_other_data_and_a_finished_run(
        trained, fake_mnist_dir, tmp_path, monkeypatch, capsys):
    straight, out = trained[0], str(tmp_path / "interrupted")
    state_path = os.path.join(out, "training_state.pt")
    real_step, calls = q1_vae.train_step, []

    def ctrl_c_in_epoch_3(*args):  # 3 steps an epoch: Ctrl-C at the 2nd step of epoch 3
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(q1_vae, "train_step", ctrl_c_in_epoch_3)
    code, _, err = cli(["--data-dir", fake_mnist_dir, "--out", out, "--epochs", "4", *FAST],
                       capsys)
    assert code == 130 and err.strip().splitlines() == [
        f"interrupted: epoch 2 of 4 is saved in {state_path}; continue with --resume"]
    monkeypatch.setattr(q1_vae, "train_step", real_step)
    other = write_fake_mnist(str(tmp_path / "other"), n_train=200)
    code, _, err = cli(["--resume", "--data-dir", other, "--out", out, "--no-download"], capsys)
    assert code == 2 and "trained on other data (300x28x28" in err and "now 200x28x28" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli(["--resume", "--data-dir", fake_mnist_dir, "--out", out,
                        "--no-download", "--device", "cpu"], capsys)  # settings from the run
    assert code == 0, err
    a, b = (common.load_checkpoint(os.path.join(d, "vae.pt"), "q1_vae")["model"]
            for d in (straight, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first, resumed = read_metrics(straight), read_metrics(out)
    assert resumed["results"] == first["results"] and resumed["settings"] == first["settings"]
    before = files(out)
    code, _, err = cli(["--resume", "--data-dir", fake_mnist_dir, "--out", out,
                        "--no-download"], capsys)
    assert code == 2 and "is finished; nothing was changed" in err and files(out) == before


def test_resume_of_a_finished_run_says_so_and_changes_nothing(trained, fake_mnist_dir,
                                                              tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(trained[0], out)
    before = files(out)
    no_training(monkeypatch)
    code, _, err = cli(["--resume", "--out", out, "--data-dir", fake_mnist_dir,
                        "--no-download"], capsys)
    assert code == 2 and "is finished; nothing was changed" in err and files(out) == before


def test_resume_refuses_other_settings_and_never_starts_over(trained, fake_mnist_dir,
                                                             tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(trained[0], out)
    state = torch.load(os.path.join(out, "training_state.pt"), weights_only=False)
    common.save_training_state(os.path.join(out, "training_state.pt"), state["settings"],
                               state["data"], False, **{k: state[k] for k in (
                                   "model", "optimizer", "history", "progress")})
    code, _, err = cli(["--resume", "--out", out, "--data-dir", fake_mnist_dir, "--no-download",
                        "--epochs", "3", "--beta", "2"], capsys)
    assert code == 2 and "--epochs 3 (the run has 4)" in err
    assert "--beta 2.0 (the run has 1.0)" in err
    code, _, err = cli(["--resume", "--out", str(tmp_path / "new"), "--data-dir",
                        fake_mnist_dir, "--no-download"], capsys)
    assert code == 2 and "no interrupted run" in err


def test_nan_loss_stops_with_a_true_message(fake_mnist_dir, tmp_path, monkeypatch, capsys):
    real, calls = q1_vae.negative_elbo, []

    def nan_in_epoch_2(*args):
        calls.append(1)
        loss, reconstruction, kl = real(*args)
        return (loss * float("nan") if len(calls) > 3 else loss), reconstruction, kl

    monkeypatch.setattr(q1_vae, "negative_elbo", nan_in_epoch_2)
    code, _, err = cli(["--data-dir", fake_mnist_dir, "--out", str(tmp_path), "--epochs", "2",
                        *FAST], capsys)
    state_path = os.path.join(str(tmp_path), "training_state.pt")
    assert code == 2 and "the training loss became nan; training stopped" in err
    assert f"epoch 1 of 2 is saved in {state_path}" in err
    assert len(torch.load(state_path, weights_only=False)["history"]) == 1
    assert not os.path.exists(tmp_path / "vae.pt")


def test_weights_are_written_before_the_figures(fake_mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(q1_vae, "measure", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = cli(["--data-dir", fake_mnist_dir, "--out", str(tmp_path), "--epochs", "1",
                        *FAST], capsys)
    weights = os.path.join(str(tmp_path), "vae.pt")
    assert code == 130 and f"training finished; the weights are in {weights}" in err
    assert q1_vae.load_model(weights).latent_dim == 16


# --- sizes the figures and the SVM need (issue 19): refused before any training
@pytest.mark.parametrize("flag,value", [("--hidden", "1"), ("--latent", "1"),
                                        ("--svm-train-size", "1"), ("--tsne-points", "1")])
def test_sizes_that_cannot_work_are_refused_before_training(flag, value, fake_mnist_dir,
                                                            tmp_path, monkeypatch, capsys):
    no_training(monkeypatch)
    argv = ["--data-dir", fake_mnist_dir, "--out", str(tmp_path), "--epochs", "1", *FAST]
    code, _, err = cli(argv + [flag, value], capsys)
    assert code == 2 and err.startswith(f"error: {flag} {value}"), err
    assert len(err.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_constant_latent_means_skip_the_tsne_with_a_line(trained, fake_mnist_dir, tmp_path,
                                                         monkeypatch, capsys):
    model = q1_vae.load_model(os.path.join(trained[0], "vae.pt"))
    with torch.no_grad():
        model.encoder[-1].weight.zero_()
    args = q1_vae.build_parser().parse_args(FAST[3:] + ["--data-dir", fake_mnist_dir])
    data = q1_vae.load_data(args, "cpu", {})
    results = q1_vae.measure(model, data, args, str(tmp_path), {})
    assert results["tsne_points"] == 0 and not os.path.exists(tmp_path / "tsne_latent.png")
    assert "the t-SNE figure is skipped" in capsys.readouterr().out


# --- eval-only
def test_eval_only_writes_under_eval_and_reproduces_every_number(trained, fake_mnist_dir,
                                                                 tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(trained[0], out)
    before = files(out)
    code, printed, err = cli(["--eval-only", "--out", out, "--data-dir", fake_mnist_dir,
                              "--no-download", "--device", "cpu"], capsys)
    assert code == 0, err
    assert files(out) == before and sorted(os.listdir(out)) == sorted(list(before) + ["eval"])
    eval_dir = os.path.join(out, "eval")
    assert all(os.path.getsize(os.path.join(eval_dir, name)) > 0 for name in FIGURES[:1]
               + FIGURES[3:])
    assert read_metrics(eval_dir)["results"] == trained[1]["results"]
    rows = json.load(open(os.path.join(eval_dir, "comparison.json")))["rows"]
    assert len(rows) > 70 and all(row["reproduced"] for row in rows)
    assert "results.test.negative_elbo" in printed and "differs" not in printed


@pytest.mark.parametrize("mode", ["--eval-only", "--report-only"])
def test_a_metrics_json_of_another_script_is_one_sentence_before_any_work(
        mode, trained, fake_mnist_dir, tmp_path, monkeypatch, capsys):
    shutil.copy(os.path.join(trained[0], "vae.pt"), tmp_path)
    common.write_json(str(tmp_path / "metrics.json"), {"script": "q3_toy_dann.py",
                                                       "results": {"dann": {"accuracy": 0.9}}})
    monkeypatch.setattr(q1_vae, "load_data", lambda *a: pytest.fail("the data were read"))
    code, _, err = cli([mode, "--out", str(tmp_path), "--data-dir", fake_mnist_dir], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "written by q3_toy_dann.py, not q1_vae.py" in err


def test_eval_only_with_nothing_to_compare_is_refused_before_any_work(
        trained, fake_mnist_dir, tmp_path, monkeypatch, capsys):
    shutil.copy(os.path.join(trained[0], "vae.pt"), tmp_path)
    no_training(monkeypatch)
    code, _, err = cli(["--eval-only", "--out", str(tmp_path), "--data-dir", fake_mnist_dir,
                        "--no-download"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "metrics.json does not exist" in err and not os.path.exists(tmp_path / "eval")


def test_load_model_as_a_library(trained):
    model = q1_vae.load_model(os.path.join(trained[0], "vae.pt"), device="cpu")
    assert not model.training and model.latent_dim == 16
    mu, logvar = model.encode(torch.rand(5, 1, 28, 28))
    assert mu.shape == logvar.shape == (5, 16)
    images = model.decode(mu)
    assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1


def test_bad_weights_get_one_sentence(trained, tmp_path, capsys):
    outs = {name: tmp_path / name for name in ("missing", "folder", "truncated", "other",
                                               "foreign")}
    for out in outs.values():
        out.mkdir()
    (outs["folder"] / "vae.pt").mkdir()
    (outs["truncated"] / "vae.pt").write_bytes(
        open(os.path.join(trained[0], "vae.pt"), "rb").read()[:2000])
    common.save_checkpoint(str(outs["other"] / "vae.pt"), "q1_vae", {"latent": 16, "hidden": 64},
                           torch.nn.Linear(2, 2))
    common.save_checkpoint(str(outs["foreign"] / "vae.pt"), "q3_toy_dann", {},
                           torch.nn.Linear(2, 2))
    for name, expected in (("missing", "does not exist"), ("folder", "a folder"),
                           ("truncated", "truncated"), ("other", "does not fit"),
                           ("foreign", "'q3_toy_dann' model")):
        code, _, err = cli(["--eval-only", "--out", str(outs[name]), "--no-download"], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


# --- the user's mistakes
@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--latent", "-2"),
                                        ("--kl-warmup", "-1"), ("--beta", "-1"),
                                        ("--svm-train-size", "abc"), ("--seed", "-1")])
def test_bad_numbers_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        q1_vae.main([flag, value])
    assert exit_.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


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


@pytest.mark.parametrize("mode", [[], ["--download-only"]])
def test_a_data_dir_that_is_a_file_is_one_sentence(mode, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setattr(common, "download_first", lambda *a, **k: pytest.fail("downloading"))
    code, _, err = cli(mode + ["--data-dir", str(a_file), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.strip() == (f"error: --data-dir {a_file} is a file, not a folder; "
                                         f"give the data folder")


@pytest.mark.parametrize("damage,expected", [("label 12", "the label 12, outside 0-9"),
                                             ("fewer labels", "holds 300 images but")])
def test_corrupt_mnist_stops_before_training(damage, expected, tmp_path, monkeypatch, capsys):
    data = write_fake_mnist(str(tmp_path / "data"))
    labels = fake_digits(300, 0)[1].copy()
    if damage == "label 12":
        labels[7] = 12
    else:
        labels = labels[:299]
    write_idx(os.path.join(data, "MNIST", "raw", "train-labels-idx1-ubyte"), labels)
    no_training(monkeypatch)
    code, _, err = cli(["--data-dir", data, "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2 and expected in err and "train-labels-idx1-ubyte" in err
    assert len(err.strip().splitlines()) == 1 and os.listdir(tmp_path / "out") == []


def test_download_only_fetches_and_stops(fake_mnist_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code, printed, _ = cli(["--download-only", "--data-dir", fake_mnist_dir, "--out", str(out)],
                           capsys)
    assert code == 0 and "MNIST is in" in printed and not out.exists()


def test_missing_mnist_and_import_in_a_fresh_python(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "q1_vae.py"), "--data-dir",
                             str(tmp_path), "--out", str(tmp_path / "out"), "--no-download"],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "train-images-idx3-ubyte" in lines[0]
    code = ("import sys; sys.argv = ['x', '--epochs', 'oops']; import q1_vae; "
            "print(hasattr(q1_vae, 'train_step'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True"


# --- the report
def copy_committed(folder, dest):
    """metrics.json, beta4/metrics.json and runs/*/metrics.json of a committed folder."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.pt", "*.png", "eval"))
    os.remove(os.path.join(dest, "report.md"))


@pytest.mark.parametrize("folder", [COMMITTED, os.path.join(COMMITTED, "beta4")])
def test_report_only_reproduces_the_committed_report(folder, tmp_path, capsys):
    out = str(tmp_path / "q1")
    copy_committed(folder, out)
    assert cli(["--report-only", "--out", out], capsys)[0] == 0
    assert open(os.path.join(out, "report.md")).read() == \
        open(os.path.join(folder, "report.md")).read()


def test_report_follows_the_metrics(tmp_path, capsys):
    out = str(tmp_path / "q1")
    copy_committed(COMMITTED, out)
    metrics = read_metrics(out)
    metrics["results"]["test"]["negative_elbo"] = 123.45
    metrics["results"]["silhouette"] = -0.25
    metrics["checks"][0]["holds"] = False
    common.write_json(os.path.join(out, "metrics.json"), metrics)
    run = read_metrics(os.path.join(out, "runs", "seed1"))
    run["results"]["svm"]["test"]["accuracy"] = 0.5
    common.write_json(os.path.join(out, "runs", "seed1", "metrics.json"), run)
    assert cli(["--report-only", "--out", out], capsys)[0] == 0
    report = open(os.path.join(out, "report.md")).read()
    assert "negative ELBO: 123.45 nats" in report and "test set: -0.250" in report
    assert "| test negative ELBO (nats) | 97.47 | <= 100 | no |" in report
    assert "| 0.5000 |" in report


def test_report_only_needs_a_complete_metrics_json_of_this_script(tmp_path, capsys):
    code, _, err = cli(["--report-only", "--out", str(tmp_path)], capsys)
    assert code == 2 and "metrics.json" in err and "does not exist" in err
    common.write_json(str(tmp_path / "metrics.json"), {"script": "q1_vae.py"})
    code, _, err = cli(["--report-only", "--out", str(tmp_path)], capsys)
    assert code == 2 and "lacks settings" in err and len(err.strip().splitlines()) == 1
