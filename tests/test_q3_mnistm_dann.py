"""Tests of q3_mnistm_dann.py on tiny synthetic data in the real on-disk formats."""
import io
import json
import math
import os
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import q3_mnistm_dann as q3
from common import UserError, run_cli, save_checkpoint
from conftest import fake_digits, interrupt_on_call, write_fake_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "outputs", "q3_mnistm")


def write_fake_bsds(root, n=3, seed=0, grey=False):
    """n random 40x56 JPEG photos in each of images/train and images/test (one grey)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        os.makedirs(os.path.join(root, "images", split))
        for i in range(n):
            shape = (40, 56) if grey and split == "train" and i == 0 else (40, 56, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                os.path.join(root, "images", split, f"{i}.jpg"))
    return str(root)


def write_fake_data(root, seed=0, grey=False):
    """A data folder with fake MNIST and fake BSDS500 photos in DATA_DIR/BSDS500."""
    write_fake_bsds(root / "BSDS500", seed=seed, grey=grey)
    return write_fake_mnist(str(root))


@pytest.fixture(scope="module")
def fake_data_dir(tmp_path_factory):
    return write_fake_data(tmp_path_factory.mktemp("data"), grey=True)


def base_args(data_dir, tmp_path, *extra):
    return ["--data-dir", data_dir, "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--epochs", "2", "--tsne-points", "20",
            "--validation-size", "50", "--batch-size", "32", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def finished_run(fake_data_dir, tmp_path_factory):
    """One complete run of the three models on the fake data, and what it printed."""
    tmp_path = tmp_path_factory.mktemp("run")
    q3.main(base_args(fake_data_dir, tmp_path, "--svm-retrain",
                      "--svm-train-size", "100"))
    return tmp_path


def fails(argv, match, capsys=None):
    """run_cli(main, argv) ends in exit 2 with one sentence matching `match`, no traceback."""
    with pytest.raises(SystemExit) as error:
        run_cli(q3.main, argv)
    assert error.value.code == 2
    if capsys is not None:
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
        assert match in err, err


# --- MNIST-M, model, schedules, one step
def test_mnistm_is_abs_difference_of_a_seeded_crop():
    digits = np.zeros((50, 28, 28), dtype=np.uint8)
    digits[:, 10:14, 10:14] = 255
    photo = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    out = q3.build_mnistm(digits, [photo], seed=3)
    assert out.shape == (50, 28, 28, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, q3.build_mnistm(digits, [photo], seed=3))
    crops = [{(t, l) for t in range(13) for l in range(29)
              if np.array_equal(photo[t:t + 28, l:l + 28][:10], out[i][:10])} for i in range(50)]
    assert all(crops) and len(set.union(*crops)) > 10
    i, (t, l) = 0, next(iter(crops[0]))
    np.testing.assert_array_equal(out[i, 10:14, 10:14], 255 - photo[t + 10:t + 14, l + 10:l + 14])


def test_model_load_model_and_wrong_weights(tmp_path):
    torch.manual_seed(0)
    model, x = q3.DANNNet([0.1, 0.2, 0.3]), torch.rand(5, 3, 28, 28)
    assert model.features(x).shape == (5, 768) and model(x).shape == (5, 10)
    assert model.last_hidden(x).shape == (5, 100)
    save_checkpoint(str(tmp_path / "dann.pt"), q3.KINDS["dann"], {"mean": [0.1, 0.2, 0.3]}, model)
    loaded = q3.load_model(str(tmp_path / "dann.pt"))
    assert not loaded.training and torch.allclose(loaded(x), model(x))
    save_checkpoint(str(tmp_path / "other.pt"), "q1_vae", {}, torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="holds a 'q1_vae' model"):
        q3.load_model(str(tmp_path / "other.pt"))


def test_schedules_and_reversed_domain_gradient():
    assert q3.learning_rate(0.5) == pytest.approx(0.01 / 6 ** 0.75)
    assert q3.adaptation_lambda(0.0) == 0 and q3.adaptation_lambda(0.5) == pytest.approx(
        2 / (1 + math.exp(-5)) - 1)
    torch.manual_seed(0)
    model, xs, xt = q3.DANNNet([0.5] * 3), torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)
    _, domain_loss, _ = q3.dann_losses(model, xs, torch.randint(0, 10, (8,)), xt, 0.37)
    weight = model.feature_extractor[0].weight
    logits = model.domain_classifier(model.features(torch.cat([xs, xt]))).squeeze(1)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.cat([torch.zeros(8), torch.ones(8)]))
    torch.testing.assert_close(torch.autograd.grad(domain_loss, weight)[0],
                               -0.37 * torch.autograd.grad(plain, weight)[0], rtol=1e-4, atol=1e-8)


def test_dann_step_lowers_the_label_loss_and_stops_on_nan():
    torch.manual_seed(0)
    model = q3.DANNNet([0.5, 0.5, 0.5])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    digits, labels = fake_digits(32, seed=0)
    source, labels = q3.as_input(torch.from_numpy(digits)), torch.from_numpy(labels).long()
    target = q3.as_input(torch.randint(0, 256, (32, 3, 28, 28), dtype=torch.uint8))
    first = q3.dann_step(model, optimizer, source, labels, target, 0.1)
    for _ in range(30):
        last = q3.dann_step(model, optimizer, source, labels, target, 0.1)
    assert last[0] < 0.5 * first[0]
    with pytest.raises(UserError, match="DANN label loss became nan"):
        q3.dann_step(model, optimizer, source * float("nan"), labels, target, 0.1)


# --- A complete run, --report-only, --eval-only, --resume
def test_a_run_writes_every_output_in_the_one_layout(finished_run, capsys):
    out = finished_run / "out"
    report = (out / "report.md").read_text()
    for png in ("mnistm_samples.png", "figure5_tsne_domain.png", "figure5_tsne_digits.png",
                "training_curves.png", "confusion_mnistm_dann.png"):
        assert (out / png).is_file() and f"]({png})" in report, png
    assert not (out / "training_state.pt").exists()
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text)
    assert list(metrics)[:9] == ["script", "command", "settings", "machine", "timestamp", "data",
                                 "timings", "checks", "results"]
    assert set(metrics["timings"]) == {"data", "training", "evaluation", "figures", "total"}
    assert set(metrics["results"]["svm"]) == set(q3.MODELS) and '"/' not in text
    assert len(metrics["training"]["dann"]["history"]) == 2


def test_photos_that_are_not_the_release_are_said_on_the_terminal_and_in_the_report(
        finished_run, fake_data_dir, tmp_path, capsys):
    metrics = json.loads((finished_run / "out" / "metrics.json").read_text())
    warning = "the BSDS500 photos are not the official release (3 train / 3 test"
    assert warning in metrics["data"]["warnings"][0] and "1 grey: 0.jpg" in metrics["data"][
        "warnings"][0]
    assert f"**Warning: {warning}" in (finished_run / "out" / "report.md").read_text()
    assert {"name": "BSDS500 photos are the official release", "value": False,
            "threshold": "fingerprint", "holds": False} in metrics["checks"]
    q3.load_domains(q3.parse_args(base_args(fake_data_dir, tmp_path)))
    assert f"warning: {warning}" in capsys.readouterr().out


def test_report_only_renders_the_report_and_a_changed_number_changes_it(finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run / "out", copy)
    (copy / "report.md").unlink()
    q3.main(["--report-only", "--out", str(copy)])
    assert (copy / "report.md").read_text() == (finished_run / "out" / "report.md").read_text()


def test_the_committed_report_is_rendered_from_the_committed_metrics(tmp_path):
    copy = tmp_path / "committed"
    shutil.copytree(COMMITTED, copy, ignore=shutil.ignore_patterns("*.pt", "*.png", "eval"))
    q3.main(["--report-only", "--out", str(copy)])
    assert (copy / "report.md").read_text() == open(os.path.join(COMMITTED, "report.md")).read()
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["results"]["svm"]["dann"]["mnistm_test"] = 0.6123
    (copy / "metrics.json").write_text(json.dumps(metrics))
    q3.main(["--report-only", "--out", str(copy)])
    report = (copy / "report.md").read_text()
    assert "| DANN | 0.9840 | 0.8718 | 0.9851 | 0.6123 | 0.7666 |" in report
    assert "DANN gains +0.0997 over source only" in report


def test_the_report_says_what_set_the_epochs_and_that_it_scored_the_test_set():
    report = open(os.path.join(COMMITTED, "report.md")).read()
    assert "Ganin et al. (2016), Table 2, Section 5.2 (pp. 20-24)" in report
    assert "an oracle the paper's unsupervised protocol does not have" in report
    assert "scored the MNIST-M test set, once, after training: 0.8752" in report
    assert "DANN gains +0.3427 over source only (paper +0.2441)" in report
    for untrue in ("over the seeds named by n", "Lighter lines are further seeds", "+0.3426"):
        assert untrue not in report
    choice = json.load(open(os.path.join(COMMITTED, "runs", "epoch_choice", "metrics.json")))
    assert q3.first_epoch_near_best(choice["training"]["dann"]["history"])[2] == q3.DEFAULT_EPOCHS


def test_eval_only_writes_only_under_eval_and_reproduces(finished_run, fake_data_dir, capsys):
    out = finished_run / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    q3.main(["--data-dir", fake_data_dir, "--cache-dir", str(finished_run / "cache"), "--out",
             str(out), "--eval-only", "--device", "cpu"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    assert comparison["compared"] >= 19 and comparison["reproduced"] == comparison["compared"]
    assert (out / "eval" / "figure5_tsne_domain.png").is_file()


def test_interrupt_then_resume_is_bit_identical_and_other_photos_are_refused(
        finished_run, fake_data_dir, tmp_path, monkeypatch, capsys):
    argv = base_args(fake_data_dir, tmp_path, "--models", "dann", "source_only")
    interrupt_on_call(monkeypatch, q3, "validation_accuracies", 4)  # source only, epoch 2
    with pytest.raises(SystemExit) as error:
        run_cli(q3.main, argv)
    assert error.value.code == 130
    state = tmp_path / "out" / "training_state.pt"
    assert capsys.readouterr().err.strip().endswith(
        f"epoch 1 of 2 of Source only is saved in {state}; continue with --resume")
    monkeypatch.undo()
    other = write_fake_data(tmp_path / "other", seed=7)  # issue 19: --resume on other photos
    fails([*argv, "--data-dir", other, "--resume"], "trained on other data", capsys)
    fails([*argv, "--resume", "--epochs", "3"], "--epochs 3 (the run has 2)", capsys)
    q3.main(["--out", str(tmp_path / "out"), "--data-dir", fake_data_dir, "--cache-dir",
             str(tmp_path / "cache"), "--resume"])
    for name in ("dann", "source_only"):
        resumed = torch.load(tmp_path / "out" / f"{name}.pt", weights_only=False)["model"]
        reference = torch.load(finished_run / "out" / f"{name}.pt", weights_only=False)["model"]
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), name
    resumed, reference = (json.loads((d / "out" / "metrics.json").read_text())["results"]
                          for d in (tmp_path, finished_run))
    assert resumed["softmax"] == {n: reference["softmax"][n] for n in ("source_only", "dann")}
    fails([*argv, "--resume"], "no interrupted run to continue", capsys)


# --- Issue 19: sizes, odd files, foreign metrics
def test_a_data_dir_that_is_a_file_is_one_sentence(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for extra in ([], ["--download-only"]):  # downloads on (the default), or download only
        fails(["--data-dir", str(tmp_path / "file"), "--out", str(tmp_path / "o"), *extra],
              "is a file, not a folder", capsys)


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_broken_link_among_the_photos_is_one_sentence(tmp_path, link, capsys):
    root = write_fake_data(tmp_path / "data")
    path = os.path.join(root, "BSDS500", "images", "train", "x.jpg")
    os.symlink(path if link == "loop" else str(tmp_path / "gone.jpg"), path)
    fails(base_args(root, tmp_path), "x.jpg is a broken link", capsys)


@pytest.mark.parametrize("extra, match", [
    (["--batch-size", "100000"], "--batch-size 100000 is more than the 250 source training"),
    (["--validation-size", "290"], "left by --validation-size 290"),
    (["--svm-retrain", "--svm-train-size", "1"], "--svm-train-size 1 gives the SVM"),
    (["--tsne-points", "2"], "--tsne-points 2 is too few")])
def test_sizes_are_refused_before_training(fake_data_dir, tmp_path, extra, match, capsys):
    fails(base_args(fake_data_dir, tmp_path, *extra), match, capsys)
    assert not list((tmp_path / "out").glob("*.pt"))


def test_metrics_of_another_script_are_one_sentence(finished_run, fake_mnist_dir, tmp_path,
                                                    monkeypatch, capsys):
    foreign = {"script": "q3_toy_dann.py", "settings": {}, "checks": [], "results": {}}
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps(foreign))
    monkeypatch.setattr(q3, "load_domains", lambda *a: pytest.fail("work began"))
    for mode in ("--report-only", "--eval-only"):
        fails(["--out", str(out), "--data-dir", fake_mnist_dir, mode],
              "was written by q3_toy_dann.py, not q3_mnistm_dann.py", capsys)
    shutil.copy(finished_run / "out" / "metrics.json", out / "metrics.json")
    (out / "runs" / "x").mkdir(parents=True)
    (out / "runs" / "x" / "metrics.json").write_text(json.dumps(foreign))
    fails(["--out", str(out), "--report-only"], "runs/x/metrics.json was written by", capsys)


# --- Data: BSDS500 downloads and archives, the authors' MNIST-M
def bsds_archive(path, photos_root, top):
    """BSDS500's photos as Berkeley's tgz (BSR/...) or GitHub's zip (BSDS500-master/...)."""
    files = {f"{top}/BSDS500/data/images/{s}/{n}": os.path.join(photos_root, "images", s, n)
             for s in ("train", "test") for n in os.listdir(os.path.join(photos_root, "images", s))}
    if path.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as archive:
            for name, file in files.items():
                archive.write(file, name)
    else:
        with tarfile.open(path, "w:gz") as archive:
            for name, file in files.items():
                archive.add(file, name)


def test_bsds500_is_fetched_from_the_next_source_or_read_from_a_local_archive(
        http_server, fake_mnist_dir, tmp_path, monkeypatch, capsys):
    photos = write_fake_bsds(tmp_path / "photos")
    bsds_archive(os.path.join(http_server.root, "BSR_bsds500.tgz"), photos, "BSR")
    monkeypatch.setitem(q3.BSDS_SOURCES, "BSR_bsds500.tgz", ("BSR", (
        http_server.url("BSR_bsds500.tgz", fail="404"), http_server.url("BSR_bsds500.tgz"))))
    data = tmp_path / "data"
    shutil.copytree(os.path.join(fake_mnist_dir, "MNIST"), data / "MNIST")
    q3.main(["--data-dir", str(data), "--out", str(tmp_path / "out"), "--download-only"])
    assert "404" in capsys.readouterr().err and sorted(os.listdir(data)) == ["BSDS500", "MNIST"]
    assert sorted(os.listdir(data / "BSDS500" / "images" / "test")) == ["0.jpg", "1.jpg", "2.jpg"]
    local = tmp_path / "local"
    local.mkdir()
    bsds_archive(str(local / "BSDS500-master.zip"), photos, "BSDS500-master")
    args = q3.parse_args(["--data-dir", str(local), "--no-download"])
    assert q3.find_bsds(args) == str(local / "BSDS500") and os.listdir(local) == ["BSDS500"]
    down = [http_server.url("BSR_bsds500.tgz", fail="404"), http_server.url("x.zip", fail="404")]
    monkeypatch.setattr(q3, "BSDS_SOURCES", {"BSR_bsds500.tgz": ("BSR", down[:1]),
                                             "BSDS500-master.zip": ("BSDS500-master", down[1:])})
    shutil.copytree(os.path.join(fake_mnist_dir, "MNIST"), tmp_path / "none" / "MNIST")
    fails(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
           "--download-only"], "BSDS500 is missing", capsys)
    assert sorted(os.listdir(tmp_path / "none")) == ["MNIST"]


def write_official_archive(path, train_labels=None):
    """The authors' mnist_m.tar.gz layout: 4 32x32 PNGs per split and their label files."""
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for i in range(4):
                buffer = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), [10 * i, 100, 200], np.uint8)).save(
                    buffer, "PNG")
                info = tarfile.TarInfo(f"mnist_m/mnist_m_{split}/{i:08d}.png")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))
            text = (train_labels if train_labels and split == "train" else
                    "".join(f"{i:08d}.png {i}\n" for i in range(4))).encode()
            info = tarfile.TarInfo(f"mnist_m/mnist_m_{split}_labels.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))


def test_the_authors_mnistm_is_read_and_resized_and_a_bad_line_is_named(tmp_path):
    archive = write_official_archive
    (tmp_path / "good").mkdir()
    archive(str(tmp_path / "good" / "mnist_m.tar.gz"))
    arrays, info = q3.load_official_mnistm(str(tmp_path / "good"), str(tmp_path / "cache"))
    assert arrays["train_images"].shape == (4, 28, 28, 3)
    assert arrays["train_labels"].tolist() == [0, 1, 2, 3]
    assert arrays["train_images"][2, 5, 7].tolist() == [20, 100, 200]
    (tmp_path / "bad").mkdir()
    archive(str(tmp_path / "bad" / "mnist_m.tar.gz"), "00000000.png 0\n00000001.png seven\n")
    with pytest.raises(UserError, match=r"mnist_m_train_labels\.txt line 2 is not"):
        q3.load_official_mnistm(str(tmp_path / "bad"), str(tmp_path / "cache2"))


def test_the_authors_mnistm_downloads_from_the_first_good_source(tmp_path, http_server,
                                                                 monkeypatch, capsys):
    write_official_archive(os.path.join(http_server.root, "mnist_m.tar.gz"))
    from torchvision.datasets.utils import calculate_md5
    monkeypatch.setattr(q3, "MNISTM_MD5",
                        calculate_md5(os.path.join(http_server.root, "mnist_m.tar.gz")))
    monkeypatch.setattr(q3, "MNISTM_SOURCES", [http_server.url("mnist_m.tar.gz", fail="404"),
                                               http_server.url("mnist_m.tar.gz", fail="drop"),
                                               http_server.url("mnist_m.tar.gz")])
    folder, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    arrays, info = q3.load_official_mnistm(folder, cache, download=True)
    assert arrays["test_labels"].tolist() == [0, 1, 2, 3] and "authors'" in info["kind"]
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "connection closed after" in err
    assert sorted(os.listdir(folder)) == ["mnist_m.tar.gz"]
    served = len(http_server.requests)
    q3.load_official_mnistm(folder, cache, download=True)  # there now: nothing fetched
    assert len(http_server.requests) == served


def test_a_changed_mnistm_archive_and_every_source_down_are_one_sentence(tmp_path, http_server,
                                                                         monkeypatch, capsys):
    write_official_archive(os.path.join(http_server.root, "mnist_m.tar.gz"))  # md5 differs
    monkeypatch.setattr(q3, "MNISTM_SOURCES", [http_server.url("mnist_m.tar.gz"),
                                               "http://127.0.0.1:9/mnist_m.tar.gz"])
    with pytest.raises(UserError, match=r"could not be downloaded from any of its 2 sources.*"
                                        r"put mnist_m\.tar\.gz"):
        q3.load_official_mnistm(str(tmp_path / "data"), str(tmp_path / "cache"), download=True)
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "unreachable" in err
    assert not os.path.exists(tmp_path / "data" / "mnist_m.tar.gz")
    with pytest.raises(UserError, match="official MNIST-M not found"):  # downloads off
        q3.load_official_mnistm(str(tmp_path / "data"), str(tmp_path / "cache"))


def test_a_corrupt_mnistm_cache_is_rebuilt(tmp_path, capsys):
    write_official_archive(str(tmp_path / "mnist_m.tar.gz"))
    good, _ = q3.load_official_mnistm(str(tmp_path), str(tmp_path / "cache"))
    (cache,) = (tmp_path / "cache" / "MNIST-M").iterdir()
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    again, _ = q3.load_official_mnistm(str(tmp_path), str(tmp_path / "cache"))
    assert "cannot be used (" in capsys.readouterr().out
    assert all(np.array_equal(good[k], again[k]) for k in good)
