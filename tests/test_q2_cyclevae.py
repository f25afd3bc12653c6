"""Tests of q2_cyclevae.py on tiny synthetic sprites written in the real on-disk formats:
MATLAB v7.3 character files (HDF5 with a 512-byte userblock, cell arrays as object
references into #refs#) and a MATLAB v5 split file."""
import json
import os
import time

import h5py
import numpy as np
import pytest
import torch
from scipy.io import savemat

import common
import q2_cyclevae as q2
from common import UserError

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sprites_dir):
    out = str(tmp_path_factory.mktemp("q2out"))
    q2.main(TINY + ["--data-dir", sprites_dir, "--out", out])
    return out


TINY = ["--z-dim", "4", "--s-dim", "3", "--width", "4", "--batch-size", "4", "--epochs", "2",
        "--epoch-steps", "3", "--lr-drop-epoch", "1", "--val-pairs", "8", "--val-every", "1",
        "--classifier-epochs", "2", "--predictor-epochs", "1", "--grids", "2",
        "--interpolation-steps", "8", "--no-download", "--device", "cpu"]


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
    # the cache alone is enough now, under either name
    for i in range(N_CHARACTERS):
        os.remove(os.path.join(root, "data", "sprites", f"sprites_{i}.mat"))
    os.replace(cache, os.path.join(root, q2.SHARED_CACHE_NAME))
    again = q2.load_sprites(root, download=False)
    np.testing.assert_array_equal(again["sprites"], data["sprites"])
    np.testing.assert_array_equal(again["labels"], data["labels"])


def test_read_only_data_dir_caches_elsewhere(tmp_path, monkeypatch):
    root = write_dataset(str(tmp_path / "ro"), n_characters=N_CHARACTERS)
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


@pytest.mark.parametrize("update", ["separate", "joint"])
def test_reverse_cycle_updates_encoder_only_with_detached_s(update):
    torch.manual_seed(0)
    model = q2.CycleVAE(4, 3, 4)
    args = q2.parse_args(["--reconstruction-coef", "0", "--kl-coef", "0",
                          "--reverse-update", update])
    optimizers = (torch.optim.Adam(model.parameters(), 1e-2),
                  torch.optim.Adam(model.encoder.parameters(), 1e-2))
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
    # the reverse-cycle update alone leaves no gradient on the decoder
    model.zero_grad(set_to_none=True)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    q2.reverse_cycle_backward(model, batch[2], batch[3], 10.0)
    assert all(p.grad is None for p in model.decoder.parameters())
    for k, v in model.named_buffers():  # generated batches stay out of the BN statistics
        assert torch.equal(v, buffers[k]) or k.endswith("num_batches_tracked"), k
    assert model.encoder.z_mu.weight.grad is not None


def test_warmup_zero_is_forward_cycle_only():
    torch.manual_seed(0)
    model = q2.CycleVAE(4, 3, 4)
    args = q2.parse_args(["--reconstruction-coef", "0"])
    optimizers = (torch.optim.Adam(model.parameters(), 1e-2),
                  torch.optim.Adam(model.encoder.parameters(), 1e-2))
    before = {k: v.clone() for k, v in model.named_parameters()}
    q2.training_step(model, optimizers, [torch.rand(4, 3, 60, 60) for _ in range(4)], args, 0.0)
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


def test_end_to_end_writes_every_output(trained, sprites_dir):
    names = ["cyclevae.pt", "training_state.pt", "metrics.json", "report.md",
             "training_curves.png", "reconstructions.png", "interpolation.png",
             "prediction_networks.png", "swap_grid_1.png", "swap_grid_2.png"]
    for name in names:
        assert os.path.getsize(os.path.join(trained, name)) > 0, name
    metrics = json.load(open(os.path.join(trained, "metrics.json")))
    c = metrics["classifiers"]
    for key in ("identity_from_z", "identity_from_s", "pose_from_z", "pose_from_s"):
        assert 0 <= c[key]["test_accuracy"] <= 1 and 0 <= c[key]["train_accuracy"] <= 1
    assert 0.5 < c["identity_twin_ceiling"] < 1  # twins share all but frame 0
    assert metrics["training"]["steps"] == 6 and metrics["training"]["train_images_per_s"] > 0
    assert "--epochs" in metrics["command"] and metrics["timings"]["train_seconds"] > 0
    report = open(os.path.join(trained, "report.md")).read()
    for name in names[4:]:
        assert f"({name})" in report, name


def test_load_model_and_eval_only(trained, sprites_dir, tmp_path):
    model = q2.load_model(os.path.join(trained, "cyclevae.pt"))
    assert not model.training
    x = torch.rand(5, 3, 60, 60)
    with torch.no_grad():
        z_mu, z_logvar, s = model.encode(x)
        y = model.decode(z_mu, s)
    assert z_mu.shape == (5, 4) and z_logvar.shape == (5, 4) and s.shape == (5, 3)
    assert y.shape == (5, 3, 60, 60) and 0 <= float(y.min()) and float(y.max()) <= 1
    out = str(tmp_path / "eval")
    q2.main(["--eval-only", "--weights", os.path.join(trained, "cyclevae.pt"), "--data-dir",
             sprites_dir, "--out", out, "--classifier-epochs", "2", "--predictor-epochs", "1",
             "--no-download", "--device", "cpu", "--recalibrate-bn"])
    state = common.load_checkpoint(os.path.join(out, "cyclevae.pt"), q2.KIND)
    assert state["recalibrated_batch_norm"] and "history" in state
    first = json.load(open(os.path.join(trained, "metrics.json")))
    second = json.load(open(os.path.join(out, "metrics.json")))
    # training already recalibrated the statistics: recomputing them changes little
    assert second["test_reconstruction_mse"] == pytest.approx(first["test_reconstruction_mse"],
                                                               rel=0.2)
    assert os.path.isfile(os.path.join(out, "training_curves.png"))


def test_resume_continues(sprites_dir, tmp_path):
    out = str(tmp_path / "r")
    args = TINY + ["--data-dir", sprites_dir, "--out", out]
    q2.main([a if a != "2" or i == 0 or args[i - 1] != "--epochs" else "1"
             for i, a in enumerate(args)])
    q2.main(args + ["--resume"])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["training"]["steps"] == 6


def test_missing_and_partial_data(tmp_path, monkeypatch):
    monkeypatch.setattr(q2, "SPRITES_URL", "http://127.0.0.1:9/nips2015-analogy-data.tar.gz")
    start = time.perf_counter()
    with pytest.raises(UserError, match="sprites_splits.mat is missing"):
        q2.load_sprites(str(tmp_path / "empty"))
    assert time.perf_counter() - start < 15  # a failed download fails fast
    root = write_dataset(str(tmp_path / "partial"), n_characters=N_CHARACTERS)
    os.remove(os.path.join(root, "data", "sprites", "sprites_7.mat"))
    with pytest.raises(UserError, match="1 of the 12 character files are missing.*sprites_7"):
        q2.load_sprites(root, download=False)


def test_bad_mat_and_corrupt_cache_name_the_file(tmp_path):
    root = write_dataset(str(tmp_path / "bad"), n_characters=N_CHARACTERS)
    bad = os.path.join(root, "data", "sprites", "sprites_4.mat")
    with open(bad, "wb") as f:
        f.write(b"not a mat file")
    with pytest.raises(UserError, match="sprites_4.mat"):
        q2.load_sprites(root, download=False)
    with h5py.File(bad, "w") as f:  # HDF5, but not the sprite layout
        f.create_dataset("labels", data=np.zeros((7, 1)))
    with pytest.raises(UserError, match="sprites_4.mat"):
        q2.load_sprites(root, download=False)
    cache = os.path.join(root, q2.CACHE_NAME)
    with open(cache, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match=q2.CACHE_NAME):
        q2.load_sprites(root, download=False)
    np.savez(cache, sprites=np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(UserError, match=f"{q2.CACHE_NAME} lacks"):
        q2.load_sprites(root, download=False)


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
                                  ["--eval-only"], ["--batch-size", "x"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as exit_info:
        q2.parse_args(argv)
    assert exit_info.value.code == 2
