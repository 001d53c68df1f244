"""What the core used to decide by a dataset's name, now asked of the dataset formats: where a decode
cache goes by default (``Dataset.cache_beside_data``), what ``prepare`` offers and its default image
size (``DatasetFormat.prepare`` / ``detect`` / ``image_size``), how the benchmarks feed a recipe
(``DatasetFormat.bench``) — each checked against the values the name branches gave, and on a format
that declares nothing."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastdmtg.config import get_recipe
from fastdmtg.data import FORMATS, get_format


def test_decode_cache_beside_the_data_only_where_the_dataset_says(tmp_path, monkeypatch):
    from fastdmtg.data.base import Dataset
    from fastdmtg.data.taskonomy import TaskonomyDataset
    from fastdmtg.pipelines.cache import default_cache_dir
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = Path(os.path.expanduser("~")) / ".cache" / "fastdmtg"
    big = TaskonomyDataset.__new__(TaskonomyDataset)     # the attribute is what counts, not the data
    big.root = tmp_path / "tx"
    big.root.mkdir()
    small = Dataset()
    small.root = tmp_path / "tx"
    assert TaskonomyDataset.cache_beside_data and not Dataset.cache_beside_data
    assert default_cache_dir("", big) == tmp_path / "tx" / ".fastdmtg_cache"
    assert default_cache_dir("", small) == home
    assert default_cache_dir(str(tmp_path / "mine"), big) == (tmp_path / "mine").resolve()
    big.root = None
    assert default_cache_dir("", big) == home


def test_prepare_offers_what_each_format_declares(tmp_path, capsys):
    from fastdmtg.cli import main
    assert [n for n in FORMATS if get_format(n).detect is not None] == ["celeba", "taskonomy", "folder"]
    assert {n: get_format(n).image_size for n in FORMATS} == {"synthetic": 64, "celeba": 64, "taskonomy": 256,
                                                               "folder": 64, "tensors": 64}
    assert [n for n in FORMATS if get_format(n).prepare is not None] == ["taskonomy"]
    assert main(["prepare", "celeba", str(tmp_path), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("error: `prepare celeba` only makes FFCV files (--format ffcv); its "
                                               "default decode cache is built automatically on first use")
    assert main(["prepare", "nope", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("error: data.dataset: unknown dataset 'nope'; known: synthetic, "
                                               "celeba, taskonomy, folder, tensors")
    from fastdmtg.cli import prepare_ffcv_main
    with pytest.raises(SystemExit):
        prepare_ffcv_main(["tensors", str(tmp_path)])                # no folder to read
    assert "invalid choice: 'tensors' (choose from 'celeba', 'taskonomy', 'folder')" in capsys.readouterr().err


def test_prepare_ffcv_default_image_size_is_the_formats(tmp_path, monkeypatch):
    from fastdmtg import data
    from fastdmtg.cli import prepare_ffcv_main
    seen = []

    def stop(cfg, progress=True):
        seen.append((cfg.dataset, cfg.image_size))
        raise ValueError("stop here")
    monkeypatch.setattr(data, "open_dataset", stop)
    for name in ("taskonomy", "celeba", "folder"):
        assert prepare_ffcv_main([name, str(tmp_path), "--no-progress"]) == 2
    assert prepare_ffcv_main(["taskonomy", str(tmp_path), "--image-size", "32", "--no-progress"]) == 2
    assert seen == [("taskonomy", 256), ("celeba", 64), ("folder", 64), ("taskonomy", 32)]


def test_bench_data_of_each_format():
    from fastdmtg import testing
    from fastdmtg.testing import bench_data
    cel, syn, tx = (bench_data(get_recipe(r)) for r in ("celeba9_k3", "synthetic_k3", "taskonomy5_k3"))
    assert (cel.batches, cel.decode, cel.cache, cel.raw_per_step) == (64, "JPEG decode", "uint8", False)
    assert (tx.batches, tx.decode, tx.cache, tx.raw_per_step) == (16, "PNG decode + resize", "uint8/uint16", True)
    assert cel.synthetic is testing.synthetic_celeba and syn.synthetic is testing.synthetic_celeba
    assert tx.synthetic is testing.synthetic_taskonomy
    assert cel.raw_data("/r") == syn.raw_data("/r") == {"dataset": "celeba"}
    assert tx.raw_data("/r") == {"taskonomy_split_file": str(Path("/r") / testing.TASKONOMY_SPLIT_FILE)}
    assert (cel.paper_line, tx.paper_line, cel.describe) == (False, True, None)
    with pytest.raises(ValueError, match=r"^data.dataset=folder: the benchmarks have no synthetic data for this format$"):
        bench_data(get_recipe("folder_k3"))


def test_aot_records_grouped_bce_for_classification_heads_only():
    from fastdmtg.aot import _all_class_heads
    assert _all_class_heads(get_recipe("celeba9_k3")) and _all_class_heads(get_recipe("synthetic_k3"))
    assert not _all_class_heads(get_recipe("taskonomy5_k3"))
