"""CelebA official-format parsing, decoding and its error cases."""
import numpy as np
import pytest
import torch

from fastdmtg.config import CELEBA_9, CELEBA_40, DataConfig
from fastdmtg.data import build_data
from fastdmtg.data.celeba import CelebAFormatError, CelebAIndex, load_image, parse_attributes, parse_partition

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
    ("1\nA B\nf1.jpg 1\n", r"list_attr_celeba.txt:3: expected a file name and 2 values, got 2 fields"),
    ("1\nA B\nf1.jpg 1 0\n", r":3: attribute 'B' of f1.jpg: expected 1 or -1, got '0'"),
    ("2\nA B\nf1.jpg 1 1\nf1.jpg 1 1\n", "duplicate image"),
    ("0\n\n", "expected attribute names"),
])
def test_attribute_file_errors(tmp_path, text, match):
    p = tmp_path / "list_attr_celeba.txt"
    p.write_text(text)
    with pytest.raises(CelebAFormatError, match=match):
        parse_attributes(p)


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
def test_build_data_splits_and_tasks(tmp_path, backend):
    files, labels = write_celeba(tmp_path / "celeba", n=16)
    cfg = DataConfig(dataset="celeba", root=str(tmp_path / "celeba"), tasks="celeba9", image_size=64,
                     backend=backend, num_workers=0, cache_dir=str(tmp_path / "cache"))
    src = build_data(cfg, progress=False)
    assert src.taskset.names == CELEBA_9
    assert [src.num_samples(s) for s in ("train", "val", "test")] == [8, 4, 4]
    cols = [CELEBA_40.index(n) for n in CELEBA_9]
    got = torch.cat([b["labels"] for b in src.batches("val", 3, shuffle=False)])
    assert torch.equal(got, torch.from_numpy((labels[8:12][:, cols] > 0).astype(np.int64)))
    b = next(iter(src.batches("train", 8, shuffle=True, seed=1)))
    assert b["image"].shape == (8, 3, 64, 64) and b["image"].dtype == torch.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0


def test_memory_cache_is_reused(tmp_path):
    write_celeba(tmp_path / "celeba", n=8)
    cfg = DataConfig(dataset="celeba", root=str(tmp_path / "celeba"), image_size=32, cache_dir=str(tmp_path / "c"),
                     backend="memory")
    a = build_data(cfg, progress=False)
    caches = sorted((tmp_path / "c").glob("*.npy"))
    assert len(caches) == 3
    mtimes = [c.stat().st_mtime_ns for c in caches]
    b = build_data(cfg, progress=False)
    assert [c.stat().st_mtime_ns for c in caches] == mtimes
    assert torch.equal(a.data["train"][0], b.data["train"][0])


def test_in_process_decode_keeps_the_callers_thread_count(tmp_path):
    """Decoding a single chunk runs in the calling process: it must not leave torch at 1 thread
    (training afterwards would run single-threaded on CPU)."""
    from fastdmtg.data.celeba import decode_split
    files, _ = write_celeba(tmp_path, n=4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = decode_split(sorted((tmp_path / "img_align_celeba").glob("*.jpg")), 32, workers=1, progress=False)
        assert out.shape == (4, 3, 32, 32) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
