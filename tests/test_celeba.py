"""CelebA official-format parsing, decoding and its error cases."""
import numpy as np
import pytest
import torch

from fastdmtg.config import DataConfig
from fastdmtg.data.celeba import CELEBA_9, CELEBA_40
from fastdmtg.data.celeba import CelebAFormatError, CelebAIndex, load_image, parse_attributes, parse_partition
from fastdmtg.pipelines import build_source

from celeba_fixture import write_celeba


def test_parse_attributes_irregular_spacing(tmp_path):
    files, labels = write_celeba(tmp_path, n=6)
    names, fl, lab = parse_attributes(tmp_path / "list_attr_celeba.txt")
    assert names == CELEBA_40
    assert fl == files
    assert np.array_equal(lab, (labels > 0).astype(np.int8))


def test_parse_handwritten_rows(tmp_path):
    p = tmp_path / "list_attr_celeba.txt"
    p.write_text("2\nA B C\n000001.jpg  1 -1  1\n000002.jpg -1 -1\t 1\n")
    names, files, lab = parse_attributes(p)
    assert names == ["A", "B", "C"] and files == ["000001.jpg", "000002.jpg"]
    assert lab.tolist() == [[1, 0, 1], [0, 0, 1]]


@pytest.mark.parametrize("text,match", [
    ("x\nA B\n", "image count"),
    ("3\nA B\nf1.jpg 1 1\nf2.jpg 1 -1\n", "says 3 images but the file has 2 rows"),
    ("1\nA B\nf1.jpg 1\n", r"list_attr_celeba.txt:3: f1.jpg: 1 value, expected 2 \(one per attribute on line 2\)"),
    ("1\nA B\nf1.jpg 1 0\n", r":3: attribute 'B' of f1.jpg: expected 1 or -1, got '0'"),
    ("2\nA B\nf1.jpg 1 1\nf1.jpg 1 1\n", "duplicate image"),
    ("0\n\n", "expected attribute names"),
])
def test_attribute_file_errors(tmp_path, text, match):
    p = tmp_path / "list_attr_celeba.txt"
    p.write_text(text)
    with pytest.raises(CelebAFormatError, match=match):
        parse_attributes(p)


def test_attribute_row_with_one_value_missing_gives_exact_counts(tmp_path):
    """A 40-attribute file whose row has 39 values: the message counts values, not fields."""
    write_celeba(tmp_path, n=3)
    p = tmp_path / "list_attr_celeba.txt"
    lines = p.read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0].rstrip()          # drop the last value of row 2 (line 4)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(CelebAFormatError, match=r"list_attr_celeba.txt:4: 000002.jpg: 39 values, expected 40 "):
        parse_attributes(p)


@pytest.mark.parametrize("which", ["list_attr_celeba.txt", "list_eval_partition.txt"])
def test_utf8_byte_order_mark_is_ignored(tmp_path, which):
    """Editors on some systems save with a UTF-8 BOM; it must not become part of the first field."""
    files, labels = write_celeba(tmp_path, n=8)
    p = tmp_path / which
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    idx = CelebAIndex(tmp_path, None)
    assert [f for s in ("train", "val", "test") for f in idx.splits[s][0]] == files
    assert np.array_equal(idx.labels("train"), (labels[:4] > 0).astype(np.int64))


def test_non_utf8_byte_names_file_and_line(tmp_path):
    write_celeba(tmp_path, n=4)
    p = tmp_path / "list_attr_celeba.txt"
    lines = p.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b".jpg", b"\xff.jpg")       # line 5: the third image row
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(CelebAFormatError, match=r"list_attr_celeba.txt:5: byte 0xff at column 7 is not UTF-8"):
        parse_attributes(p)
    q = tmp_path / "list_eval_partition.txt"
    q.write_bytes(b"000001.jpg 0\n\xe9\n")
    with pytest.raises(CelebAFormatError, match=r"list_eval_partition.txt:2: byte 0xe9 at column 1 is not UTF-8"):
        parse_partition(q)


def test_partition_errors(tmp_path):
    p = tmp_path / "list_eval_partition.txt"
    p.write_text("a.jpg 0\nb.jpg 3\n")
    with pytest.raises(CelebAFormatError, match=r"list_eval_partition.txt:2: partition of b.jpg must be 0, 1 or 2"):
        parse_partition(p)
    p.write_text("a.jpg\n")
    with pytest.raises(CelebAFormatError, match=":1: expected `file partition`"):
        parse_partition(p)


def test_missing_files_and_unknown_attribute(tmp_path):
    with pytest.raises(CelebAFormatError, match="CelebA folder not found"):
        CelebAIndex(tmp_path / "nope", None)
    write_celeba(tmp_path, n=4)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(CelebAFormatError, match=r"list_eval_partition.txt: missing"):
        CelebAIndex(tmp_path, None)
    write_celeba(tmp_path, n=4)
    with pytest.raises(CelebAFormatError, match="unknown attribute 'Smiling_Wide'"):
        CelebAIndex(tmp_path, ["Smiling", "Smiling_Wide"])


def test_image_decode_and_errors(tmp_path):
    write_celeba(tmp_path, n=4)
    img = load_image(tmp_path / "img_align_celeba" / "000001.jpg", 64)
    assert img.shape == (3, 64, 64) and img.dtype == np.uint8
    # reference resize: bilinear, half-pixel centres, no antialias — compare with torch directly
    from PIL import Image
    raw = np.asarray(Image.open(tmp_path / "img_align_celeba" / "000001.jpg").convert("RGB"))
    ref = torch.nn.functional.interpolate(torch.from_numpy(raw.copy()).permute(2, 0, 1)[None].float(),
                                          size=(64, 64), mode="bilinear", align_corners=False)
    assert np.abs(ref[0].round().numpy() - img).max() <= 1
    # truncated JPEG
    p = tmp_path / "img_align_celeba" / "000002.jpg"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CelebAFormatError, match="000002.jpg: unreadable or truncated"):
        load_image(p, 64)
    with pytest.raises(CelebAFormatError, match="missing"):
        load_image(tmp_path / "img_align_celeba" / "999999.jpg", 64)


@pytest.mark.parametrize("backend", ["memory", "torch"])
def test_build_source_splits_and_tasks(tmp_path, backend):
    files, labels = write_celeba(tmp_path / "celeba", n=16)
    cfg = DataConfig(dataset="celeba", root=str(tmp_path / "celeba"), tasks="celeba9", image_size=64,
                     backend=backend, num_workers=0, cache_dir=str(tmp_path / "cache"))
    src = build_source(cfg, progress=False)
    assert src.taskset.names == CELEBA_9
    assert [src.num_samples(s) for s in ("train", "val", "test")] == [8, 4, 4]
    cols = [CELEBA_40.index(n) for n in CELEBA_9]
    got = torch.cat([b["labels"] for b in src.batches("val", 3, shuffle=False)])
    assert torch.equal(got, torch.from_numpy((labels[8:12][:, cols] > 0).astype(np.int64)))
    b = next(iter(src.batches("train", 8, shuffle=True, seed=1)))
    assert b["image"].shape == (8, 3, 64, 64) and b["image"].dtype == torch.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0


def test_decode_cache_is_reused(tmp_path):
    write_celeba(tmp_path / "celeba", n=8)
    cfg = DataConfig(dataset="celeba", root=str(tmp_path / "celeba"), image_size=32, cache_dir=str(tmp_path / "c"),
                     backend="memory")
    a = build_source(cfg, progress=False, validate=True)
    caches = sorted((tmp_path / "c").rglob("*.npy"))
    assert [c.name for c in caches] == ["image.npy"] * 3               # one per split; labels are parsed
    mtimes = [c.stat().st_mtime_ns for c in caches]
    b = build_source(cfg, progress=False, validate=True)
    assert [c.stat().st_mtime_ns for c in caches] == mtimes
    assert torch.equal(next(iter(a.batches("train", 4, shuffle=False)))["image"],
                       next(iter(b.batches("train", 4, shuffle=False)))["image"])


def test_in_process_decode_keeps_the_callers_thread_count(tmp_path):
    """Decoding a single chunk runs in the calling process: it must not leave torch at 1 thread
    (training afterwards would run single-threaded on CPU)."""
    from fastdmtg.data.base import decode_parallel
    from fastdmtg.data.celeba import CelebADataset
    write_celeba(tmp_path, n=8)
    ds = CelebADataset(tmp_path, None, 32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = {"image": np.zeros((4, 3, 32, 32), np.uint8)}
        decode_parallel(ds.items("train"), ds.decode_one, out, workers=1, progress=False)
        assert out["image"].any() and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
