"""Tests of q3_mnistm_dann.py on tiny synthetic data in the real on-disk formats."""
import copy
import io
import json
import math
import os
import runpy
import shutil
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import q3_mnistm_dann as q3
from common import UserError, run_cli, save_checkpoint
from conftest import fake_digits, interrupt_on_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "outputs", "q3_mnistm")


# ---------------------------------------------------------------------------------------
# Fixtures: fake BSDS500 photos (folder and both archive layouts), fake official MNIST-M
# ---------------------------------------------------------------------------------------
def fake_photos(n=3, seed=0):
    """{"train/<i>.jpg": JPEG bytes, "test/<i>.jpg": ...} of random 40x56 photos."""
    rng = np.random.default_rng(seed)
    photos = {}
    for split in ("train", "test"):
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buffer, "JPEG")
            photos[f"{split}/{i}.jpg"] = buffer.getvalue()
    return photos


def write_fake_bsds(root, n=3, seed=0):
    for key, data in fake_photos(n, seed).items():
        os.makedirs(os.path.join(root, "images", key.split("/")[0]), exist_ok=True)
        with open(os.path.join(root, "images", key), "wb") as f:
            f.write(data)
    return root


@pytest.fixture(scope="module")
def fake_bsds_dir(tmp_path_factory):
    return write_fake_bsds(str(tmp_path_factory.mktemp("bsds") / "BSDS500"))


def write_bsds_archive(path, photos, layout):
    """Berkeley's tgz (BSR/BSDS500/data/images/...) or GitHub's zip (BSDS500-master/...),
    with a val split and a non-photo file as in the real archives."""
    members = {f"{layout}{key}": data for key, data in photos.items()}
    members[f"{layout}val/9.jpg"] = b"not used"
    members[f"{layout}train/Thumbs.db"] = b"junk"
    if path.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_official_archive(path, labels_text=None, n=4):
    """mnist_m.tar.gz in the authors' layout: constant-colour 32x32 RGB PNGs."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for split in ("train", "test"):
            lines = []
            for i in range(n):
                colour = np.array([10 * i, 100, 200], dtype=np.uint8)
                add(f"mnist_m/mnist_m_{split}/{i:08d}.png",
                    png_bytes(np.broadcast_to(colour, (32, 32, 3)).copy()))
                lines.append(f"{i:08d}.png {i % 10}")
            text = labels_text if (labels_text is not None and split == "train") else "\n".join(lines) + "\n"
            add(f"mnist_m/mnist_m_{split}_labels.txt", text.encode())


def base_args(data_dir, bsds_dir, tmp_path, *extra):
    return ["--data-dir", data_dir, "--bsds-dir", bsds_dir, "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--epochs", "2", "--tsne-points", "30",
            "--validation-size", "50", "--batch-size", "16", "--lr", "0.05", "--device", "cpu",
            *extra]


@pytest.fixture(scope="module")
def finished_run(fake_mnist_dir, fake_bsds_dir, tmp_path_factory):
    """One complete run of the three models on the fake data (shared by several tests)."""
    tmp_path = tmp_path_factory.mktemp("run")
    q3.main(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path, "--svm-retrain"))
    return tmp_path


# ---------------------------------------------------------------------------------------
# MNIST-M construction
# ---------------------------------------------------------------------------------------
def test_blending_is_abs_difference_on_exact_pixels():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    photo = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)  # the only possible crop
    out = q3.build_mnistm(digits, [photo], seed=3)
    expected = np.abs(photo[None].astype(int) - digits[..., None].astype(int))
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28, 3)
    np.testing.assert_array_equal(out, expected)
    d = np.zeros((1, 28, 28), np.uint8)
    d[0, 3, 4] = 200
    p = np.zeros((28, 28, 3), np.uint8)
    p[3, 4] = (10, 250, 200)
    assert q3.build_mnistm(d, [p])[0, 3, 4].tolist() == [190, 50, 0]


def test_crops_cover_the_photo_and_are_seeded():
    photo = np.arange(40 * 50, dtype=np.int64).reshape(40, 50)
    photo = np.stack([photo % 256, photo // 256, np.zeros_like(photo)], -1).astype(np.uint8)
    digits = np.zeros((300, 28, 28), np.uint8)
    a = q3.build_mnistm(digits, [photo], seed=1)
    np.testing.assert_array_equal(a, q3.build_mnistm(digits, [photo], seed=1))
    assert not np.array_equal(a, q3.build_mnistm(digits, [photo], seed=2))
    index = a[:, 0, 0, 0].astype(int) + 256 * a[:, 0, 0, 1].astype(int)  # top-left pixel
    tops, lefts = index // 50, index % 50
    assert tops.min() == 0 and tops.max() == 40 - 28 and lefts.min() == 0 and lefts.max() == 50 - 28
    for i in range(0, 300, 37):  # every image is an exact crop
        np.testing.assert_array_equal(a[i], photo[tops[i]:tops[i] + 28, lefts[i]:lefts[i] + 28])


def test_train_and_test_backgrounds_are_disjoint():
    train_colours, test_colours = [10, 20, 30], [200, 210, 220]
    photos = {"train": [np.full((30, 40, 3), c, np.uint8) for c in train_colours],
              "test": [np.full((30, 40, 3), c, np.uint8) for c in test_colours]}
    digits = np.zeros((50, 28, 28), np.uint8)
    digits[:, 10:18, 12:15] = 255
    train, test = q3.make_mnistm(digits, digits[:20], photos, seed=0)
    background = digits == 0
    assert set(np.unique(train[background])) <= set(train_colours)
    assert set(np.unique(test[background[:20]])) <= set(test_colours)
    assert len(set(np.unique(train[background]))) > 1  # several photos are used


def test_validation_split_is_held_out_with_the_same_digits_in_both_domains(
        fake_mnist_dir, fake_bsds_dir, tmp_path):
    args = q3.parse_args(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path))
    data, info = q3.load_data(args, torch.device("cpu"))
    assert info["source_val"] == info["target_val"] == 50 and info["source_train"] == 250
    # MNIST-M digit i is MNIST digit i over a photo: the validation digits are the same ones
    assert torch.equal(data["source_val_labels"], data["target_val_labels"])
    train = {tuple(x.flatten().tolist()) for x in data["source_train"]}
    assert not any(tuple(x.flatten().tolist()) in train for x in data["source_val"])


def test_a_cache_with_other_keys_or_shapes_is_rebuilt(fake_mnist_dir, fake_bsds_dir, tmp_path, capsys):
    args = q3.parse_args(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path))
    reference, info = q3.load_data(args, torch.device("cpu"))
    for bad in ({"other": np.zeros(3)}, {"train_images": np.zeros((5, 28, 28, 3), np.uint8),
                                         "train_labels": np.zeros(5, np.uint8),
                                         "test_images": np.zeros((5, 28, 28), np.uint8),
                                         "test_labels": np.zeros(5, np.uint8)}):
        np.savez(info["cache"], **bad)
        data, _ = q3.load_data(args, torch.device("cpu"))
        assert "cannot be used" in capsys.readouterr().out
        assert torch.equal(data["target_train"], reference["target_train"])
    with np.load(info["cache"]) as f:
        assert set(f.files) == {"train_images", "train_labels", "test_images", "test_labels"}


# ---------------------------------------------------------------------------------------
# BSDS500 from its sources, tried in turn (a local HTTP server)
# ---------------------------------------------------------------------------------------
@pytest.fixture
def served_bsds(http_server, monkeypatch):
    """The fake photos as a Berkeley tgz and a GitHub zip on the local server, the fake
    photos' fingerprint taken as the official one, and a tgz with one photo changed."""
    photos = fake_photos()
    monkeypatch.setattr(q3, "BSDS_FINGERPRINT", q3.photo_fingerprint(photos))
    root = http_server.root
    write_bsds_archive(os.path.join(root, "BSR_bsds500.tgz"), photos, q3.BSDS_ARCHIVE_LAYOUTS[0])
    write_bsds_archive(os.path.join(root, "master.zip"), photos, q3.BSDS_ARCHIVE_LAYOUTS[1])
    changed = dict(photos, **{"test/1.jpg": fake_photos(seed=5)["test/1.jpg"]})
    write_bsds_archive(os.path.join(root, "changed.tgz"), changed, q3.BSDS_ARCHIVE_LAYOUTS[0])
    return photos


def fetch_bsds(tmp_path, sources, monkeypatch):
    monkeypatch.setattr(q3, "BSDS_SOURCES", tuple(sources))
    args = q3.parse_args(["--data-dir", str(tmp_path / "data")])
    return q3.find_bsds(args)


def test_first_source_404_then_the_next_one(served_bsds, http_server, tmp_path, monkeypatch, capsys):
    root = fetch_bsds(tmp_path, [http_server.url("BSR_bsds500.tgz", fail="404"),
                                 http_server.url("BSR_bsds500.tgz")], monkeypatch)
    assert root == str(tmp_path / "data" / "BSDS500")
    assert q3.folder_photos(root) == served_bsds
    out = capsys.readouterr()
    assert "404" in out.err and out.out.count("fetching") == 2
    assert os.listdir(tmp_path / "data") == ["BSDS500"]  # the archive and temporary files are gone


def test_a_dropped_connection_then_the_github_zip(served_bsds, http_server, tmp_path, monkeypatch, capsys):
    root = fetch_bsds(tmp_path, [http_server.url("BSR_bsds500.tgz", fail="drop"),
                                 http_server.url("master.zip")], monkeypatch)
    assert q3.folder_photos(root) == served_bsds
    assert "closed after" in capsys.readouterr().err


def test_an_archive_with_one_photo_changed_is_rejected(served_bsds, http_server, tmp_path,
                                                       monkeypatch, capsys):
    root = fetch_bsds(tmp_path, [http_server.url("changed.tgz"), http_server.url("master.zip")],
                      monkeypatch)
    assert "checksum mismatch" in capsys.readouterr().err
    assert q3.folder_photos(root) == served_bsds


def test_every_source_down_is_one_sentence_exit_2_nothing_written(
        served_bsds, http_server, fake_mnist_dir, tmp_path, monkeypatch, capsys):
    sources = [http_server.url("BSR_bsds500.tgz", fail="404"), http_server.url("master.zip", fail="drop"),
               http_server.url("changed.tgz")]
    monkeypatch.setattr(q3, "BSDS_SOURCES", tuple(sources))
    data = tmp_path / "data"
    shutil.copytree(os.path.join(fake_mnist_dir, "MNIST"), data / "MNIST")
    with pytest.raises(SystemExit) as error:
        run_cli(q3.main, ["--data-dir", str(data), "--out", str(tmp_path / "out"), "--download-only"])
    assert error.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    assert all(url in last for url in sources) and "--bsds-dir" in last
    assert sorted(os.listdir(data)) == ["MNIST"]


def test_download_only_fetches_and_stops(served_bsds, http_server, fake_mnist_dir, tmp_path,
                                         monkeypatch, capsys):
    monkeypatch.setattr(q3, "BSDS_SOURCES", (http_server.url("BSR_bsds500.tgz"),))
    data = tmp_path / "data"
    shutil.copytree(os.path.join(fake_mnist_dir, "MNIST"), data / "MNIST")
    q3.main(["--data-dir", str(data), "--out", str(tmp_path / "out"), "--download-only"])
    assert q3.folder_photos(str(data / "BSDS500")) == served_bsds
    assert os.listdir(tmp_path / "out") == []  # nothing trained
    # a local copy of either archive is used without the network
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(os.path.join(http_server.root, "master.zip"), local / "BSDS500-master.zip")
    args = q3.parse_args(["--data-dir", str(local), "--no-download"])
    assert q3.folder_photos(q3.find_bsds(args)) == served_bsds


# ---------------------------------------------------------------------------------------
# Official MNIST-M layout
# ---------------------------------------------------------------------------------------
def test_official_loader_reads_the_archive_and_resizes_to_28(tmp_path):
    write_official_archive(str(tmp_path / "mnist_m.tar.gz"))
    arrays, info = q3.load_official_mnistm(str(tmp_path), str(tmp_path / "cache"))
    assert arrays["train_images"].shape == (4, 28, 28, 3) and arrays["test_images"].shape == (4, 28, 28, 3)
    assert arrays["train_labels"].tolist() == [0, 1, 2, 3]
    assert arrays["train_images"][2, 5, 7].tolist() == [20, 100, 200]  # constant colour kept
    assert os.path.isfile(info["cache"])


def test_official_loader_names_a_malformed_label_line_and_a_corrupt_archive(tmp_path):
    write_official_archive(str(tmp_path / "mnist_m.tar.gz"),
                           labels_text="00000000.png 0\n00000001.png seven\n")
    with pytest.raises(UserError, match=r"mnist_m_train_labels\.txt line 2"):
        q3.load_official_mnistm(str(tmp_path), str(tmp_path / "cache"))
    write_official_archive(str(tmp_path / "good.tar.gz"))
    data = open(tmp_path / "good.tar.gz", "rb").read()
    (tmp_path / "bad").mkdir()
    open(tmp_path / "bad" / "mnist_m.tar.gz", "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"mnist_m\.tar\.gz is corrupt"):
        q3.load_official_mnistm(str(tmp_path / "bad"), str(tmp_path / "cache2"))


# ---------------------------------------------------------------------------------------
# Model, schedules, gradient reversal, one training step
# ---------------------------------------------------------------------------------------
def test_model_shapes_and_load_model(tmp_path):
    torch.manual_seed(0)
    model = q3.DANNNet([0.1, 0.2, 0.3])
    x = torch.rand(5, 3, 28, 28)
    assert model.features(x).shape == (5, 768)
    assert model(x).shape == (5, 10)
    assert model.last_hidden(x).shape == (5, 100)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for m in model.modules())
    path = str(tmp_path / "dann.pt")
    save_checkpoint(path, q3.KINDS["dann"], {"model": "dann", "seed": 0, "mean": [0.1, 0.2, 0.3]}, model)
    loaded = q3.load_model(path)
    assert not loaded.training
    assert torch.allclose(loaded(x), model(x))
    assert torch.allclose(model.features(x), model.feature_extractor(x - model.mean))


def test_pooling_before_relu_is_the_papers_network_exactly():
    """conv-pool-ReLU gives the same features and gradients as the paper's conv-ReLU-pool."""
    torch.manual_seed(0)
    model = q3.DANNNet([0.5, 0.5, 0.5])
    conv1, conv2 = model.feature_extractor[0], model.feature_extractor[3]
    paper = torch.nn.Sequential(conv1, torch.nn.ReLU(), torch.nn.MaxPool2d(2), conv2,
                                torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten())
    x = q3.as_input(torch.randint(0, 256, (6, 3, 28, 28), dtype=torch.uint8))
    ours = model.features(x)
    theirs = paper(x - model.mean)
    assert torch.equal(ours, theirs) and (theirs == 0).any()  # the ReLU does cut values
    g_ours = torch.autograd.grad(ours.square().sum(), [conv1.weight, conv2.weight])
    g_theirs = torch.autograd.grad(theirs.square().sum(), [conv1.weight, conv2.weight])
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_wrong_weights_are_one_sentence(tmp_path):
    other = str(tmp_path / "other.pt")
    save_checkpoint(other, "q1_vae", {}, torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="holds a 'q1_vae' model"):
        q3.load_model(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="truncated or not a PyTorch checkpoint"):
        q3.load_model(str(garbage))
    bad = str(tmp_path / "bad.pt")
    save_checkpoint(bad, q3.KINDS["dann"], {"model": "dann", "seed": 0, "mean": [0, 0, 0]},
                    torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="does not fit this architecture"):
        q3.load_model(bad)


def test_schedules_at_p_0_half_1():
    assert q3.learning_rate(0.0) == pytest.approx(0.01)
    assert q3.learning_rate(0.5) == pytest.approx(0.01 / 6 ** 0.75)
    assert q3.learning_rate(1.0) == pytest.approx(0.01 / 11 ** 0.75)
    assert q3.adaptation_lambda(0.0) == pytest.approx(0.0)
    assert q3.adaptation_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert q3.adaptation_lambda(1.0) == pytest.approx(0.9999092, abs=1e-6)


def test_domain_gradient_reaches_features_reversed_and_scaled():
    torch.manual_seed(0)
    model = q3.DANNNet([0.5, 0.5, 0.5])
    xs, xt = torch.rand(8, 3, 28, 28), torch.rand(8, 3, 28, 28)
    ys = torch.randint(0, 10, (8,))
    lam = 0.37
    _, domain_loss, _ = q3.dann_losses(model, xs, ys, xt, lam)
    weights = [model.feature_extractor[0].weight, model.domain_classifier[0].weight]
    reversed_grads = torch.autograd.grad(domain_loss, weights)
    logits = model.domain_classifier(model.features(torch.cat([xs, xt]))).squeeze(1)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.cat([torch.zeros(8), torch.ones(8)]))
    plain_grads = torch.autograd.grad(plain, weights)
    assert plain_grads[0].abs().max() > 0
    torch.testing.assert_close(reversed_grads[0], -lam * plain_grads[0], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(reversed_grads[1], plain_grads[1])


def test_dann_step_lowers_the_label_loss_and_stops_on_nan(monkeypatch):
    torch.manual_seed(0)
    model = q3.DANNNet([0.5, 0.5, 0.5])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    digits, labels = fake_digits(32, seed=0)
    source, labels = q3.as_input(torch.from_numpy(digits)), torch.from_numpy(labels).long()
    target = q3.as_input(torch.randint(0, 256, (32, 3, 28, 28), dtype=torch.uint8))
    first = q3.dann_step(model, optimizer, source, labels, target, 0.1)
    for _ in range(30):
        last = q3.dann_step(model, optimizer, source, labels, target, 0.1)
    assert last[0] < 0.5 * first[0] and 0 <= last[2] <= 1
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UserError, match="DANN label loss became nan"):
        q3.dann_step(model, optimizer, source * float("nan"), labels, target, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no NaN update


# ---------------------------------------------------------------------------------------
# Command line: arguments, bad input
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--lr", "-1"], ["--seeds", "x"],
                                 ["--mnistm", "official"], ["--seed", "-1"],
                                 ["--seed", str(2 ** 32)], ["--mnistm-seed", "-1"],
                                 ["--momentum", "1"], ["--validation-size", "0"]])
def test_bad_arguments_are_argparse_errors(bad, capsys):
    with pytest.raises(SystemExit) as error:
        q3.parse_args(bad)
    assert error.value.code == 2


def test_out_is_checked_before_any_data(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(UserError, match="--out .* is a file"):
        q3.main(["--data-dir", str(tmp_path / "nothing"), "--out", str(regular), "--no-download"])


def test_missing_data_is_one_sentence(fake_mnist_dir, fake_bsds_dir, tmp_path):
    with pytest.raises(UserError, match="MNIST"):
        q3.main(base_args(str(tmp_path / "nothing"), fake_bsds_dir, tmp_path, "--no-download"))
    with pytest.raises(UserError, match="BSDS500 is missing"):
        q3.main(["--data-dir", fake_mnist_dir, "--out", str(tmp_path / "o"), "--no-download"])
    with pytest.raises(UserError, match="does not hold images/train"):
        q3.main(["--data-dir", fake_mnist_dir, "--bsds-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="leaves no source training images"):
        q3.main(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path, "--validation-size", "300"))


def test_nan_loss_stops_with_a_true_note(fake_mnist_dir, fake_bsds_dir, tmp_path, monkeypatch, capsys):
    real = q3.dann_losses
    monkeypatch.setattr(q3, "dann_losses", lambda *a: (real(*a)[0] * float("nan"), *real(*a)[1:]))
    with pytest.raises(SystemExit) as error:
        run_cli(q3.main, base_args(fake_mnist_dir, fake_bsds_dir, tmp_path))
    assert error.value.code == 2
    assert "became nan; training stopped; nothing was saved" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# End to end, --report-only, --eval-only
# ---------------------------------------------------------------------------------------
def test_end_to_end_writes_every_output_and_beats_an_untrained_model(finished_run, fake_mnist_dir,
                                                                      fake_bsds_dir):
    out = finished_run / "out"
    for name in ("source_only.pt", "dann.pt", "target_only.pt", "metrics.json", "report.md",
                 "mnistm_samples.png", "figure5_tsne_domain.png", "figure5_tsne_digits.png",
                 "training_curves.png", "confusion_mnistm_dann.png"):
        assert (out / name).is_file(), name
    assert not (out / "training_state.pt").exists()  # complete: nothing left to resume
    report = (out / "report.md").read_text()
    for png in out.glob("*.png"):
        assert f"]({png.name})" in report, png.name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {r["model"] for r in metrics["runs"]} == set(q3.MODELS) and not metrics["resumed"]
    dann = next(r for r in metrics["runs"] if r["model"] == "dann")
    assert dann["training"]["images_per_step"] == 32 and "svm_mnistm_test_accuracy" in dann
    assert len(dann["training"]["history"]) == 2
    assert {"source_val_accuracy", "target_val_accuracy", "val_domain_accuracy"} <= set(
        dann["training"]["history"][-1])
    # the trained source-only model against an untrained one on the MNIST test digits
    args = q3.parse_args(base_args(fake_mnist_dir, fake_bsds_dir, finished_run))
    data, _ = q3.load_data(args, torch.device("cpu"))
    torch.manual_seed(0)
    untrained = q3.accuracy(q3.DANNNet(metrics["pixel_mean"]), data["source_test"],
                            data["source_test_labels"])
    trained = next(r for r in metrics["runs"] if r["model"] == "source_only")["mnist_test_accuracy"]
    assert trained > untrained + 0.3


def test_test_sets_are_read_only_after_training(fake_mnist_dir, fake_bsds_dir, tmp_path, monkeypatch):
    """No MNIST or MNIST-M test image or label is looked at before every model is trained."""
    reads, stage = [], ["training"]

    class Watched(dict):
        def __getitem__(self, key):
            reads.append((stage[0], key))
            return super().__getitem__(key)

    real_load, real_train = q3.load_data, q3.train_all

    def load_data(*a):
        data, info = real_load(*a)
        return Watched(data), info
    monkeypatch.setattr(q3, "load_data", load_data)

    def train_all(*a):
        result = real_train(*a)
        stage[0] = "after"
        return result
    monkeypatch.setattr(q3, "train_all", train_all)
    q3.main(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path, "--models", "dann", "--epochs", "1"))
    assert ("training", "target_val") in reads and ("after", "target_test") in reads
    assert not [key for when, key in reads if when == "training" and "test" in key]


def test_report_only_reproduces_the_report(finished_run, tmp_path, capsys):
    out = finished_run / "out"
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy(out / "metrics.json", copy_dir / "metrics.json")
    q3.main(["--report-only", "--out", str(copy_dir)])
    assert (copy_dir / "report.md").read_text() == (out / "report.md").read_text()


def test_eval_only_writes_only_under_eval_and_reproduces(finished_run, fake_mnist_dir,
                                                         fake_bsds_dir, capsys):
    out = finished_run / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    q3.main(["--data-dir", fake_mnist_dir, "--bsds-dir", fake_bsds_dir, "--cache-dir",
             str(finished_run / "cache"), "--out", str(out), "--eval-only", "--device", "cpu"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    assert comparison["compared"] >= 12 and comparison["reproduced"] == comparison["compared"]
    assert "reproduced" in capsys.readouterr().out
    assert (out / "eval" / "figure5_tsne_domain.png").is_file()
    # --weights: a single file, a folder without weights, a path that does not exist
    assert q3.find_weights(str(out / "dann.pt")) == {("dann", 0): str(out / "dann.pt")}
    with pytest.raises(UserError, match="is a folder without weights files"):
        q3.find_weights(str(out / "eval"))
    with pytest.raises(UserError, match="does not exist"):
        q3.find_weights(str(out / "nothing"))


# ---------------------------------------------------------------------------------------
# Interruptions and --resume
# ---------------------------------------------------------------------------------------
def interrupt_at_validation(monkeypatch, call):
    """Ctrl-C at the `call`-th end-of-epoch validation (before that epoch is saved)."""
    interrupt_on_call(monkeypatch, q3, "validation_accuracies", call)


def test_interrupt_then_resume_is_bit_identical(finished_run, fake_mnist_dir, fake_bsds_dir,
                                                tmp_path, monkeypatch, capsys):
    argv = base_args(fake_mnist_dir, fake_bsds_dir, tmp_path, "--svm-retrain")
    interrupt_at_validation(monkeypatch, 4)  # DANN's 2 epochs done, source only's 2nd epoch
    with pytest.raises(SystemExit) as error:
        run_cli(q3.main, argv)
    assert error.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"interrupted: epoch 1 of 2 of Source only seed 0 is saved in "
                           f"{tmp_path / 'out' / 'training_state.pt'}; continue with --resume")
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"--lr 0.02 \(the run has 0.05\)"):
        q3.main(argv + ["--resume", "--lr", "0.02"])
    q3.main(["--out", str(tmp_path / "out"), "--data-dir", fake_mnist_dir, "--bsds-dir",
             fake_bsds_dir, "--cache-dir", str(tmp_path / "cache"), "--resume"])
    for name in q3.MODELS:
        resumed = torch.load(tmp_path / "out" / f"{name}.pt", weights_only=False)["model"]
        reference = torch.load(finished_run / "out" / f"{name}.pt", weights_only=False)["model"]
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), name
    resumed = json.loads((tmp_path / "out" / "metrics.json").read_text())
    reference = json.loads((finished_run / "out" / "metrics.json").read_text())
    assert resumed["resumed"] and resumed["summary"] == reference["summary"]
    for a, b in zip(resumed["runs"], reference["runs"]):
        assert a["training"]["history"] == b["training"]["history"]


def test_resume_without_a_saved_run_is_refused(fake_mnist_dir, fake_bsds_dir, tmp_path):
    with pytest.raises(UserError, match="no interrupted run to continue"):
        q3.main(base_args(fake_mnist_dir, fake_bsds_dir, tmp_path, "--resume"))


# ---------------------------------------------------------------------------------------
# The report: every judgement's two branches; the committed report
# ---------------------------------------------------------------------------------------
def history(target_val, domain=0.6):
    return [{"epoch": i + 1, "lr": 0.01, "lambda": 0.5, "label_loss": 0.1, "domain_loss": 0.6,
             "domain_accuracy": domain, "val_domain_accuracy": domain,
             "source_val_accuracy": 0.99, "target_val_accuracy": v} for i, v in enumerate(target_val)]


def test_epoch_choice_branches():
    levelled = {"command": "c", "runs": [{"model": "dann", "mnistm_test_accuracy": 0.81, "training": {
        "seed": 1, "epochs": 4, "history": history([0.5, 0.7, 0.795, 0.80])}}]}
    text = "\n".join(q3.epoch_choice_section([("epoch_choice", levelled)], 3))
    assert "first epoch within 0.01 of it is epoch 3: after epoch 3 it gains less" in text
    assert "the count this validation run points to." in text
    assert "evaluated once after its training: 0.8100." in text
    text = "\n".join(q3.epoch_choice_section([("epoch_choice", levelled)], 4))
    assert "not the 3 this validation run points to" in text
    rising = copy.deepcopy(levelled)
    rising["runs"][0]["training"]["history"] = history([0.5, 0.6, 0.7, 0.8])
    text = "\n".join(q3.epoch_choice_section([("epoch_choice", rising)], 4))
    assert "had not levelled off" in text
    assert "No validation run" in "\n".join(q3.epoch_choice_section([], 4))


def fake_metrics(dann=0.8, svm_shift=0.0, mixing=(0.95, 0.6), domain=0.6):
    runs = []
    for name, value in (("source_only", 0.5), ("dann", dann), ("target_only", 0.97)):
        runs.append({"model": name, "seed": 0, "mnist_test_accuracy": 0.99,
                     "mnistm_test_accuracy": value, "svm_mnist_test_accuracy": 0.99,
                     "svm_mnistm_test_accuracy": value + svm_shift,
                     "training": {"history": history([value], domain)}})
    return {"summary": q3.summarize_runs(runs), "runs": runs,
            "figure5_domain_knn_accuracy": dict(zip(("source_only", "dann"), mixing))}


def test_observation_branches():
    text = " ".join(q3.observations(fake_metrics()))
    assert "(paper 0.7666), one seed: above the paper's figure" in text and "closing 64 %" in text
    assert "changes the MNIST-M accuracy little" in text and "much more overlap" in text
    assert "hard to tell apart" in text
    text = " ".join(q3.observations(fake_metrics(dann=0.7, svm_shift=-0.05, mixing=(0.95, 0.9),
                                                 domain=0.9)))
    assert "below the paper's figure" in text and "moves the MNIST-M accuracy by up to -0.050" in text
    assert "not clearly more mixed" in text and "still tells the domains apart" in text
    # like with like: the paper's numbers are of SVM-retrained last layers
    text = " ".join(q3.observations(fake_metrics(dann=0.78, svm_shift=-0.05)))
    assert "DANN reaches 0.7800 on MNIST-M, 0.7300 with the last layer retrained" in text
    assert "below the paper's figure" in text


def test_dann_seeds_at_the_same_epoch_count_are_summarised():
    metrics = fake_metrics(dann=0.80)
    metrics["settings"] = {"epochs": 27}
    for r in metrics["runs"]:
        r["training"]["epochs"] = 27
    other = copy.deepcopy(metrics)
    other["runs"] = [dict(r, seed=2, mnistm_test_accuracy=0.84, svm_mnistm_test_accuracy=0.82)
                     for r in other["runs"] if r["model"] == "dann"]
    longer = copy.deepcopy(other)
    longer["runs"][0]["training"]["epochs"] = 30
    text = " ".join(q3.dann_seeds(metrics, [("seed2", other), ("longer", longer)]))
    assert "seeds 0, 2: MNIST-M test accuracy softmax 0.8200 ± 0.0283 (n=2)" in text
    assert "SVM last layer 0.8100 ± 0.0141 (n=2)" in text
    assert q3.dann_seeds(metrics, [("longer", longer)]) == []


def committed_copy(tmp_path):
    copy_dir = tmp_path / "committed"
    shutil.copytree(COMMITTED, copy_dir, ignore=shutil.ignore_patterns("*.pt", "*.png", "eval"))
    return copy_dir


def test_committed_report_is_rendered_from_committed_metrics(tmp_path):
    copy_dir = committed_copy(tmp_path)
    (copy_dir / "report.md").unlink()
    q3.main(["--report-only", "--out", str(copy_dir)])
    assert (copy_dir / "report.md").read_text() == open(os.path.join(COMMITTED, "report.md")).read()
    metrics = json.loads((copy_dir / "metrics.json").read_text())
    for key, value in (("mnistm_test_accuracy", 0.1234), ("svm_mnistm_test_accuracy", 0.1111)):
        summary = metrics["summary"]["dann"][key]
        summary["mean"] = summary["values"][0] = value
    (copy_dir / "metrics.json").write_text(json.dumps(metrics))
    q3.main(["--report-only", "--out", str(copy_dir)])
    report = (copy_dir / "report.md").read_text()
    assert "DANN reaches 0.1234 on MNIST-M, 0.1111 with the last layer" in report and "below the paper's" in report


def test_default_epochs_follow_the_committed_validation_run():
    choice = json.load(open(os.path.join(COMMITTED, "runs", q3.EPOCH_CHOICE_RUN, "metrics.json")))
    record = next(r["training"] for r in choice["runs"] if r["model"] == "dann")
    assert q3.first_epoch_near_best(record["history"])[2] == q3.DEFAULT_EPOCHS
    metrics = json.load(open(os.path.join(COMMITTED, "metrics.json")))
    assert metrics["settings"]["epochs"] == q3.DEFAULT_EPOCHS and not metrics["resumed"]


def test_import_does_not_train_or_read_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", "--bogus"])
    namespace = runpy.run_path(os.path.join(ROOT, "q3_mnistm_dann.py"), run_name="imported")
    assert callable(namespace["main"]) and callable(namespace["dann_step"])
