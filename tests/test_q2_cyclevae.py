"""Tests of q2_cyclevae.py on tiny synthetic sprites written in the real on-disk formats:
MATLAB v7.3 character files (HDF5 with a 512-byte userblock, cell arrays as object
references into #refs#) and a MATLAB v5 split file."""
import json
import os
import shutil
import sys
import tarfile

import h5py
import numpy as np
import pytest
import torch
from scipy.io import savemat

import common
import q2_cyclevae as q2
from common import UserError
from conftest import interrupt_on_call

ANIM_LENGTHS = [2, 2, 1, 1] + [1] * 17   # 21 animations, 25 frames per character
N_FRAMES = sum(ANIM_LENGTHS)
N_CHARACTERS = 12
SPLITS = {"trainidx": [1, 2, 3, 4, 5, 6], "validx": [7, 8], "testidx": [9, 10, 11, 12]}


def character_frames(i):
    """uint8 (frames, 60, 60, 3): a colour per character (identity), a bar whose place
    follows the frame (pose); characters 2k and 2k+1 (weapon twins) differ only in frame 0."""
    rng = np.random.default_rng(i // 2)
    colour = rng.integers(60, 255, 3)
    frames = np.zeros((N_FRAMES, 60, 60, 3), dtype=np.uint8)
    for f in range(N_FRAMES):
        frames[f, 10 + f:20 + f, 5:50] = colour
        frames[f, 40:55, 2 * f:2 * f + 6] = 255 - colour
    if i % 2:
        frames[0, 0:4, 0:4] = 255  # the "weapon", visible in one frame only
    frames[:, 1, 2, 0] = 7  # a known asymmetric pixel: row 1, column 2, red
    return frames


def write_v73(path, frames, labels):
    """A character file as MATLAB 7.3 writes it: cell arrays `sprites` / `masks` of object
    references to float64 (frames, 10800) / (frames, 3600) datasets in #refs#, column-major."""
    masks = (frames.max(axis=3) > 0).astype(np.uint8) * 255
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        cells = {"sprites": [], "masks": []}
        start = 0
        for a, n in enumerate(ANIM_LENGTHS):
            block = frames[start:start + n]
            # MATLAB's 60x60x3 frame, column-major, seen by h5py as (channel, column, row)
            data = block.transpose(0, 3, 2, 1).reshape(n, -1) / 255.0
            mask = masks[start:start + n].transpose(0, 2, 1).reshape(n, -1) / 255.0
            for key, values, name in (("sprites", data, f"s{a}"), ("masks", mask, f"m{a}")):
                ds = refs.create_dataset(name, data=values)
                ds.attrs["MATLAB_class"] = np.bytes_(b"double")
                cells[key].append(ds.ref)
            start += n
        for key in ("sprites", "masks"):
            ds = f.create_dataset(key, data=np.array(cells[key], dtype=h5py.ref_dtype)[:, None],
                                  dtype=h5py.ref_dtype)
            ds.attrs["MATLAB_class"] = np.bytes_(b"cell")
        ds = f.create_dataset("labels", data=np.asarray(labels, dtype=np.float64)[:, None])
        ds.attrs["MATLAB_class"] = np.bytes_(b"double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM")


def write_dataset(root, n_characters=N_CHARACTERS):
    folder = os.path.join(root, "data", "sprites")
    os.makedirs(folder, exist_ok=True)
    for i in range(n_characters):
        write_v73(os.path.join(folder, f"sprites_{i}.mat"), character_frames(i),
                  [i % 2, i % 4, i % 3, i % 6, 0, 1, i % 2])
    savemat(os.path.join(folder, "sprites_splits.mat"),
            {k: np.array([v], dtype=np.uint16) for k, v in SPLITS.items()})
    return root


@pytest.fixture(scope="module")
def sprites_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("sprites")))

TINY = ["--z-dim", "4", "--s-dim", "3", "--width", "4", "--batch-size", "4", "--epochs", "0.25",
        "--lr", "3e-2", "--lr-drop-epoch", "0.2", "--grids", "2", "--no-download",
        "--device", "cpu", "--precision", "fp32"]


def run(argv, capsys=None):
    """The script as a user runs it: exit code, and stderr when capsys is given."""
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(lambda a: (q2.main(a), sys.exit(0)), argv)
    return exit_info.value.code, (capsys.readouterr().err if capsys else None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sprites_dir):
    out = str(tmp_path_factory.mktemp("q2out"))
    q2.main(TINY + ["--data-dir", sprites_dir, "--out", out])
    return out


def md5(path):
    from torchvision.datasets.utils import calculate_md5
    return calculate_md5(path)


# --- data ----------------------------------------------------------------------------
def test_v73_reader_fortran_layout(tmp_path):
    frames = character_frames(3)
    path = str(tmp_path / "sprites_3.mat")
    write_v73(path, frames, [1, 2, 3, 4, 5, 6, 7])
    got, lengths = q2.read_character_mat(path)
    assert got.shape == (N_FRAMES, 60, 60, 3) and got.dtype == np.uint8
    assert got[4, 1, 2, 0] == 7 and got[4, 2, 1, 0] != 7  # row 1, column 2, red channel
    np.testing.assert_array_equal(got, frames)
    assert lengths.tolist() == ANIM_LENGTHS


def test_original_layout_cache_and_shared_layout(tmp_path):
    root = write_dataset(str(tmp_path / "d"))
    data = q2.load_sprites(root, download=False)
    cache = os.path.join(root, q2.CACHE_NAME)
    assert data["cache"] == cache and os.path.isfile(cache)
    for i in (0, 5, 11):
        np.testing.assert_array_equal(data["sprites"][i], character_frames(i))
    assert data["splits"]["train"].tolist() == [0, 1, 2, 3, 4, 5]  # 1-based in the file
    assert data["anim_offsets"].tolist() == [0] + np.cumsum(ANIM_LENGTHS).tolist()
    with np.load(cache) as npz:
        assert sorted(npz.files) == sorted(q2.CACHE_KEYS)
    shared = tmp_path / "shared"  # the cache beside original/sprites_splits.mat
    os.makedirs(shared / "original")
    shutil.copy(cache, shared / q2.CACHE_NAME)
    shutil.copy(os.path.join(root, "data", "sprites", q2.SPLIT_NAME), shared / "original")
    again = q2.load_sprites(str(shared), download=False)
    np.testing.assert_array_equal(again["sprites"], data["sprites"])


def test_bad_cache_is_one_sentence_naming_it(tmp_path):
    root = write_dataset(str(tmp_path / "c"))
    cache = os.path.join(root, q2.CACHE_NAME)
    good = q2.load_sprites(root, download=False)
    for bad in (dict(sprites=np.zeros((2, 3), dtype=np.uint8)),              # keys
                dict(good, sprites=good["sprites"][:, :5])):                 # shapes
        np.savez(cache, **{k: v for k, v in bad.items() if k in q2.CACHE_KEYS})
        with pytest.raises(UserError, match=f"cache .*{q2.CACHE_NAME} is truncated or not "
                                            f"uint8 sprites.*delete it"):
            q2.load_sprites(root, download=False)
    with open(cache, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match=f"{q2.CACHE_NAME} is truncated"):
        q2.load_sprites(root, download=False)
    os.remove(cache)  # deleted: rebuilt from the .mat files
    np.testing.assert_array_equal(q2.load_sprites(root, download=False)["sprites"],
                                  good["sprites"])


def test_split_file_is_checked(tmp_path):
    root = write_dataset(str(tmp_path / "s"))
    split = os.path.join(root, "data", "sprites", "sprites_splits.mat")
    for content, message in (
            ({"trainidx": [[1, 2, 3]], "validx": [[3, 4]], "testidx": [[5, 6]]}, "in two splits"),
            ({"trainidx": [[1, 2]], "validx": [[3]], "testidx": [[5, 6]]}, "fewer than two"),
            ({"trainidx": [[1, 2]], "validx": [[3, 4]], "testidx": [[40, 5]]},
             "28 of the 40 character files are missing"),
            ({"trainidx": [[1]]}, "is not the expected")):
        savemat(split, {k: np.array(v) for k, v in content.items()})
        with pytest.raises(UserError, match=message):
            q2.load_sprites(root, download=False)
    q2.load_sprites(write_dataset(str(tmp_path / "cached")), download=False)  # the cache, then
    for i in range(N_CHARACTERS):                                           # only the cache
        os.remove(os.path.join(tmp_path, "cached", "data", "sprites", f"sprites_{i}.mat"))
    savemat(os.path.join(tmp_path, "cached", "data", "sprites", "sprites_splits.mat"),
            {"trainidx": [[1, 2]], "validx": [[3, 4]], "testidx": [[40, 5]]})
    with pytest.raises(UserError, match="split file .* names character 40.*does not belong"):
        q2.load_sprites(str(tmp_path / "cached"), download=False)


def test_bad_mat_names_the_file(tmp_path):
    root = write_dataset(str(tmp_path / "bad"))
    bad = os.path.join(root, "data", "sprites", "sprites_4.mat")
    with open(bad, "wb") as f:
        f.write(b"not a mat file")
    with pytest.raises(UserError, match="sprites_4.mat is not a readable MATLAB v7.3 sprite"):
        q2.load_sprites(root, download=False)
    os.remove(bad)
    with pytest.raises(UserError, match="1 of the 12 character files are missing.*sprites_4"):
        q2.load_sprites(root, download=False)


# --- downloads, against a real HTTP server on 127.0.0.1 ---------------------------------
def reed_archive(folder):
    """nips2015-analogy-data.tar.gz in its true layout (data/sprites/...); returns its md5."""
    src = write_dataset(os.path.join(folder, "src"))
    archive = os.path.join(folder, q2.ARCHIVE)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(os.path.join(src, "data"), arcname="./data")
    shutil.rmtree(src)
    return md5(archive)


@pytest.mark.parametrize("first", ["404", "drop"])
def test_download_falls_back_to_the_next_source(http_server, monkeypatch, tmp_path, capsys,
                                                first):
    monkeypatch.setattr(q2, "ARCHIVE_MD5", reed_archive(http_server.root))
    monkeypatch.setattr(q2, "SPRITES_SOURCES", (http_server.url(q2.ARCHIVE, fail=first),
                                                http_server.url(q2.ARCHIVE)))
    data_dir = str(tmp_path / "data")
    code, _ = run(["--download-only", "--data-dir", data_dir, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert all(f"fetching {q2.ARCHIVE} from {url}" in printed for url in q2.SPRITES_SOURCES)
    data = q2.load_sprites(data_dir, download=False)
    np.testing.assert_array_equal(data["sprites"][7], character_frames(7))
    assert sorted(os.listdir(data_dir)) == sorted([q2.ARCHIVE, "data", q2.CACHE_NAME])


def test_every_source_down_names_them_all_and_leaves_nothing(http_server, monkeypatch,
                                                             tmp_path, capsys):
    sources = (http_server.url(q2.ARCHIVE, fail="404"), http_server.url(q2.ARCHIVE, fail="drop"))
    monkeypatch.setattr(q2, "SPRITES_SOURCES", sources)
    data_dir = str(tmp_path / "data")
    code, err = run(["--download-only", "--data-dir", data_dir, "--device", "cpu"], capsys)
    last = err.strip().splitlines()[-1]  # after the progress bars: one sentence
    assert code == 2 and last.startswith("error: ") and err.count("error: ") == 1
    assert all(url in last for url in sources) and "put Reed et al.'s data/sprites/" in last
    assert os.listdir(data_dir) == []


def test_archive_with_another_md5_is_refused(http_server, monkeypatch, tmp_path, capsys):
    reed_archive(http_server.root)
    monkeypatch.setattr(q2, "SPRITES_SOURCES", (http_server.url(q2.ARCHIVE),))
    data_dir = str(tmp_path / "data")
    with pytest.raises(UserError, match="could not be downloaded"):
        q2.load_sprites(data_dir)
    assert "checksum mismatch" in capsys.readouterr().err and os.listdir(data_dir) == []


# --- the method ----------------------------------------------------------------------
def test_pairs_share_identity_and_arbitrary_batches_vary():
    frames = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1, 1).expand(7, 5, 3, 60, 60)
    frames = frames.clone()
    frames[:, :, 1] = torch.arange(5, dtype=torch.uint8).view(1, 5, 1, 1)  # frame index
    x1, x2, xa, xb = q2.make_batch(frames, np.random.default_rng(0), 256, "cpu")
    assert x1.shape == (256, 3, 60, 60) and x1.dtype == torch.float32
    assert torch.equal(x1[:, 0], x2[:, 0])                 # same character in each pair
    assert not torch.equal(x1[:, 1], x2[:, 1])             # but not always the same frame
    assert not torch.equal(xa[:, 0], xb[:, 0])             # arbitrary images in the reverse cycle


def step_args(*argv):
    return q2.parse_args(q2.build_parser(), ["--precision", "fp32", *argv])


def test_reverse_cycle_updates_encoder_only_with_detached_s():
    torch.manual_seed(0)
    model = q2.CycleVAE(4, 3, 4)
    args = step_args("--reconstruction-coef", "0", "--kl-coef", "0")
    decoder_before = {k: v.clone() for k, v in model.decoder.named_parameters()}
    encoder_before = {k: v.clone() for k, v in model.encoder.named_parameters()}
    batch = [torch.rand(6, 3, 60, 60) for _ in range(4)]
    losses = q2.training_step(model, q2.make_optimizers(model, 1e-2), batch, args)
    assert losses["reverse_cycle"] > 0
    for k, v in model.decoder.named_parameters():
        assert torch.equal(v, decoder_before[k]), k
    assert not torch.equal(model.encoder.z_mu.weight, encoder_before["z_mu.weight"])
    assert torch.equal(model.encoder.s.weight, encoder_before["s.weight"])  # s detached
    model.zero_grad(set_to_none=True)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    q2.reverse_cycle_backward(model, batch[2], batch[3], 10.0)
    assert all(p.grad is None for p in model.decoder.parameters())
    for k, v in model.named_buffers():  # generated batches stay out of the BN statistics
        assert torch.equal(v, buffers[k]) or k.endswith("num_batches_tracked"), k


def test_warmup_zero_is_forward_cycle_only():
    torch.manual_seed(0)
    model = q2.CycleVAE(4, 3, 4)
    before = {k: v.clone() for k, v in model.named_parameters()}
    q2.training_step(model, q2.make_optimizers(model, 1e-2),
                     [torch.rand(4, 3, 60, 60) for _ in range(4)],
                     step_args("--reconstruction-coef", "0"), 0.0)
    for k, v in model.named_parameters():  # nothing but KL and reverse cycle to learn from
        assert torch.equal(v, before[k]), k


def test_forward_cycle_swaps_s():
    model = q2.CycleVAE(4, 3, 4)
    seen = []
    decode = model.decode
    model.decode = lambda z, s: seen.append(s) or decode(z, s)
    x1, x2 = torch.rand(2, 3, 60, 60), torch.rand(2, 3, 60, 60)
    q2.forward_cycle_losses(model, x1, x2)
    s1, s2 = model.encode(x1)[2], model.encode(x2)[2]
    assert torch.allclose(seen[0], s2) and torch.allclose(seen[1], s1)


def two_steps(precision, seed=0):
    torch.manual_seed(seed)
    model = q2.CycleVAE(4, 3, 8).to(memory_format=torch.channels_last)
    optimizers = q2.make_optimizers(model, 1e-3)
    frames = torch.randint(0, 256, (5, 6, 3, 60, 60), dtype=torch.uint8)
    rng, args = np.random.default_rng(seed), step_args("--precision", precision)
    losses = [q2.training_step(model, optimizers, q2.make_batch(frames, rng, 4, "cpu"), args)
              for _ in range(2)]
    return losses, model.state_dict()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_numbers(precision):
    first, weights = two_steps(precision)
    second, weights_again = two_steps(precision)
    assert first == second and all(torch.equal(weights[k], weights_again[k]) for k in weights)
    assert two_steps("bf16" if precision == "fp32" else "fp32")[0] != first  # really applied


def test_precision_auto_is_detected(monkeypatch):
    monkeypatch.setattr(q2, "native_bf16", lambda: True)
    assert q2.resolve_precision("auto", "cpu") == "bf16"
    assert q2.resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(q2, "native_bf16", lambda: False)
    assert q2.resolve_precision("auto", "cpu") == "fp32"


def test_partners_are_other_characters_or_one_sentence():
    identity = np.repeat(np.arange(3), 4)
    partner = q2.other_character_partners(identity, np.random.default_rng(0))
    assert (identity[partner] != identity).all()
    with pytest.raises(UserError, match="at least two characters"):
        q2.other_character_partners(np.zeros(5, dtype=int), np.random.default_rng(0))


def test_checks_follow_the_numbers(trained):
    results = json.load(open(os.path.join(trained, "metrics.json")))["results"]
    test = results["test"]
    test["reconstruction_mse"], test["classifiers"]["identity_from_z"]["test_accuracy"] = 0.002, 0.4
    held = {c["name"]: c["holds"] for c in q2.checks_of(results)}
    assert held["test: reconstruction MSE"] and not held["test: identity from z"]
    test["reconstruction_mse"], test["classifiers"]["identity_from_z"]["test_accuracy"] = 0.004, 0.1
    held = {c["name"]: c["holds"] for c in q2.checks_of(results)}
    assert not held["test: reconstruction MSE"] and held["test: identity from z"]
    assert len(held) == 2 * len(q2.CHECKS)


# --- whole runs ----------------------------------------------------------------------
def untrained_mse(sprites_dir):
    """The same network before training (batch-norm statistics of training pairs)."""
    args = q2.parse_args(q2.build_parser(), TINY + ["--data-dir", sprites_dir])
    data = q2.load_data(args, {})
    torch.manual_seed(args.seed)
    model = q2.build_model(q2.model_hparams(args))
    q2.recalibrate_batch_norm(model, data["frames"][data["splits"]["train"]],
                              np.random.default_rng(0), "cpu")
    x = data["frames"][data["splits"]["test"]].reshape(-1, 3, 60, 60)
    z, s = q2.encode_frames(model, x, "cpu")
    return float(torch.nn.functional.mse_loss(q2.decode_latents(model, z, s, "cpu"),
                                              q2.to_images(x)))


def test_end_to_end_writes_every_output_and_learns(trained, sprites_dir):
    names = ["cyclevae.pt", "training_state.pt", "metrics.json", "report.md",
             "training_curves.png", "reconstructions.png", "interpolation.png",
             "prediction_networks.png", "swap_grid_1.png", "swap_grid_2.png"]
    for name in names:
        assert os.path.getsize(os.path.join(trained, name)) > 0, name
    metrics = common.read_metrics(os.path.join(trained, "metrics.json"), q2.SCRIPT)
    results = metrics["results"]
    assert results["test"]["characters"] == 4 and results["validation"]["characters"] == 2
    assert 0.5 < results["test"]["classifiers"]["identity_twin_ceiling"] < 1  # twins
    assert results["test"]["reconstruction_mse"] < 0.75 * untrained_mse(sprites_dir)
    assert metrics["training"]["steps"] == 8 and metrics["settings"]["precision"] == "fp32"
    assert set(metrics["timings"]) == {"data", "training", "evaluation", "figures", "total"}
    assert "/" not in metrics["data"]["cache"].replace("DATA_DIR/", "")
    report = open(os.path.join(trained, "report.md")).read()
    for name in names[4:]:
        assert f"({name})" in report, name


def test_validation_only_never_reads_test_characters(sprites_dir, tmp_path, monkeypatch):
    seen = []
    real = q2.evaluate
    monkeypatch.setattr(q2, "evaluate", lambda m, d, split, *a: seen.append(split) or
                        real(m, d, split, *a))
    out = str(tmp_path / "v")
    q2.main(TINY + ["--data-dir", sprites_dir, "--out", out, "--validation-only"])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert seen == ["val"] and list(metrics["results"]) == ["validation"]
    assert not os.path.exists(os.path.join(out, "swap_grid_1.png"))


def test_resume_is_bit_identical_to_an_uninterrupted_run(sprites_dir, tmp_path, monkeypatch,
                                                          capsys):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    longer = TINY[:8] + ["--epochs", "1"] + TINY[10:]
    q2.main(longer + ["--data-dir", sprites_dir, "--out", whole])
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, q2, "training_step", 20)  # the state of step 17 is saved
        code, err = run(longer + ["--data-dir", sprites_dir, "--out", parts], capsys)
    assert code == 130 and err.strip() == (f"interrupted: step 17 is saved in {parts}/"
                                           f"training_state.pt; continue with the same command "
                                           f"and --resume")
    q2.main(["--resume", "--data-dir", sprites_dir, "--out", parts, "--device", "cpu"])
    a = common.load_checkpoint(os.path.join(whole, "cyclevae.pt"), q2.KIND)
    b = common.load_checkpoint(os.path.join(parts, "cyclevae.pt"), q2.KIND)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"] == b["history"]
    first, second = (json.load(open(os.path.join(d, "metrics.json"))) for d in (whole, parts))
    assert first["results"] == second["results"] and first["checks"] == second["checks"]
    code, err = run(["--resume", "--data-dir", sprites_dir, "--out", parts], capsys)
    assert code == 2 and "is finished" in err


def test_resume_refuses_what_it_cannot_do(sprites_dir, tmp_path, capsys):
    code, err = run(TINY + ["--data-dir", sprites_dir, "--out", str(tmp_path), "--resume"],
                    capsys)
    assert code == 2 and "training_state.pt" in err


def test_interrupt_before_any_save_says_so(sprites_dir, tmp_path, monkeypatch, capsys):
    interrupt_on_call(monkeypatch, q2, "training_step", 2)
    code, err = run(TINY + ["--data-dir", sprites_dir, "--out", str(tmp_path)], capsys)
    assert code == 130 and err.strip() == "interrupted: nothing was saved"


def test_nan_loss_and_too_few_steps_stop_with_one_sentence(sprites_dir, tmp_path, monkeypatch,
                                                            capsys):
    code, err = run(TINY[:8] + ["--epochs", "1e-7"] + TINY[10:]
                    + ["--data-dir", sprites_dir, "--out", str(tmp_path)], capsys)
    assert code == 2 and "--epochs 1e-07 is less than one step" in err
    assert not os.path.exists(os.path.join(tmp_path, "training_state.pt"))
    real = q2.forward_cycle_losses
    monkeypatch.setattr(q2, "forward_cycle_losses",
                        lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    code, err = run(TINY + ["--data-dir", sprites_dir, "--out", str(tmp_path)], capsys)
    assert code == 2 and "reconstruction loss became nan" in err and "nothing was saved" in err


def test_bad_out_is_refused_before_the_data_is_read(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    code, err = run(TINY + ["--data-dir", str(tmp_path / "nothing"), "--out",
                            str(not_a_folder)], capsys)
    assert code == 2 and "--out" in err and "sprites" not in err


def test_eval_only_reproduces_and_writes_only_under_eval(trained, sprites_dir, tmp_path,
                                                         capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(trained, out)
    before = {name: md5(os.path.join(out, name)) for name in os.listdir(out)}
    q2.main(["--eval-only", "--data-dir", sprites_dir, "--out", out, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert {name: md5(os.path.join(out, name)) for name in before} == before
    assert sorted(os.listdir(out)) == sorted(list(before) + ["eval"])
    rows = json.load(open(os.path.join(out, "eval", "comparison.json")))["rows"]
    assert len(rows) > 50 and "results.test.reconstruction_mse" in printed
    assert all(row["reproduced"] for row in rows), [r for r in rows if not r["reproduced"]]


def test_eval_only_without_or_with_foreign_metrics_is_one_sentence_before_work(
        trained, sprites_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copy(os.path.join(trained, "cyclevae.pt"), out)
    argv = ["--eval-only", "--data-dir", str(tmp_path / "no-data"), "--out", str(out)]
    code, err = run(argv, capsys)
    assert code == 2 and "metrics.json does not exist" in err
    common.write_json(str(out / "metrics.json"), {"script": "q1_vae.py"})
    code, err = run(argv, capsys)
    assert code == 2 and "was written by q1_vae.py, not q2_cyclevae.py" in err


# --- the report, weights and arguments ------------------------------------------------
COMMITTED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "outputs", "q2")


def test_report_only_reproduces_the_committed_report(tmp_path):
    out = str(tmp_path / "q2")
    shutil.copytree(COMMITTED, out, ignore=shutil.ignore_patterns("*.pt", "*.png", "eval"))
    os.remove(os.path.join(out, "report.md"))
    q2.main(["--report-only", "--out", out])
    assert open(os.path.join(out, "report.md")).read() == \
        open(os.path.join(COMMITTED, "report.md")).read()
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    metrics["results"]["test"]["reconstruction_mse"] = 0.123456
    common.write_json(os.path.join(out, "metrics.json"), metrics)
    run_metrics = json.load(open(os.path.join(out, "runs", "gpu_6epochs", "metrics.json")))
    run_metrics["results"]["test"] = metrics["results"]["test"]
    common.write_json(os.path.join(out, "runs", "gpu_6epochs", "metrics.json"), run_metrics)
    q2.main(["--report-only", "--out", out])
    report = open(os.path.join(out, "report.md")).read()
    assert "| 0.1235 |" in report and "`6epochs_s16`, `gpu_6epochs`." in report


def test_report_only_with_foreign_metrics_is_one_sentence(tmp_path, capsys):
    out = tmp_path / "q2"
    shutil.copytree(COMMITTED, out, ignore=shutil.ignore_patterns("*.pt", "*.png", "eval"))
    (out / "runs" / "x").mkdir()
    common.write_json(str(out / "runs" / "x" / "metrics.json"), {"script": "q3_toy_dann.py"})
    code, err = run(["--report-only", "--out", str(out)], capsys)
    assert code == 2 and "runs/x/metrics.json was written by q3_toy_dann.py" in err
    common.write_json(str(out / "metrics.json"), {"script": "q1_vae.py"})
    code, err = run(["--report-only", "--out", str(out)], capsys)
    assert code == 2 and "was written by q1_vae.py, not q2_cyclevae.py" in err


def test_load_model(trained):
    model = q2.load_model(os.path.join(trained, "cyclevae.pt"))
    assert not model.training
    assert not q2.load_model(os.path.join(COMMITTED, "cyclevae.pt")).training  # older hparams
    with torch.no_grad():
        z_mu, z_logvar, s = model.encode(torch.rand(5, 3, 60, 60))
        y = model.decode(z_mu, s)
    assert z_mu.shape == (5, 4) and z_logvar.shape == (5, 4) and s.shape == (5, 3)
    assert y.shape == (5, 3, 60, 60) and 0 <= float(y.min()) and float(y.max()) <= 1


def test_tolerances_only_for_refits_and_a_difference_beyond_them_fails(tmp_path):
    committed = common.read_metrics(os.path.join(COMMITTED, "metrics.json"), q2.SCRIPT)
    names = set(common.comparable(committed))
    loose = {n for n in names if any(n.startswith(p) for p in q2.TOLERANCES)}
    assert all(any(n.startswith(p) for n in names) for p in q2.TOLERANCES)  # no stale prefix
    for name in ("reconstruction_mse", "classifiers.identity_twin_ceiling",
                 "classifiers.identity_chance", "held_out_frames"):  # the model's and the data's
        assert f"results.test.{name}" not in loose and f"results.validation.{name}" not in loose
    assert all(0 < tol <= 0.01 and "refit" in why and "by up to" in why
               for tol, why in q2.TOLERANCES.values())
    recomputed = json.loads(json.dumps(committed))
    accuracy = recomputed["results"]["test"]["classifiers"]["pose_from_z"]
    accuracy["test_accuracy"] += 0.004  # within the tolerance of a refit
    recomputed["results"]["test"]["reconstruction_mse"] += 1e-6  # the model's own: exact
    rows = {r["name"]: r["reproduced"]
            for r in common.compare_with_committed(recomputed, committed, str(tmp_path),
                                                   q2.TOLERANCES)}
    assert rows["results.test.classifiers.pose_from_z.test_accuracy"]
    assert not rows["results.test.reconstruction_mse"]
    accuracy["test_accuracy"] += 0.02
    rows = {r["name"]: r["reproduced"]
            for r in common.compare_with_committed(recomputed, committed, str(tmp_path),
                                                   q2.TOLERANCES)}
    assert not rows["results.test.classifiers.pose_from_z.test_accuracy"]


def test_wrong_weights(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="junk.pt"):
        q2.load_model(str(junk))
    other = str(tmp_path / "other.pt")
    common.save_checkpoint(other, "q1-vae", {"z_dim": 2}, torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="q1-vae"):
        q2.load_model(other)
    mismatch = str(tmp_path / "mismatch.pt")
    common.save_checkpoint(mismatch, q2.KIND, {"z_dim": 4, "s_dim": 3, "width": 8},
                           q2.CycleVAE(4, 3, 4))
    with pytest.raises(UserError, match="does not fit"):
        q2.load_model(mismatch)


@pytest.mark.parametrize("argv", [["--z-dim", "0"], ["--s-dim", "-3"], ["--kl-coef", "-1"],
                                  ["--lr", "0"], ["--seed", "-1"], ["--precision", "fp16"],
                                  ["--batch-size", "x"], ["--predictor-characters", "-1"],
                                  ["--reverse-update", "joint"], ["--resume", "--eval-only"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as exit_info:
        q2.parse_args(q2.build_parser(), argv)
    assert exit_info.value.code == 2


def test_paper_scale_and_given_flags_win():
    paper = q2.parse_args(q2.build_parser(), ["--paper-scale"])
    assert (paper.z_dim, paper.s_dim, paper.kl_coef, paper.epochs) == (512, 64, 3.0, 100.0)
    shorter = q2.parse_args(q2.build_parser(), ["--epochs", "3", "--paper-scale"])
    assert (shorter.z_dim, shorter.width, shorter.epochs) == (512, 64, 3.0)
