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


TINY = ["--z-dim", "4", "--s-dim", "3", "--width", "4", "--batch-size", "4", "--epochs", "2",
        "--epoch-steps", "3", "--lr", "3e-2", "--lr-drop-epoch", "1", "--val-pairs", "8",
        "--val-every", "1", "--classifier-epochs", "2", "--predictor-epochs", "1", "--grids", "2",
        "--interpolation-steps", "4", "--interpolation-pairs", "10", "--no-download",
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


def interrupt_at(monkeypatch, call):
    """Ctrl-C at the `call`-th training step."""
    interrupt_on_call(monkeypatch, q2, "training_step", call)


def test_v73_reader_fortran_layout(tmp_path):
    frames = character_frames(3)
    path = str(tmp_path / "sprites_3.mat")
    write_v73(path, frames, [1, 2, 3, 4, 5, 6, 7])
    with open(path, "rb") as f:
        assert f.read(10) == b"MATLAB 7.3"
    got, masks, labels, lengths = q2.read_character_mat(path)
    assert got.shape == (N_FRAMES, 60, 60, 3) and got.dtype == np.uint8
    assert got[4, 1, 2, 0] == 7 and got[4, 2, 1, 0] != 7  # row 1, column 2, red channel
    np.testing.assert_array_equal(got, frames)
    assert masks.shape == (N_FRAMES, 60, 60) and masks[0, 15, 10] == 255 and masks[0, 15, 52] == 0
    assert labels.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert lengths.tolist() == ANIM_LENGTHS


def test_original_layout_and_cache_round_trip(tmp_path):
    root = write_dataset(str(tmp_path / "d"))
    data = q2.load_sprites(root, download=False)
    cache = os.path.join(root, q2.CACHE_NAME)
    assert data["cache"] == cache and os.path.isfile(cache)
    assert data["sprites"].shape == (N_CHARACTERS, N_FRAMES, 60, 60, 3)
    for i in (0, 5, 11):
        np.testing.assert_array_equal(data["sprites"][i], character_frames(i))
    assert data["splits"]["train"].tolist() == [0, 1, 2, 3, 4, 5]  # 1-based in the file
    assert data["splits"]["test"].tolist() == [8, 9, 10, 11]
    assert data["anim_offsets"].tolist() == [0] + np.cumsum(ANIM_LENGTHS).tolist()
    with np.load(cache) as npz:
        assert sorted(npz.files) == sorted(q2.CACHE_KEYS)
        assert npz["masks"].shape == (N_CHARACTERS, N_FRAMES, 60, 60)
    for i in range(N_CHARACTERS):  # the cache alone is enough now, under either name
        os.remove(os.path.join(root, "data", "sprites", f"sprites_{i}.mat"))
    os.replace(cache, os.path.join(root, q2.SHARED_CACHE_NAME))
    again = q2.load_sprites(root, download=False)
    np.testing.assert_array_equal(again["sprites"], data["sprites"])
    np.testing.assert_array_equal(again["labels"], data["labels"])


def test_read_only_data_dir_caches_elsewhere(tmp_path, monkeypatch):
    root = write_dataset(str(tmp_path / "ro"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "usercache"))
    real_write = common.atomic_write

    def refuse_data_dir(path, write):
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(root):
            raise PermissionError("read-only")
        return real_write(path, write)

    monkeypatch.setattr(common, "atomic_write", refuse_data_dir)
    data = q2.load_sprites(root, download=False)
    assert data["cache"] == q2.fallback_cache_path(root)
    assert not os.path.exists(os.path.join(root, q2.CACHE_NAME))
    for i in range(N_CHARACTERS):  # the next run finds the user cache
        os.remove(os.path.join(root, "data", "sprites", f"sprites_{i}.mat"))
    assert q2.load_sprites(root, download=False)["cache"] == data["cache"]


def test_cache_with_wrong_content_is_rebuilt_or_named(tmp_path, capsys):
    root = write_dataset(str(tmp_path / "c"))
    cache = os.path.join(root, q2.CACHE_NAME)
    good = q2.load_sprites(root, download=False)
    for bad in (dict(sprites=np.zeros((2, 3), dtype=np.uint8)),              # keys
                dict(good, sprites=good["sprites"][:, :5], masks=np.zeros(1))):  # shapes
        np.savez(cache, **{k: v for k, v in bad.items() if k in q2.CACHE_KEYS})
        again = q2.load_sprites(root, download=False)  # .mat files there: rebuilt
        np.testing.assert_array_equal(again["sprites"], good["sprites"])
        assert "rebuilding it" in capsys.readouterr().out
    for i in range(N_CHARACTERS):
        os.remove(os.path.join(root, "data", "sprites", f"sprites_{i}.mat"))
    np.savez(cache, sprites=np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(UserError, match=f"{q2.CACHE_NAME} lacks the arrays .*delete it"):
        q2.load_sprites(root, download=False)
    with open(cache, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match=f"{q2.CACHE_NAME} is truncated or corrupt"):
        q2.load_sprites(root, download=False)


def test_split_file_is_checked(tmp_path):
    root = write_dataset(str(tmp_path / "s"))
    split = os.path.join(root, "data", "sprites", "sprites_splits.mat")
    savemat(split, {"trainidx": np.array([[1, 2, 3]]), "validx": np.array([[3, 4]]),
                    "testidx": np.array([[5]])})
    with pytest.raises(UserError, match="sprites_splits.mat names a character in two splits"):
        q2.load_sprites(root, download=False)
    savemat(split, {"trainidx": np.array([[1, 2]]), "validx": np.array([[3]]),
                    "testidx": np.array([[40]])})
    with pytest.raises(UserError, match="28 of the 40 character files are missing"):
        q2.load_sprites(root, download=False)
    savemat(split, {"trainidx": np.array([[1]])})
    with pytest.raises(UserError, match="sprites_splits.mat is not the expected"):
        q2.load_sprites(root, download=False)


def test_bad_mat_names_the_file(tmp_path):
    root = write_dataset(str(tmp_path / "bad"))
    bad = os.path.join(root, "data", "sprites", "sprites_4.mat")
    with open(bad, "wb") as f:
        f.write(b"not a mat file")
    with pytest.raises(UserError, match="sprites_4.mat"):
        q2.load_sprites(root, download=False)
    with h5py.File(bad, "w") as f:  # HDF5, but not the sprite layout
        f.create_dataset("labels", data=np.zeros((7, 1)))
    with pytest.raises(UserError, match="sprites_4.mat is not a readable MATLAB v7.3 sprite"):
        q2.load_sprites(root, download=False)
    os.remove(bad)
    with pytest.raises(UserError, match="1 of the 12 character files are missing.*sprites_4"):
        q2.load_sprites(root, download=False)


# --- downloads, against a real HTTP server on 127.0.0.1 ---------------------------------
def reed_archive(folder, change=None):
    """nips2015-analogy-data.tar.gz in its true layout (data/sprites/...), optionally with
    one file's bytes changed after the md5 sums were taken. Sets nothing; returns the md5
    of the archive and of the known files."""
    src = write_dataset(os.path.join(folder, "src"))
    known = {name: q2.file_md5(os.path.join(src, "data", "sprites", name))
             for name in ("sprites_splits.mat", "sprites_0.mat", "sprites_1.mat")}
    if change:
        with open(os.path.join(src, "data", "sprites", change), "ab") as f:
            f.write(b"changed")
    archive = os.path.join(folder, q2.ARCHIVE)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(os.path.join(src, "data"), arcname="./data")
    shutil.rmtree(src)
    return q2.file_md5(archive), known


@pytest.fixture
def reed_server(http_server, monkeypatch):
    archive_md5, known = reed_archive(http_server.root)
    monkeypatch.setattr(q2, "ARCHIVE_MD5", archive_md5)
    monkeypatch.setattr(q2, "KNOWN_MD5", known)
    return http_server


@pytest.mark.parametrize("first", ["404", "drop"])
def test_download_falls_back_to_the_next_source(reed_server, monkeypatch, tmp_path, capsys,
                                                first):
    monkeypatch.setattr(q2, "SPRITES_SOURCES", (reed_server.url(q2.ARCHIVE, fail=first),
                                                reed_server.url(q2.ARCHIVE)))
    data_dir = str(tmp_path / "data")
    code, _ = run(["--download-only", "--data-dir", data_dir, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"fetching {q2.ARCHIVE} from {q2.SPRITES_SOURCES[0]}" in printed
    assert f"fetching {q2.ARCHIVE} from {q2.SPRITES_SOURCES[1]}" in printed
    data = q2.load_sprites(data_dir, download=False)
    np.testing.assert_array_equal(data["sprites"][7], character_frames(7))
    assert sorted(os.listdir(data_dir)) == sorted([q2.ARCHIVE, "data", q2.CACHE_NAME])


def test_every_source_down_names_them_all_and_leaves_nothing(reed_server, monkeypatch,
                                                             tmp_path, capsys):
    sources = (reed_server.url(q2.ARCHIVE, fail="404"), reed_server.url(q2.ARCHIVE, fail="drop"))
    monkeypatch.setattr(q2, "SPRITES_SOURCES", sources)
    data_dir = str(tmp_path / "data")
    code, err = run(["--download-only", "--data-dir", data_dir, "--device", "cpu"], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]  # after the progress bars: one sentence
    assert last.startswith("error: ") and err.count("error: ") == 1
    assert all(url in last for url in sources) and "put Reed et al.'s data/sprites/" in last
    assert os.listdir(data_dir) == []


def test_archive_with_a_changed_file_is_refused(http_server, monkeypatch, tmp_path):
    archive_md5, known = reed_archive(http_server.root, change="sprites_0.mat")
    monkeypatch.setattr(q2, "ARCHIVE_MD5", archive_md5)
    monkeypatch.setattr(q2, "KNOWN_MD5", known)
    monkeypatch.setattr(q2, "SPRITES_SOURCES", (http_server.url(q2.ARCHIVE),))
    data_dir = str(tmp_path / "data")
    with pytest.raises(UserError, match="failed its checksum \\(sprites_0.mat\\)"):
        q2.load_sprites(data_dir)
    assert os.listdir(data_dir) == []


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
    assert float(x1.max()) <= 6 / 255 + 1e-6


def step_args(*argv):
    return q2.parse_args(q2.build_parser(), ["--precision", "fp32", *argv])


@pytest.mark.parametrize("update", ["separate", "joint"])
def test_reverse_cycle_updates_encoder_only_with_detached_s(update):
    torch.manual_seed(0)
    model = q2.CycleVAE(4, 3, 4)
    args = step_args("--reconstruction-coef", "0", "--kl-coef", "0", "--reverse-update", update)
    optimizers = q2.make_optimizers(model, 1e-2)
    decoder_before = {k: v.clone() for k, v in model.decoder.named_parameters()}
    encoder_before = {k: v.clone() for k, v in model.encoder.named_parameters()}
    batch = [torch.rand(6, 3, 60, 60) for _ in range(4)]
    losses = q2.training_step(model, optimizers, batch, args)
    assert losses["reverse_cycle"] > 0
    for k, v in model.decoder.named_parameters():
        assert torch.equal(v, decoder_before[k]), k
    assert not torch.equal(model.encoder.z_mu.weight, encoder_before["z_mu.weight"])
    # s reaches the reverse cycle only detached: the s head gets no gradient from it
    assert torch.equal(model.encoder.s.weight, encoder_before["s.weight"])
    model.zero_grad(set_to_none=True)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    q2.reverse_cycle_backward(model, batch[2], batch[3], 10.0)
    assert all(p.grad is None for p in model.decoder.parameters())
    for k, v in model.named_buffers():  # generated batches stay out of the BN statistics
        assert torch.equal(v, buffers[k]) or k.endswith("num_batches_tracked"), k
    assert model.encoder.z_mu.weight.grad is not None


def test_reverse_weight_matters_only_in_a_joint_step():
    def encoder_after_steps(update, coef):
        torch.manual_seed(0)
        model = q2.CycleVAE(4, 3, 4)
        args = step_args("--reverse-update", update)
        args.reverse_cycle_coef = coef  # parse_args refuses 30 with separate updates
        batch = [torch.rand(6, 3, 60, 60) for _ in range(4)]
        optimizers = q2.make_optimizers(model, 1e-3)
        for step in range(3):
            torch.manual_seed(step)  # the same z noise for both weights
            q2.training_step(model, optimizers, batch, args)
        return model.encoder.z_mu.weight.detach()

    separate = encoder_after_steps("separate", 10), encoder_after_steps("separate", 30)
    joint = encoder_after_steps("joint", 10), encoder_after_steps("joint", 30)
    assert torch.allclose(*separate, rtol=0, atol=1e-6)
    assert not torch.allclose(*joint, rtol=0, atol=1e-4)
    assert q2.parse_args(q2.build_parser(), ["--reverse-cycle-coef", "0"]).reverse_cycle_coef == 0
    assert q2.parse_args(q2.build_parser(), ["--reverse-cycle-coef", "30", "--reverse-update",
                                             "joint"]).reverse_cycle_coef == 30


def test_warmup_zero_is_forward_cycle_only():
    torch.manual_seed(0)
    model = q2.CycleVAE(4, 3, 4)
    args = step_args("--reconstruction-coef", "0")
    before = {k: v.clone() for k, v in model.named_parameters()}
    q2.training_step(model, q2.make_optimizers(model, 1e-2),
                     [torch.rand(4, 3, 60, 60) for _ in range(4)], args, 0.0)
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
    rng = np.random.default_rng(seed)
    args = q2.parse_args(q2.build_parser(), ["--precision", precision])
    losses = [q2.training_step(model, optimizers, q2.make_batch(frames, rng, 4, "cpu"), args)
              for _ in range(2)]
    return losses, model.state_dict()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_numbers(precision):
    first, weights = two_steps(precision)
    second, weights_again = two_steps(precision)
    assert first == second
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
    other, _ = two_steps("bf16" if precision == "fp32" else "fp32")
    assert other != first  # the precision is really applied


def test_precision_auto_is_detected(monkeypatch):
    monkeypatch.setattr(q2, "native_bf16", lambda: True)
    assert q2.resolve_precision("auto", "cpu") == "bf16"
    assert q2.resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(q2, "native_bf16", lambda: False)
    assert q2.resolve_precision("auto", "cpu") == "fp32"
    assert q2.resolve_precision("bf16", "cpu") == "bf16"


# --- whole runs ----------------------------------------------------------------------
def untrained_reconstruction_mse(sprites_dir, split):
    """The same network before training (batch-norm statistics of training pairs), on the
    frames of the same characters."""
    args = q2.parse_args(q2.build_parser(), TINY + ["--data-dir", sprites_dir])
    data = q2.load_data(args, {})
    torch.manual_seed(args.seed)
    model = q2.build_model(q2.model_hparams(args))
    q2.recalibrate_batch_norm(model, data["frames"][data["splits"]["train"]],
                              np.random.default_rng(0), "cpu")
    x = data["frames"][data["splits"][split]].reshape(-1, 3, 60, 60)
    z, s = q2.encode_frames(model, x, "cpu")
    return float(torch.nn.functional.mse_loss(q2.decode_latents(model, z, s, "cpu"),
                                              q2.to_images(x)))


def test_end_to_end_writes_every_output_and_beats_untrained(trained, sprites_dir):
    names = ["cyclevae.pt", "training_state.pt", "metrics.json", "report.md",
             "training_curves.png", "reconstructions.png", "interpolation.png",
             "prediction_networks.png", "swap_grid_1.png", "swap_grid_2.png"]
    for name in names:
        assert os.path.getsize(os.path.join(trained, name)) > 0, name
    metrics = json.load(open(os.path.join(trained, "metrics.json")))
    assert metrics["test"]["characters"] == 4 and metrics["validation"]["characters"] == 2
    assert 0.5 < metrics["test"]["classifiers"]["identity_twin_ceiling"] < 1  # twins
    assert metrics["test"]["reconstruction_mse"] < 0.75 * untrained_reconstruction_mse(
        sprites_dir, "test")
    assert metrics["training"]["steps"] == 6 and metrics["training"]["precision"] == "fp32"
    assert metrics["timings"]["total_seconds"] > metrics["training"]["train_seconds"] > 0
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
    assert seen == ["val"] and "test" not in metrics and "validation" in metrics
    assert not os.path.exists(os.path.join(out, "swap_grid_1.png"))


def comparable(metrics):
    """A run's numbers without its timings and command."""
    return {k: v for k, v in metrics.items()
            if k in ("validation", "test", "swap_grids", "data")}


def test_resume_is_bit_identical_to_an_uninterrupted_run(sprites_dir, tmp_path, monkeypatch,
                                                          capsys):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    q2.main(TINY + ["--data-dir", sprites_dir, "--out", whole])
    with monkeypatch.context() as patch:
        interrupt_at(patch, 5)  # during the second epoch: the state of step 3 is saved
        code, err = run(TINY + ["--data-dir", sprites_dir, "--out", parts], capsys)
    assert code == 130 and err.strip() == (f"interrupted: step 3 is saved in {parts}/"
                                           f"training_state.pt; continue with the same command "
                                           f"and --resume")
    q2.main(["--resume", "--data-dir", sprites_dir, "--out", parts, "--device", "cpu"])
    a = common.load_checkpoint(os.path.join(whole, "cyclevae.pt"), q2.KIND)
    b = common.load_checkpoint(os.path.join(parts, "cyclevae.pt"), q2.KIND)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"] == b["history"]
    first = json.load(open(os.path.join(whole, "metrics.json")))
    second = json.load(open(os.path.join(parts, "metrics.json")))
    assert comparable(first) == comparable(second)


def test_resume_refuses_what_it_cannot_do(sprites_dir, tmp_path, trained, capsys):
    code, err = run(TINY + ["--data-dir", sprites_dir, "--out", str(tmp_path), "--resume"],
                    capsys)
    assert code == 2 and "training_state.pt" in err
    code, err = run(TINY[:-2] + ["--lr", "0.1", "--data-dir", sprites_dir, "--out", trained,
                                 "--resume"], capsys)
    assert code == 2 and "--lr" in err and "0.1" in err


def test_interrupt_before_any_save_says_so(sprites_dir, tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, 2)
    code, err = run(TINY + ["--data-dir", sprites_dir, "--out", str(tmp_path)], capsys)
    assert code == 130 and err.strip() == "interrupted: nothing was saved"


def test_nan_loss_stops_with_a_true_message(sprites_dir, tmp_path, monkeypatch, capsys):
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
    before = {name: q2.file_md5(os.path.join(out, name)) for name in os.listdir(out)}
    q2.main(["--eval-only", "--data-dir", sprites_dir, "--out", out, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert {name: q2.file_md5(os.path.join(out, name)) for name in before} == before
    assert sorted(os.listdir(out)) == sorted(list(before) + ["eval"])
    rows = json.load(open(os.path.join(out, "eval", "comparison.json")))["rows"]
    assert len(rows) > 50 and "test.reconstruction_mse" in printed and "reproduced" in printed
    assert all(row["reproduced"] for row in rows), [r for r in rows if not r["reproduced"]]
    assert os.path.isfile(os.path.join(out, "eval", "swap_grid_1.png"))


# --- the report ----------------------------------------------------------------------
COMMITTED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "outputs", "q2")


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMMITTED, "metrics.json")),
                    reason="no committed run")
def test_report_only_reproduces_the_committed_report(tmp_path):
    out = str(tmp_path / "q2")
    shutil.copytree(COMMITTED, out, ignore=shutil.ignore_patterns("*.pt", "*.png"))
    os.remove(os.path.join(out, "report.md"))
    q2.main(["--report-only", "--out", out])
    assert open(os.path.join(out, "report.md")).read() == \
        open(os.path.join(COMMITTED, "report.md")).read()
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    metrics["test"]["reconstruction_mse"] = 0.123456
    common.write_json(os.path.join(out, "metrics.json"), metrics)
    q2.main(["--report-only", "--out", out])
    assert "| 0.1235 |" in open(os.path.join(out, "report.md")).read()


def judged(trained, tmp_path, change):
    """The report rendered from the trained run's metrics after `change(metrics)`."""
    metrics = json.load(open(os.path.join(trained, "metrics.json")))
    change(metrics)
    return q2.render_report(metrics, str(tmp_path))


def set_accuracies(id_s, id_z, pose_z, pose_s, ceiling=1.0):
    def change(metrics):
        c = metrics["test"]["classifiers"]
        for key, value in (("identity_from_s", id_s), ("identity_from_z", id_z),
                           ("pose_from_z", pose_z), ("pose_from_s", pose_s)):
            c[key]["test_accuracy"] = value
        c["identity_twin_ceiling"] = ceiling
    return change


def test_every_judgement_follows_the_numbers(trained, tmp_path):
    good = judged(trained, tmp_path, set_accuracies(0.95, 0.05, 0.9, 0.1))
    assert "s holds the identity." in good and "z carries little identity." in good
    assert "the pose lives in z and hardly in s" in good
    bad = judged(trained, tmp_path, set_accuracies(0.5, 0.4, 0.9, 0.6))
    assert "s misses part of the identity" in bad and "z still carries identity" in bad
    assert "z holds the pose, but a classifier also reads it from s" in bad
    worse = judged(trained, tmp_path, set_accuracies(0.95, 0.05, 0.2, 0.1))
    assert "z does not hold the pose well" in worse and "reads it from s" not in worse


def test_sharpness_and_prediction_judgements_follow_the_numbers(trained, tmp_path):
    def sharp(metrics, value, mse):
        t = metrics["test"]
        t["reconstruction_mse"] = mse
        for kind in ("reconstructions", "swaps"):
            t["recognised"][kind].update(identity=value, pose=value)
        t["targets"] = q2.targets(t)
        p = t["prediction_networks"]
        p["identity_recognised_decode_z_predicted_s"] = p["pose_recognised_decode_predicted_z_s"] \
            = 1 - value
    good = judged(trained, tmp_path, lambda m: sharp(m, 0.95, 0.002))
    assert "the run meets every sharpness target" in good
    assert "z holds little of the identity" in good and "s holds little of the pose" in good
    bad = judged(trained, tmp_path, lambda m: sharp(m, 0.5, 0.004))
    assert "misses these sharpness targets: reconstruction MSE <= 0.0030, identity of" in bad
    assert "z holds identity that a network can read" in bad
    assert "s holds pose that a network can read" in bad


def test_runs_table_and_its_verdict(trained, tmp_path):
    out = str(tmp_path / "q2")
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("*.pt", "*.png"))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    metrics["validation"]["targets"] = {k: False for k in q2.PARTITION_TARGETS}
    assert "No validation runs are stored" in q2.render_report(metrics, out)
    for name, mse, met in (("a_wide", 0.002, True), ("b_small", 0.001, False)):
        run_metrics = json.loads(json.dumps(metrics))
        run_metrics["settings"]["width"] = 32 if name == "a_wide" else 4
        run_metrics["validation"]["reconstruction_mse"] = mse
        run_metrics["validation"]["targets"] = {k: met for k in q2.PARTITION_TARGETS}
        common.write_json(os.path.join(out, "runs", name, "metrics.json"), run_metrics)
    report = q2.render_report(metrics, out)
    machine = metrics["machine"].split(",")[0]
    minutes = f"{metrics['training']['train_seconds'] / 60:.1f}"
    assert f"| a_wide | --width 32 | {machine} | {minutes} |" in report
    assert f"| b_small | none | {machine} | {minutes} |" in report
    elsewhere = json.loads(json.dumps(run_metrics))
    elsewhere["machine"] = "GPU: a test card, PyTorch 0"
    common.write_json(os.path.join(out, "runs", "c_gpu", "metrics.json"), elsewhere)
    assert "| c_gpu | none | GPU: a test card | - |" in q2.render_report(metrics, out)
    shutil.rmtree(os.path.join(out, "runs", "c_gpu"))
    swaps = q2.pct(metrics["validation"]["recognised"]["swaps"]["identity"])
    assert f"`a_wide` has its swaps' identity recognised most often ({swaps})" in report
    passing = json.loads(json.dumps(metrics))
    passing["validation"]["targets"] = {k: True for k in q2.PARTITION_TARGETS}
    assert "this run included), this run has its swaps'" in q2.render_report(passing, out)
    # a better run that trained past the budget is named, but not chosen
    long_run = json.loads(json.dumps(passing))
    long_run["training"]["train_seconds"] = 60 * (q2.TRAINING_BUDGET_MIN + 5)
    long_run["validation"]["recognised"]["swaps"]["identity"] = 0.999
    common.write_json(os.path.join(out, "runs", "d_long", "metrics.json"), long_run)
    report = q2.render_report(passing, out)
    assert "this run included), this run has its swaps'" in report
    assert (f"Trained for longer, `d_long` reaches 99.9 % ({q2.TRAINING_BUDGET_MIN + 5:.1f} "
            "minutes of training)." in report)
    long_run["validation"]["recognised"]["swaps"]["identity"] = 0.001
    common.write_json(os.path.join(out, "runs", "d_long", "metrics.json"), long_run)
    assert "Trained for longer" not in q2.render_report(passing, out)
    shutil.rmtree(os.path.join(out, "runs", "d_long"))
    common.write_json(os.path.join(out, "runs", "a_wide", "metrics.json"), run_metrics)
    assert "None of the runs on this run's machine meets all four" in q2.render_report(metrics, out)


# --- weights and arguments -----------------------------------------------------------
def test_load_model(trained):
    model = q2.load_model(os.path.join(trained, "cyclevae.pt"))
    assert not model.training
    x = torch.rand(5, 3, 60, 60)
    with torch.no_grad():
        z_mu, z_logvar, s = model.encode(x)
        y = model.decode(z_mu, s)
    assert z_mu.shape == (5, 4) and z_logvar.shape == (5, 4) and s.shape == (5, 3)
    assert y.shape == (5, 3, 60, 60) and 0 <= float(y.min()) and float(y.max()) <= 1


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
    with pytest.raises(UserError, match="does not exist"):
        q2.load_model(str(tmp_path / "none.pt"))


@pytest.mark.parametrize("argv", [["--z-dim", "0"], ["--s-dim", "-3"], ["--kl-coef", "-1"],
                                  ["--reverse-cycle-coef", "nan"], ["--lr", "0"],
                                  ["--seed", "-1"], ["--seed", str(2 ** 32)],
                                  ["--precision", "fp16"], ["--batch-size", "x"],
                                  ["--predictor-characters", "-1"],
                                  ["--reverse-cycle-coef", "30"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as exit_info:
        q2.parse_args(q2.build_parser(), argv)
    assert exit_info.value.code == 2


def test_choices_follow_the_flags(trained, tmp_path):
    def weights(kl, warmup):
        def change(metrics):
            metrics["settings"].update(kl_coef=kl, reconstruction_coef=2, reverse_cycle_coef=10,
                                       warmup_epochs=warmup)
        return change
    authors = judged(trained, tmp_path, weights(3, 0))
    assert "x 3, L1" in authors and "the authors' weights are" not in authors
    assert "- No warm-up (the authors' setting)." in authors
    ours = judged(trained, tmp_path, weights(1, 1))
    assert "x 1, L1" in ours and "(the authors' weights are 2 / 10 / 3)" in ours
    assert "are 0 for the first 0.5 epochs and reach their full value linearly at epoch 1" in ours
    paper = q2.parse_args(q2.build_parser(), ["--paper-scale"])
    assert (paper.z_dim, paper.s_dim, paper.kl_coef, paper.epochs) == (512, 64, 3.0, 100.0)
    shorter = q2.parse_args(q2.build_parser(), ["--epochs", "3", "--paper-scale"])
    assert (shorter.z_dim, shorter.width, shorter.epochs) == (512, 64, 3.0)
