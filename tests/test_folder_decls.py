"""The folder format's task declarations, message by message: every check of a tasks.json entry
(``read_tasks_json``) and every outcome of inference (``infer_decl``: the declaration, or the error
naming file, column, line and value). The exact texts are pinned: they are the user's guide."""
from __future__ import annotations

import json
import math

import pytest

from fastdmtg.data.folder import FolderFormatError, LabelTable, infer_decl, read_tasks_json


def _table(tmp_path, column: list[str], split: list[str] | None = None) -> LabelTable:
    split = split or ["train"] * len(column)
    p = tmp_path / "labels.csv"
    p.write_text("image,split,t\n" + "".join(f"{i}.png,{s},{v}\n" for i, (s, v) in enumerate(zip(split, column))))
    return LabelTable(p)


@pytest.mark.parametrize("entry, message", [
    ([1], "expected an object like {\"type\": \"binary\"}, got [1]"),
    ({"type": "binary", "kind": 1}, "unknown key(s) ['kind']; expected ['classes', 'labels', 'normalize', 'type', "
                                    "'weight']"),
    ({"type": "ordinal"}, "\"type\" must be one of binary|multiclass|regression, got \"ordinal\""),
    ({}, "\"type\" must be one of binary|multiclass|regression, got null"),
    ({"type": "multiclass", "classes": 1}, "\"classes\" must be an integer >= 2, got 1"),
    ({"type": "multiclass", "classes": True}, "\"classes\" must be an integer >= 2, got true"),
    ({"type": "multiclass", "classes": 2.0}, "\"classes\" must be an integer >= 2, got 2.0"),
    ({"type": "binary", "labels": ["a", 1]}, "\"labels\" must be a list of strings"),
    ({"type": "binary", "labels": "ab"}, "\"labels\" must be a list of strings"),
    ({"type": "binary", "weight": -1}, "\"weight\" must be a number >= 0, got -1"),
    ({"type": "binary", "weight": False}, "\"weight\" must be a number >= 0, got false"),
    ({"type": "binary", "weight": "1"}, "\"weight\" must be a number >= 0, got \"1\""),
    ({"type": "regression", "normalize": "minmax"},
     "\"normalize\" must be \"standard\", \"none\" or {\"mean\": m, \"std\": s > 0}, got \"minmax\""),
    ({"type": "regression", "normalize": {"mean": 1, "std": 0}},
     "\"normalize\" must be \"standard\", \"none\" or {\"mean\": m, \"std\": s > 0}, got {\"mean\": 1, \"std\": 0}"),
    ({"type": "regression", "normalize": {"mean": True, "std": 1}},
     "\"normalize\" must be \"standard\", \"none\" or {\"mean\": m, \"std\": s > 0}, got {\"mean\": true, \"std\": 1}"),
    ({"type": "regression", "normalize": {"mean": 1}},
     "\"normalize\" must be \"standard\", \"none\" or {\"mean\": m, \"std\": s > 0}, got {\"mean\": 1}"),
    ({"type": "binary", "normalize": "none"}, "\"normalize\" applies to regression tasks only"),
    # the first failing check is the one reported
    ({"type": "ordinal", "weight": -1}, "\"type\" must be one of binary|multiclass|regression, got \"ordinal\""),
])
def test_tasks_json_entry_errors(tmp_path, entry, message):
    p = tmp_path / "tasks.json"
    p.write_text(json.dumps({"t": entry}))
    with pytest.raises(FolderFormatError) as e:
        read_tasks_json(p, ["t"])
    assert str(e.value) == f"{p}: task 't': {message}"


def test_tasks_json_file_errors_and_a_good_file(tmp_path):
    p = tmp_path / "tasks.json"
    for text, message in (("[1]", f"{p}: expected a JSON object {{\"<task>\": {{\"type\": ...}}}}"),
                          ('{"u": {"type": "binary"}}', f"{p}: task 'u' is not a column of labels.csv (its task "
                                                        "columns: t, s)")):
        p.write_text(text)
        with pytest.raises(FolderFormatError) as e:
            read_tasks_json(p, ["t", "s"])
        assert str(e.value) == message
    good = {"t": {"type": "regression", "normalize": {"mean": 1.5, "std": 2}, "weight": 0},
            "s": {"type": "multiclass", "classes": 3, "labels": ["a", "b", "c"]},
            "u": {"type": "multiclass", "classes": 2, "weight": 2.5, "normalize": "standard"}}
    p.write_text(json.dumps(good))
    with pytest.raises(FolderFormatError, match="applies to regression tasks only"):
        read_tasks_json(p, ["t", "s", "u"])
    del good["u"]["normalize"]
    p.write_text(json.dumps(good))
    assert read_tasks_json(p, ["t", "s", "u"]) == good


@pytest.mark.parametrize("column, entry, want", [
    (["a", "b", "a"], None, ("binary", 2, ("a", "b"))),
    (["1.0", "0", "1"], None, ("binary", 2, ("0", "1"))),              # "1" and "1.0" are one value
    (["0", "2", "1", "2"], None, ("multiclass", 3, ())),
    (["0", "2", "1"], {"type": "multiclass", "labels": ["x", "y", "z"]}, ("multiclass", 3, ("x", "y", "z"))),
    (["0", "1", "1"], {"type": "multiclass", "classes": 4}, ("multiclass", 4, ())),
    (["a", "b", "a"], {"type": "binary", "labels": ["no", "yes"], "weight": 2}, ("binary", 2, ("no", "yes"))),
])
def test_inferred_and_completed_declarations(tmp_path, column, entry, want):
    d, inferred = infer_decl(_table(tmp_path, column), "t", entry)
    assert (d.type, d.classes, tuple(d.labels)) == want and inferred == (entry is None)
    assert d.weight == (entry or {}).get("weight", 1.0)


def test_regression_statistics_by_hand(tmp_path):
    # train values 1.5, 2, 5.5 (val 100 is not used): mean 3, population std sqrt(9.5 / 3)
    t = _table(tmp_path, ["1.5", "2", "5.5", "100"], ["train", "train", "train", "val"])
    notes = {}
    d, inferred = infer_decl(t, "t", None, notes)
    assert d.type == "regression" and inferred and d.mean == 3.0 and math.isclose(d.std, math.sqrt(9.5 / 3))
    assert notes == {}                                      # not all integers: nothing to explain
    d, _ = infer_decl(t, "t", {"type": "regression", "normalize": "none"})
    assert (d.mean, d.std) == (0.0, 1.0)
    d, _ = infer_decl(t, "t", {"type": "regression", "normalize": {"mean": 5, "std": 2}})
    assert (d.mean, d.std) == (5.0, 2.0)


def _max():
    from fastdmtg.data.folder import MAX_INFERRED_CLASSES
    return MAX_INFERRED_CLASSES


def test_integers_inferred_as_regression_say_which_value_decided(tmp_path):
    t = _table(tmp_path, ["3", "-2", "1", "-7"])
    notes = {}
    assert infer_decl(t, "t", None, notes)[0].type == "regression"
    assert notes == {"t": f"'-7' at {t.path}:5:3 is not a class id 0..{_max() - 1}; declare "
                          "{\"type\": \"multiclass\"} in tasks.json if it is a class column"}
    big = str(_max() + 5)
    t = _table(tmp_path, ["3", big, "1"])
    notes = {}
    infer_decl(t, "t", None, notes)
    assert notes["t"].startswith(f"'{big}' at {t.path}:3:3 is not a class id")


@pytest.mark.parametrize("column, entry, message", [
    (["", ""], None, "{path}: column 't' (column 3): no label in the training split (every cell is empty)"),
    (["x", "x"], None, "{path}: column 't' (column 3): a single value ('x') in the training split — a task needs "
                       "at least two (drop the column, or label more samples)"),
    (["1", "1.0"], None, "{path}: column 't' (column 3): a single value ('1') in the training split — a task needs "
                         "at least two (drop the column, or label more samples)"),
    (["x", "y", "z"], None, "{path}:2:3 (column 't'): 'x' is not a number and the column has 3 distinct values: a "
                            "task is binary (2 values), multiclass (class ids 0..C-1, or names listed in tasks.json) "
                            "or regression (numbers)"),
    (["a", "b", "c"], {"type": "binary"}, "{path}: column 't' (column 3): declared binary but the training split has "
                                          "3 distinct values ['a', 'b', 'c']"),
    (["a", "b"], {"type": "binary", "labels": ["a", "b", "c"]},
     "{dir}/tasks.json: task 't': a binary task has 2 labels, got ['a', 'b', 'c']"),
    (["0", "1.5", "1"], {"type": "multiclass"}, "{path}:3:3 (column 't'): multiclass values are class ids 0..C-1, "
                                                "got '1.5'"),
    (["0", "a", "1"], {"type": "multiclass"}, "{path}:3:3 (column 't'): multiclass values are class ids 0..C-1, "
                                              "got 'a'"),
    (["0", "1"], {"type": "multiclass", "classes": 3, "labels": ["a", "b"]},
     "{dir}/tasks.json: task 't': 2 labels for 3 classes"),
    (["1", "b", "2"], {"type": "regression"}, "{path}:3:3 (column 't'): regression values are finite numbers, "
                                              "got 'b'"),
])
def test_declaration_errors(tmp_path, column, entry, message):
    t = _table(tmp_path, column)
    with pytest.raises(FolderFormatError) as e:
        infer_decl(t, "t", entry)
    assert str(e.value) == message.format(path=t.path, dir=t.path.parent)


def test_file_formats_cache_ids_by_hand(tmp_path):
    """The decode caches of the file formats are named by (format, resolved root, image size, decoder
    version, limits in effect): the same key as before the two formats shared Dataset.cache_id, so
    caches written earlier stay valid."""
    from celeba_fixture import write_celeba
    from folder_fixture import mixed_folder

    from fastdmtg.data.celeba import CelebADataset
    from fastdmtg.data.folder import FolderDataset
    write_celeba(tmp_path / "c")
    ds = CelebADataset(tmp_path / "c", None, 16, limits={"train": 5, "val": 0})
    assert ds.cache_id() == {"dataset": "celeba", "root": str((tmp_path / "c").resolve()),
                             "params": {"image_size": 16, "decode_version": 1}, "limits": {"train": 5}}
    root = mixed_folder(tmp_path / "f")
    ds = FolderDataset(root, None, 8)
    assert ds.cache_id() == {"dataset": "folder", "root": str(root.resolve()),
                             "params": {"image_size": 8, "decode_version": 2}, "limits": {}}
