"""Hostile inputs to the image readers and to your own folder (issue 28, its image/folder half):
high-bit-depth images, train/test overlap, paths outside the folder, decompression bombs, labels
that overflow float32, type inference explained, unterminated quotes, `predict --out DIR`,
`predict DIR`. Pixel values are checked against hand-computed numbers."""
from __future__ import annotations

import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdmtg.data.folder import FolderDataset, FolderFormatError

sys.path.insert(0, str(Path(__file__).parent))
from folder_fixture import mixed_folder, write_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
H = ["image", "split", "a", "r"]
GOOD = [["0.png", "train", "x", "1.5"], ["1.png", "train", "y", "2.5"], ["2.png", "train", "x", "0.25"],
        ["3.png", "val", "x", "3"], ["4.png", "test", "y", "4"]]

#: 16-bit gray values and their 8-bit values, by hand: the top 8 bits (v >> 8)
V16 = np.array([[0, 255, 256, 32768], [32767, 65280, 65535, 4660]], dtype=np.uint16)
V8 = np.array([[0, 0, 1, 128], [127, 255, 255, 18]], dtype=np.uint8)          # 4660 = 0x1234 → 0x12 = 18


def _png16(path: Path) -> Path:
    from PIL import Image
    Image.fromarray(V16).save(path)                           # mode I;16 → a 16-bit grayscale PNG
    with Image.open(path) as im:
        assert im.mode.startswith("I") and im.format == "PNG"
    with open(path, "rb") as f:                               # IHDR: bit depth 16, colour type 0 (gray)
        head = f.read(26)
    assert head[24:26] == bytes([16, 0])
    return path


def _tiff32(path: Path, mode: str) -> Path:
    from PIL import Image
    a = (V16.astype(np.int32) * 3 if mode == "I" else V16.astype(np.float32) / 65535)
    Image.fromarray(a, mode).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
    return path


# ------------------------------------------------------------------------------------------------
# 1. bit depth
# ------------------------------------------------------------------------------------------------
def test_16bit_png_decodes_to_the_top_8_bits_in_every_reader(tmp_path):
    from fastdmtg.data import celeba, folder
    from fastdmtg.predict import prepare_images
    # the dataset readers resize to S x S; at the identity size S = 4 on a square image the values pass through
    from PIL import Image
    sq = np.zeros((4, 4), np.uint16)
    sq[:2], sq[2:] = V16, V16[::-1]
    Image.fromarray(sq).save(tmp_path / "sq.png")
    want_sq = np.concatenate([V8, V8[::-1]])                                       # (4, 4)
    for got in (folder.load_image(str(tmp_path / "sq.png"), 4), celeba.load_image(tmp_path / "sq.png", 4)):
        assert got.dtype == np.uint8 and got.shape == (3, 4, 4)
        assert np.array_equal(got, np.broadcast_to(want_sq, (3, 4, 4))), got[0]
    x = prepare_images([str(tmp_path / "sq.png")], 4, "folder")                    # (1, 3, 4, 4) in [0, 1]
    assert torch.equal((x * 255).round().to(torch.uint8)[0], torch.from_numpy(np.broadcast_to(want_sq, (3, 4, 4)).copy()))
    # a PIL image given to model.predict goes through the same reduction
    with Image.open(tmp_path / "sq.png") as im:
        im.load()
        x2 = prepare_images([im], 4, "folder")
    assert torch.equal(x, x2)
    # the reader itself, at the file's own size (2 x 4)
    from fastdmtg.data.images import read_rgb
    assert np.array_equal(read_rgb(_png16(tmp_path / "g16.png")), np.repeat(V8[:, :, None], 3, axis=2))


def _png48(path: Path, v16: np.ndarray) -> Path:
    """A 48-bit RGB PNG (16 bits per channel, all three = ``v16``), written by hand (Pillow cannot)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    h, w = v16.shape
    rgb = np.repeat(v16[:, :, None], 3, axis=2).astype(">u2")                     # (H, W, 3) big-endian
    raw = b"".join(b"\0" + rgb[i].tobytes() for i in range(h))                    # filter 0 per row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_16bit_gray_and_48bit_rgb_give_the_same_pixels(tmp_path):
    """The 16 → 8 reduction of gray images is the one Pillow applies to 48-bit RGB."""
    from fastdmtg.data.images import read_rgb
    a = read_rgb(_png16(tmp_path / "g.png"))
    b = read_rgb(_png48(tmp_path / "c.png", V16))
    assert np.array_equal(a, b) and np.array_equal(a[:, :, 1], V8)


def _folder_16bit(root: Path) -> Path:
    rows = [[f"{i}.png", s, "xy"[i % 2], str(i + 0.5)] for i, s in enumerate(["train"] * 4 + ["val", "test"])]
    write_folder(root, H, rows)
    from PIL import Image
    sq = np.tile(V16, (8, 4))                                                      # (16, 16) uint16
    Image.fromarray(sq).save(root / "1.png")
    return root


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_backends_on_a_16bit_folder_image(tmp_path, backend):
    """torch (the reference decoder per batch) gives the top 8 bits; DALI, which rounds 16 → 8 bits
    otherwise, refuses the file naming it (instead of other pixels)."""
    from fastdmtg import pipelines as P
    from fastdmtg.config import DataConfig
    ok, why = P.backend_status(backend, deep=False)
    if not ok:
        pytest.skip(why)
    root = _folder_16bit(tmp_path / "d")
    cfg = DataConfig(dataset="folder", root=str(root), image_size=16, backend=backend, cache_dir=str(tmp_path / "c"),
                     num_workers=0)
    src = P.build_source(cfg, progress=False)
    if backend == "dali":
        with pytest.raises(FolderFormatError, match=r"labels\.csv:3:1: image \S*1\.png: a 16-bit PNG; "
                                                    r"data\.backend=dali decodes it otherwise"):
            for _ in src.batches("train", 4, shuffle=False):
                pass
        return
    batch = next(iter(src.batches("train", 4, shuffle=False)))
    got = (batch["image"][1] * 255).round().to(torch.uint8)                        # (3, 16, 16)
    assert torch.equal(got, torch.from_numpy(np.broadcast_to(np.tile(V8, (8, 4)), (3, 16, 16)).copy()))


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32bit_tiff_is_refused_naming_the_file(tmp_path, mode):
    from fastdmtg.data import celeba, folder
    from fastdmtg.predict import ImageError, prepare_images
    p = _tiff32(tmp_path / f"t32{mode}.tif", mode)
    pat = rf"t32{mode}\.tif: .*Pillow mode {mode}\).*no defined 8-bit range; save it as an 8-bit or 16-bit image"
    with pytest.raises(FolderFormatError, match=pat):
        folder.load_image(str(p), 4)
    with pytest.raises(celeba.CelebAFormatError, match=pat):
        celeba.load_image(p, 4)
    with pytest.raises(ImageError, match=pat):
        prepare_images([str(p)], 4, "folder")


def test_one_image_reader():
    """Every reader goes through fastdmtg.data.images (no second copy of the decode)."""
    for f in ("fastdmtg/data/folder.py", "fastdmtg/data/celeba.py", "fastdmtg/predict.py"):
        text = (REPO / f).read_text()
        assert 'convert("RGB")' not in text and "Image.open(" not in text, f


# ------------------------------------------------------------------------------------------------
# 2. split overlap
# ------------------------------------------------------------------------------------------------
def test_same_image_in_two_splits_is_an_error_naming_both_rows(tmp_path):
    rows = [list(r) for r in GOOD] + [["1.png", "test", "x", "5"]]
    root = write_folder(tmp_path / "d", H, rows)
    with pytest.raises(FolderFormatError) as e:
        FolderDataset(root, None, 8)
    msg = str(e.value)
    assert re.search(r"labels\.csv:7:1 \(column 'image'\): '1\.png' \(test\) is also listed at line 3 \(train\)", msg), msg
    assert "\n" not in msg


def test_same_bytes_under_another_path_in_two_splits_is_an_error(tmp_path):
    rows = [list(r) for r in GOOD] + [["copy/of_2.png", "val", "y", "6"]]
    root = write_folder(tmp_path / "d", H, rows)
    (root / "copy").mkdir(exist_ok=True)
    (root / "copy" / "of_2.png").write_bytes((root / "2.png").read_bytes())
    with pytest.raises(FolderFormatError) as e:
        FolderDataset(root, None, 8)
    msg = str(e.value)
    assert re.search(r"labels\.csv:7:1 \(column 'image'\): 'copy/of_2\.png' \(val\) has the same bytes as '2\.png' "
                     r"at line 4 \(train\)", msg), msg
    # the fixture's images all have one size and other bytes: told apart by their hash (GOOD opens)
    assert len({(root / f"{i}.png").stat().st_size for i in range(5)}) == 1
    (root / "copy" / "of_2.png").unlink()
    (root / "labels.csv").write_text((root / "labels.csv").read_text().replace("copy/of_2.png", "5.png"))
    from PIL import Image
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "5.png")
    assert FolderDataset(root, None, 8).num_samples("val") == 2


def test_duplicate_rows_within_a_split_are_a_warning_with_counts(tmp_path, caplog):
    rows = [list(r) for r in GOOD] + [["0.png", "train", "y", "7"], ["0.png", "train", "x", "8"],
                                      ["3.png", "val", "y", "1"]]
    root = write_folder(tmp_path / "d", H, rows)
    # the same bytes under another name within one split: not an overlap (and no error)
    (root / "0copy.png").write_bytes((root / "0.png").read_bytes())
    with open(root / "labels.csv", "a") as f:
        f.write("0copy.png,train,x,9\n")
    with caplog.at_level(logging.WARNING, logger="fastdmtg"):
        ds = FolderDataset(root, None, 8)
    assert ds.num_samples("train") == 6
    text = caplog.text
    assert re.search(r"labels\.csv: 2 duplicate rows in the train split \(1 image listed more than once, e\.g\. "
                     r"'0\.png' at lines 2, 7, 8\)", text), text
    assert re.search(r"1 duplicate row in the val split", text), text


# ------------------------------------------------------------------------------------------------
# 3. paths confined to the folder
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["parent", "absolute", "etc_passwd", "dotdot_inside"])
def test_image_paths_outside_the_folder_are_refused_unopened(tmp_path, monkeypatch, where):
    from PIL import Image
    out = tmp_path / "outside"
    out.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "x.png")
    cell = {"parent": "../outside/x.png", "absolute": str(out / "x.png"), "etc_passwd": "/etc/passwd",
            "dotdot_inside": "sub/../../outside/x.png"}[where]
    root = tmp_path / "d"
    write_folder(root, H, GOOD)
    with open(root / "labels.csv", "a") as f:
        f.write(f"{cell},test,x,9\n")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    with pytest.raises(FolderFormatError) as e:
        ds = FolderDataset(root, None, 8)
        for s in ("train", "val", "test"):
            for it in ds.items(s):
                ds.decode_one(it)
    msg = str(e.value)
    assert re.search(r"labels\.csv:7:1 \(column 'image'\): .* is outside the dataset folder", msg), msg
    assert not any("outside" in o or "passwd" in o for o in opened), opened


def test_symlink_inside_the_folder_pointing_out_is_followed(tmp_path):
    """Policy: a symlink inside DIR was made by whoever made DIR — followed (docs/pipelines.md)."""
    from PIL import Image
    store = tmp_path / "store"
    store.mkdir()
    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    Image.fromarray(img).save(store / "s.png")
    root = write_folder(tmp_path / "d", H, GOOD)
    os.symlink(store, root / "linked")
    with open(root / "labels.csv", "a") as f:
        f.write("linked/s.png,test,x,9\n")
    ds = FolderDataset(root, None, 8)
    got = ds.decode_one(ds.items("test")[-1])["image"]
    assert np.array_equal(got, img.transpose(2, 0, 1))


# ------------------------------------------------------------------------------------------------
# 4. defects
# ------------------------------------------------------------------------------------------------
def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header says side x side 8-bit gray (a decompression bomb): Pillow refuses it
    from the header, so the pixel data can be a token."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image

    from fastdmtg.data import folder
    from fastdmtg.predict import ImageError, prepare_images
    p = _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(FolderFormatError, match=r"bomb\.png: image too large \(400,000,000 pixels\): above "
                                                 r"89,478,485 pixels"):
        folder.load_image(str(p), 8)
    with pytest.raises(ImageError, match=r"bomb\.png: image too large"):
        prepare_images([str(p)], 8, "folder")
    # between 1x and 2x the limit Pillow only warns: refused all the same, naming the size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")       # 1600 pixels
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(FolderFormatError, match=r"big\.png: image too large \(1,600 pixels\): above 1,000 "):
            folder.load_image(str(tmp_path / "big.png"), 8)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]     # one line, no warning


def test_label_overflowing_float32_is_rejected_naming_the_cell(tmp_path):
    rows = [list(r) for r in GOOD]
    rows[2][3] = "1e39"
    root = write_folder(tmp_path / "d", H, rows)
    with pytest.raises(FolderFormatError, match=r"labels\.csv:4:4: task 'r' is regression: '1e39' overflows float32"):
        FolderDataset(root, None, 8)
    rows[2][3] = "-3.5e38"
    root = write_folder(tmp_path / "e", H, rows)
    with pytest.raises(FolderFormatError, match=r"labels\.csv:4:4: .*'-3\.5e38' overflows float32"):
        FolderDataset(root, None, 8)
    rows[2][3] = "3.4e38"                                                     # representable: accepted
    FolderDataset(write_folder(tmp_path / "f", H, rows), None, 8)


def test_negative_value_making_a_class_column_regression_is_said(tmp_path, capsys):
    from fastdmtg.config import apply_overrides, get_recipe
    from fastdmtg.data.folder import open_folder
    rows = [["0.png", "train", "0", "1.5"], ["1.png", "train", "2", "2.5"], ["2.png", "train", "-1", "0.25"],
            ["5.png", "train", "1", "1"], ["3.png", "val", "1", "3"], ["4.png", "test", "2", "4"]]
    root = write_folder(tmp_path / "d", ["image", "split", "c", "r"], rows)
    cfg = apply_overrides(get_recipe("folder_k3"), [f"data.root={root}"])
    ds = open_folder(cfg.data)
    err = capsys.readouterr().err
    assert ds.decls[0].type == "regression"
    assert re.search(r"c: regression, .* \(inferred: '-1' at \S*labels\.csv:4:3 is not a class id 0\.\.19; "
                     r"declare \{\"type\": \"multiclass\"\} in tasks\.json", err), err
    assert "r: regression" in err and "(inferred: '1.5'" not in err          # non-integers say nothing more
    # declared multiclass in tasks.json: accepted, and the -1 cell is then an error naming it
    (root / "tasks.json").write_text('{"c": {"type": "multiclass"}}')
    cfg = apply_overrides(get_recipe("folder_k3"), [f"data.root={root}"])
    with pytest.raises(FolderFormatError, match=r"labels\.csv:4:3 \(column 'c'\): multiclass values are class ids 0\.\.C-1, got '-1'"):
        open_folder(cfg.data)
    (root / "labels.csv").write_text((root / "labels.csv").read_text().replace("2.png,train,-1", "2.png,train,"))
    cfg = apply_overrides(get_recipe("folder_k3"), [f"data.root={root}"])
    ds = open_folder(cfg.data)
    assert (ds.decls[0].type, ds.decls[0].classes) == ("multiclass", 3)


@pytest.mark.parametrize("cell", ['"y', '"y""z'])
@pytest.mark.parametrize("later", ["", '"x""y"'])
def test_unterminated_quote_is_reported_where_it_opened(tmp_path, cell, later):
    """Line 3 opens a quote that its line does not close; with a quote on a later line csv fails there
    (`',' expected after '"'`), without one at the end of the file: both name line 3, column 13."""
    root = write_folder(tmp_path / "d", H, GOOD)
    text = (root / "labels.csv").read_text().splitlines()
    text[2] = text[2].replace("1.png,train,y", f'1.png,train,{cell}')
    if later:
        text[4] = text[4].replace("3.png,val,x", f"3.png,val,{later}")
    (root / "labels.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(FolderFormatError) as e:
        FolderDataset(root, None, 8)
    want = (r"a quoted field opens here and runs on to line 5: ',' expected after '\"'\)" if later
            else r"a quoted field opens here and never closes\)")
    assert re.search(r"labels\.csv:3:13: malformed CSV \(" + want, str(e.value)), str(e.value)
    # closed on its line, with a "" inside: parsed (the cell is y"q, a third value of the binary column)
    text[2] = text[2].replace(cell, '"y""q"')
    (root / "labels.csv").write_text("\n".join(text).replace(later, "x" if later else "") + "\n")
    with pytest.raises(FolderFormatError, match=r"labels\.csv:6:3: task 'a' is binary with values 'x' and 'y\"q'"):
        FolderDataset(root, None, 8)


# ------------------------------------------------------------------------------------------------
# the CLI: exit codes, one line, no traceback
# ------------------------------------------------------------------------------------------------
def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "fastdmtg", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


TINY = ["--quiet", "--set", "data.image_size=16", "--set", "model.width=2", "--set", "train.epochs=1",
        "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    root = mixed_folder(tmp / "d")
    run = tmp / "run"
    from fastdmtg.cli import main
    assert main(["train", "--data-root", str(root), "--out", str(run), "--set", f"data.cache_dir={tmp / 'c'}",
                 *TINY]) == 0
    return run


def _one_line_error(p, code, pattern):
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and p.stderr.rstrip().endswith(errors[0]) and re.search(pattern, errors[0]), p.stderr


def test_cli_train_on_a_bomb_exits_2_naming_it(tmp_path):
    root = write_folder(tmp_path / "d", H, GOOD)
    _bomb_png(root / "1.png")
    p = _cli("train", "--data-root", str(root), "--out", str(tmp_path / "run"),
             "--set", f"data.cache_dir={tmp_path / 'c'}", *TINY)
    _one_line_error(p, 2, r"^error: .*labels\.csv:3:1: .*1\.png: image too large \(400,000,000 pixels\)")


def _in_process(capsys, *args):
    """``fastdmtg ARGS`` in this process (an exception escaping main fails the test: no traceback
    can hide) → a CompletedProcess-like result."""
    from fastdmtg.cli import main
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, cap.out, cap.err)


def test_cli_predict_hostile_inputs(folder_run, tmp_path, capsys):
    from PIL import Image
    run = lambda *a: _in_process(capsys, "predict", folder_run, *a)              # noqa: E731
    bomb = _bomb_png(tmp_path / "bomb.png")
    _one_line_error(_cli("predict", str(folder_run), str(bomb)), 2, r"^error: .*bomb\.png: image too large")
    g16 = _png16(tmp_path / "g16.png")
    t32 = _tiff32(tmp_path / "t32.tif", "I")
    _one_line_error(run(t32), 2, r"^error: .*t32\.tif: integer pixels")
    # --out an existing folder: refused before predicting, exit 2
    (tmp_path / "outdir").mkdir()
    _one_line_error(run(g16, "--out", tmp_path / "outdir"), 2,
                    r"^error: --out .*outdir: is a folder; expected a CSV file path")
    _one_line_error(run(g16, "--out", tmp_path / "no" / "p.csv"), 2, r"^error: --out .*p\.csv: its folder .*no does not exist")
    # a folder as the image: all images in it (sorted), other files skipped
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, name in enumerate(["b.png", "a.jpg"]):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(imgs / name)
    (imgs / "notes.txt").write_text("not an image")
    p = run(str(imgs) + "/")
    assert p.returncode == 0, p.stderr
    names = [r.split(",")[0] for r in p.stdout.splitlines()[1:]]
    assert names == [str(imgs / "a.jpg"), str(imgs / "b.png")], p.stdout
    assert run(imgs / "a.jpg", imgs / "b.png").stdout == p.stdout
    (tmp_path / "empty").mkdir()
    _one_line_error(run(tmp_path / "empty"), 2, r"^error: .*empty: a folder without image files")
    # the Python API takes files, not folders: it says so
    from fastdmtg.predict import ImageError, prepare_images
    with pytest.raises(ImageError, match=r"imgs: is a folder, not an image file"):
        prepare_images([str(imgs)], 8, "folder")


def test_predict_write_failure_is_one_line_exit_5(folder_run, tmp_path, monkeypatch, capsys):
    """Disk full (or any write error) while writing --out: one line naming the file, exit 5."""
    from PIL import Image

    from fastdmtg import checkpoint
    from fastdmtg.cli import main
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")

    def full(path, text):
        raise checkpoint.WriteFailed(f"cannot write {path}: No space left on device")
    monkeypatch.setattr(checkpoint, "atomic_write_text", full)
    assert main(["predict", str(folder_run), str(tmp_path / "x.png"), "--out", str(tmp_path / "p.csv")]) == 5
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {tmp_path / 'p.csv'}: No space left on device"
