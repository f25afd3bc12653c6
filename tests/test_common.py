import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(5, 3, requires_grad=True)
    incoming = torch.randn(5, 3)
    for lambda_ in (0.0, 0.3, 6.0):
        x.grad = None
        y = common.grad_reverse(x, lambda_)
        assert torch.equal(y, x)
        y.backward(incoming)
        assert torch.equal(x.grad, -lambda_ * incoming)


def test_gradient_reversal_inside_a_network_reverses_only_below_it():
    layer = torch.nn.Linear(2, 2)
    head = torch.nn.Linear(2, 1)
    x = torch.randn(4, 2)
    head(common.grad_reverse(layer(x), 2.0)).sum().backward()
    reversed_grad = layer.weight.grad.clone()
    head_grad = head.weight.grad.clone()
    layer.zero_grad(), head.zero_grad()
    head(layer(x)).sum().backward()
    assert torch.allclose(reversed_grad, -2.0 * layer.weight.grad)
    assert torch.allclose(head_grad, head.weight.grad)


def test_classification_metrics_match_hand_computed_values():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = common.classification_metrics(y_true, y_pred, class_names=["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # precision: a 1/2, b 2/3, c 1/1; recall: a 1/2, b 2/2, c 1/2
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["f1"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert m["per_class"]["a"]["support"] == 2
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    table = common.metrics_table(m)
    assert "| b | 0.6667 | 1.0000 | 0.8000 | 2 |" in table


def test_confusion_matrix_figure_and_tsne_plot(tmp_path):
    m = common.classification_metrics([0, 1, 1], [0, 1, 0])
    common.plot_confusion_matrix(m, str(tmp_path / "cm.png"))
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (40, 5)), rng.normal(8, 1, (40, 5))])
    labels = np.repeat([0, 1], 40)
    embedding, index = common.plot_tsne(features, labels, str(tmp_path / "tsne.png"),
                                        names=["source", "target"], colors=["blue", "red"],
                                        n_points=60)
    assert embedding.shape == (60, 2) and len(set(index)) == 60
    assert (tmp_path / "cm.png").stat().st_size > 1000
    assert (tmp_path / "tsne.png").stat().st_size > 1000


def test_argparse_types_reject_bad_values():
    assert common.positive_int("3") == 3
    for parse, bad in ((common.positive_int, "0"), (common.positive_int, "x"),
                       (common.positive_float, "-1"), (common.nonnegative_float, "-0.1"),
                       (common.positive_float, "nan")):
        with pytest.raises(ValueError):
            parse(bad)


def test_checkpoint_round_trip_and_every_bad_file(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = str(tmp_path / "model.pt")
    common.save_checkpoint(path, "kind_a", {"width": 3}, model, epoch=4)
    state = common.load_checkpoint(path, "kind_a")
    assert state["hparams"] == {"width": 3} and state["epoch"] == 4
    fresh = common.load_weights(torch.nn.Linear(3, 2), state, path)
    assert torch.equal(fresh.weight, model.weight)
    assert [f for f in os.listdir(tmp_path)] == ["model.pt"]  # no temporary file left

    with pytest.raises(common.UserError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "missing.pt"), "kind_a")
    with pytest.raises(common.UserError, match="holds a 'kind_a' model"):
        common.load_checkpoint(path, "kind_b")
    with pytest.raises(common.UserError, match="does not fit this architecture"):
        common.load_weights(torch.nn.Linear(4, 2), state, path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(common.UserError, match="truncated"):
        common.load_checkpoint(str(truncated), "kind_a")


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    common.write_json(str(path), {"a": 1})

    def broken_write(tmp):
        open(tmp, "w").write("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(str(path), broken_write)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_check_finite_stops_on_nan():
    assert common.check_finite(torch.tensor(2.5)) == 2.5
    with pytest.raises(common.UserError, match="became nan"):
        common.check_finite(torch.tensor(float("nan")), "training loss")


def _serve_mnist(http_server, fake_mnist_dir, monkeypatch, mirrors):
    import gzip
    import hashlib
    from torchvision.datasets import MNIST

    resources = []
    for name, _ in MNIST.resources:
        data = gzip.compress(open(os.path.join(fake_mnist_dir, "MNIST", "raw", name[:-3]),
                                  "rb").read(), mtime=0)
        (http_server.root_path / name).write_bytes(data)
        resources.append((name, hashlib.md5(data).hexdigest()))
    monkeypatch.setattr(MNIST, "resources", resources)
    monkeypatch.setattr(MNIST, "mirrors", mirrors)


def test_mnist_downloads_through_torchvision_from_the_second_mirror(tmp_path, http_server,
                                                                   monkeypatch, fake_mnist_dir):
    http_server.root_path = tmp_path / "served"
    _serve_mnist(http_server, fake_mnist_dir, monkeypatch,
                 [http_server.url("", "404"), http_server.url("")])
    (train_x, train_y), (test_x, _) = common.load_mnist(str(tmp_path / "data"))
    assert train_x.shape == (300, 28, 28) and test_x.shape == (100, 28, 28)
    assert any(r.startswith("/ok/") for r in http_server.requests)
    monkeypatch.setattr("torchvision.datasets.MNIST.mirrors", [http_server.url("", "404")])
    with pytest.raises(common.UserError, match="MNIST is missing or incomplete in .*404"):
        common.load_mnist(str(tmp_path / "data2"))
    with pytest.raises(common.UserError, match=r"downloads are off"):
        common.load_mnist(str(tmp_path / "data3"), download=False)


def test_mnist_gz_files_alone_are_unpacked_without_a_network(tmp_path, http_server,
                                                             monkeypatch, fake_mnist_dir):
    http_server.root_path = tmp_path / "served"
    _serve_mnist(http_server, fake_mnist_dir, monkeypatch, ["http://127.0.0.1:9/"])
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in http_server.root_path.iterdir():
        (raw / path.name).write_bytes(path.read_bytes())
    (train_x, _), (_, test_y) = common.load_mnist(str(tmp_path / "data"))
    assert train_x.shape == (300, 28, 28) and len(test_y) == 100


@pytest.mark.parametrize("damage, message", [
    ("labels_out_of_range", "the label 11, outside 0-9"),
    ("fewer_labels", "holds 300 images but .* holds 299 labels"),
    ("garbage", "is not readable"),
    ("wrong_shape", "not 28x28 uint8 images"),
])
def test_corrupt_mnist_is_refused_with_the_folder_named(tmp_path, damage, message):
    from conftest import write_fake_mnist, write_idx

    write_fake_mnist(str(tmp_path))
    raw = tmp_path / "MNIST" / "raw"
    if damage == "labels_out_of_range":
        write_idx(raw / "train-labels-idx1-ubyte", np.full(300, 11))
    elif damage == "fewer_labels":
        write_idx(raw / "train-labels-idx1-ubyte", np.zeros(299))
    elif damage == "garbage":
        (raw / "t10k-images-idx3-ubyte").write_bytes(b"not an idx file at all")
    else:
        write_idx(raw / "train-images-idx3-ubyte", np.zeros((300, 28, 27)))
    with pytest.raises(common.UserError, match=message) as error:
        common.load_mnist(str(tmp_path), download=False)
    assert str(raw) in str(error.value)


def test_a_data_folder_that_is_a_file_is_one_sentence(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(common.UserError, match="is a file, not a folder"):
        common.load_mnist(str(tmp_path / "f"), download=True)


def test_load_mnist_reads_idx_files(fake_mnist_dir):
    (train_x, train_y), (test_x, test_y) = common.load_mnist(fake_mnist_dir, download=False)
    assert train_x.shape == (300, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (100, 28, 28) and set(test_y.tolist()) == set(range(10))


def test_choose_device():
    assert common.choose_device("cpu").type == "cpu"
    assert common.choose_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="no CUDA"):
            common.choose_device("cuda")


def test_importing_the_scripts_leaves_the_matplotlib_backend_alone():
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('pdf'); import common, q1_vae, q2_cyclevae, "
            "q3_toy_dann, q3_mnistm_dann; print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(common.__file__)), check=True)
    assert out.stdout.strip() == "pdf"


def test_seed_type_and_prepare_out(tmp_path):
    assert common.seed_type("0") == 0 and common.seed_type(str(2**32 - 1)) == 2**32 - 1
    for bad in ("-1", str(2**32), "1.5"):
        with pytest.raises(ValueError):
            common.seed_type(bad)
    assert common.prepare_out(str(tmp_path / "a" / "b")) and (tmp_path / "a" / "b").is_dir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(common.UserError, match="is a file, not a folder"):
        common.prepare_out(str(a_file))
    with pytest.raises(common.UserError, match="cannot be written"):
        common.prepare_out(str(a_file / "below"))
    with pytest.raises(common.UserError, match="cannot be written"):
        common.prepare_out("/proc/no-such-output-folder")


def test_folder_given_as_weights_is_named_a_folder(tmp_path):
    with pytest.raises(common.UserError, match="is a folder"):
        common.load_checkpoint(str(tmp_path), "kind_a")


def _parser():
    import argparse

    parser = argparse.ArgumentParser()
    common.add_common_args(parser, "out")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=30)
    return parser


def test_parse_once_records_the_given_flags_and_refuses_two_modes(capsys):
    parser = _parser()
    args = common.parse(parser, ["--epochs", "2", "--lr=0.5"])
    assert args.given == {"epochs", "lr"}
    assert common.settings_of(args) == {"seed": 0, "lr": 0.5, "epochs": 2}
    with pytest.raises(SystemExit):
        common.parse(parser, ["--resume", "--eval-only"])
    assert "--resume and --eval-only exclude each other" in capsys.readouterr().err


def test_resume_takes_settings_and_data_from_the_state_and_refuses_other_ones(tmp_path):
    parser = _parser()
    path = str(tmp_path / "state.pt")
    data = common.fingerprint(np.arange(100, dtype=np.uint8))
    args = common.parse(parser, ["--epochs", "2", "--lr", "0.5"])
    torch.manual_seed(3)
    common.save_training_state(path, common.settings_of(args), data, step=7)
    expected = torch.rand(3)

    resumed = common.parse(parser, ["--resume"])
    torch.manual_seed(99)
    state = common.load_training_state(path, resumed, data)
    assert state["step"] == 7 and resumed.epochs == 2 and resumed.lr == 0.5
    assert torch.equal(torch.rand(3), expected)  # the RNG continues where it was saved

    other = common.parse(parser, ["--resume", "--epochs", "2", "--lr", "0.02"])
    with pytest.raises(common.UserError, match=r"--lr 0.02 \(the run has 0.5\)") as error:
        common.load_training_state(path, other, data)
    assert "--epochs" not in str(error.value)  # the same value given again is fine
    fewer = common.fingerprint(np.arange(50, dtype=np.uint8))
    assert fewer != data and fewer != common.fingerprint(np.arange(1, 101, dtype=np.uint8))
    with pytest.raises(common.UserError, match=f"other data .*{data}.*now {fewer}"):
        common.load_training_state(path, common.parse(parser, ["--resume"]), fewer)
    common.save_training_state(path, common.settings_of(args), data, finished=True)
    with pytest.raises(common.UserError, match="is finished; nothing was changed"):
        common.load_training_state(path, common.parse(parser, ["--resume"]), data)
    with pytest.raises(common.UserError, match="no interrupted run to continue"):
        common.load_training_state(str(tmp_path / "none.pt"), resumed, data)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="truncated"):
        common.load_training_state(str(tmp_path / "bad.pt"), resumed, data)


def _metrics(results, checks=()):
    return {"script": "q.py", "command": "python q.py", "settings": {}, "results": results,
            "checks": [common.check(n, v, ">= 1", v >= 1) for n, v in checks]}


def test_compare_with_committed_says_reproduced_differs_or_within_tolerance(tmp_path, capsys):
    new = _metrics({"svm": {"accuracy": 0.9801}, "elbo": 97.4, "new": 1}, [("c", 2)])
    old = _metrics({"svm": {"accuracy": 0.98}, "elbo": 97.5, "old": 2}, [("c", 2)])
    rows = common.compare_with_committed(new, old, str(tmp_path),
                                         {"results.svm": (0.001, "an SVM refit")})
    assert [(r["name"], r["reproduced"]) for r in rows] == [
        ("checks.c.holds", True), ("checks.c.value", True), ("results.elbo", False),
        ("results.old", False), ("results.svm.accuracy", True)]
    out = capsys.readouterr().out
    assert "differs by -0.1" in out and "not recomputed" in out and "3 of 5 numbers" in out
    assert common.read_json(str(tmp_path / "comparison.json"), "x")["compared"] == 5
    with pytest.raises(common.UserError, match="nothing was verified"):
        common.compare_with_committed(_metrics({"a": 1}), _metrics({"b": 1}), str(tmp_path))


def test_report_only_fills_the_template_and_refuses_foreign_metrics(tmp_path):
    common.write_json(str(tmp_path / "metrics.json"), _metrics({"acc": 0.5}, [("c", 2)]))
    common.write_json(str(tmp_path / "runs" / "seed1" / "metrics.json"), _metrics({"acc": 0.7}))

    def render(metrics, out):
        return common.fill("acc {results[acc]:.2f}\n{checks}\n{runs}\n", metrics,
                           checks=common.checks_table(metrics["checks"]),
                           runs=common.runs_table(out, "q.py", [("acc", "results.acc", "{:.1f}"),
                                                                ("x", "results.x", "{}")]))

    text = common.report_only(str(tmp_path), "q.py", render)
    assert (tmp_path / "report.md").read_text() == text
    assert text.startswith("acc 0.50\n| check | value | threshold | holds |")
    assert "| c | 2 | >= 1 | **yes** |" in text
    assert "| seed1 | `python q.py` | 0.7 | - |" in text
    with pytest.raises(common.UserError, match="written by q.py, not other.py"):
        common.report_only(str(tmp_path), "other.py", render)
    common.write_json(str(tmp_path / "runs" / "x" / "metrics.json"), {"script": "q.py"})
    with pytest.raises(common.UserError, match="runs/x/metrics.json lacks settings"):
        common.report_only(str(tmp_path), "q.py", render)
    with pytest.raises(common.UserError, match="metrics file .* does not exist"):
        common.report_only(str(tmp_path / "empty"), "q.py", render)


def _cli_program(tmp_path, body):
    program = tmp_path / "program.py"
    program.write_text("import sys, time\nsys.path.insert(0, %r)\nimport common\n"
                       "def main(argv=None):\n%s\ncommon.run_cli(main)\n"
                       % (os.path.dirname(os.path.abspath(common.__file__)), body))
    return str(program)


def test_run_cli_sigterm_and_user_error_exit_codes(tmp_path):
    import signal
    import subprocess
    import sys

    program = _cli_program(tmp_path, "    common.note_saved('epoch 1 is saved in x.pt')\n"
                                     "    print('ready', flush=True)\n    time.sleep(60)")
    process = subprocess.Popen([sys.executable, program], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert err.strip() == "interrupted: epoch 1 is saved in x.pt"

    program = _cli_program(tmp_path, "    raise common.UserError('the file x is missing')")
    done = subprocess.run([sys.executable, program], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == "error: the file x is missing\n"


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    import signal
    import subprocess
    import sys

    path = str(tmp_path / "state.pt")
    common.save_checkpoint(path, "kind_a", {}, torch.nn.Linear(2, 2), step=1)
    # a child process writes a large checkpoint over it and is killed in the middle
    code = ("import sys, torch; sys.path.insert(0, %r); import common\n"
            "def slow(tmp):\n"
            "    torch.save({'big': torch.zeros(2_000_000)}, tmp)\n"
            "    print('written', flush=True)\n"
            "    import time; time.sleep(60)\n"
            "common.atomic_write(%r, slow)\n"
            % (os.path.dirname(os.path.abspath(common.__file__)), path))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "written"  # the temporary file is complete
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert common.load_checkpoint(path, "kind_a")["step"] == 1


def _archive(tmp_path, name=b"payload"):
    import tarfile

    folder = tmp_path / "served"
    (tmp_path / "photo.txt").write_bytes(name * 1000)
    with tarfile.open(folder / "data.tgz", "w:gz") as tar:
        tar.add(tmp_path / "photo.txt", arcname="data/photo.txt")
    return folder / "data.tgz"


def _tar_check(path):
    import tarfile

    try:
        with tarfile.open(path) as tar:
            tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"not a complete tar archive ({error})") from None


def test_download_first_falls_back_to_the_next_source(tmp_path, http_server, capsys):
    _archive(tmp_path)
    sources = (http_server.url("data.tgz", "404"), http_server.url("data.tgz", "drop"),
               http_server.url("data.tgz"))
    dest = tmp_path / "data"
    path = common.download_first(sources, str(dest), "data.tgz", check=_tar_check)
    assert os.listdir(dest) == ["data.tgz"]
    _tar_check(path)
    captured = capsys.readouterr()
    assert f"fetching data.tgz from {sources[0]}" in captured.out
    assert f"  {sources[0]}: HTTP 404" in captured.err
    assert f"  {sources[1]}: the connection closed after" in captured.err
    assert sources[2] not in captured.err
    # once in place it is used without asking any source
    count = len(http_server.requests)
    assert common.download_first(sources, str(dest), "data.tgz", check=_tar_check) == path
    assert len(http_server.requests) == count


def test_download_first_rejects_a_wrong_checksum_and_every_source_down(tmp_path, http_server,
                                                                      capsys):
    from torchvision.datasets.utils import calculate_md5

    good = calculate_md5(str(_archive(tmp_path)))
    _archive(tmp_path, b"changed")  # the server now holds other bytes
    dest = tmp_path / "data"
    with pytest.raises(common.UserError) as error:
        common.download_first((http_server.url("data.tgz"), "http://127.0.0.1:9/data.tgz"),
                              str(dest), "data.tgz", md5=good,
                              offline_hint="put data.tgz into the data folder")
    message = str(error.value)
    assert message.startswith("data.tgz could not be downloaded from any of its 2 sources")
    assert message.endswith("put data.tgz into the data folder")
    assert "checksum mismatch" in capsys.readouterr().err
    assert os.listdir(dest) == []  # nothing half-written


def test_commands_hold_no_path_outside_the_working_folder(monkeypatch):
    here = os.getcwd()
    assert (common.shown_command("python q2.py --data-dir /srv/data/sprites --width 32")
            == "python q2.py --data-dir DATA_DIR --width 32")
    assert (common.shown_command(f"python q3.py --data-dir ../d --cache-dir {here}/data/c "
                                 "--out outputs/x") ==
            "python q3.py --data-dir DATA_DIR --cache-dir data/c --out outputs/x")
    monkeypatch.setattr("sys.argv", [f"{here}/q1_vae.py", "--out", "/tmp/o"])
    assert common.command_line() == "python q1_vae.py --out OUT"


def test_a_full_disk_is_one_sentence_naming_the_folder(tmp_path):
    import subprocess
    import sys

    program = _cli_program(tmp_path, "    raise OSError(28, 'No space left on device', "
                                     "'/somewhere/out/x.png')")
    done = subprocess.run([sys.executable, program], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == ("error: the disk is full (writing in /somewhere/out); nothing "
                           "was saved\n")


def test_a_failing_figure_keeps_the_previous_file(tmp_path, monkeypatch):
    from common import plt

    path = tmp_path / "f.png"
    common.save_figure(plt.figure(), str(path))
    before = path.read_bytes()
    fig = plt.figure()
    monkeypatch.setattr(fig, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        common.save_figure(fig, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["f.png"]


def test_verify_reproduces_the_committed_toy_run_and_fails_on_a_changed_number(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    shutil.copytree(os.path.join(ROOT, "outputs", "q3_toy"), outputs / "q3_toy",
                    ignore=shutil.ignore_patterns("eval", "*.png", "report.md"))
    argv = ["--outputs", str(outputs), "--questions", "Q3.1", "--device", "cpu"]
    assert common.verify(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^(\d+) of \1 committed numbers reproduced$", out, re.M)
    path = outputs / "q3_toy" / "metrics.json"
    metrics = json.loads(path.read_text())
    numbers = metrics["results"]
    while isinstance(numbers, dict):  # the first result number, wherever it lies
        key, value = next((k, v) for k, v in numbers.items() if isinstance(v, (dict, float)))
        numbers, parent = value, numbers
    parent[key] += 0.01
    path.write_text(json.dumps(metrics))
    assert common.verify(argv) == 1
    assert "| **no** |" in capsys.readouterr().out
    (outputs / "q3_toy" / "dann.pt").unlink()
    assert common.verify(argv) == 2
    assert "was not verified" in capsys.readouterr().out
