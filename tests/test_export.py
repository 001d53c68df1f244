"""`fastdmtg export RUN --format onnx|torchscript`: the grouped model with each task's post-processing
gives what `fastdmtg predict` gives on the same images (class probabilities, regression values in the
data's units), any batch size; the file describes its input and outputs; an unfinished run is a clear
error."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdmtg.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from folder_fixture import mixed_folder  # noqa: E402

TINY = ["--quiet", "--set", "data.image_size=16", "--set", "model.width=2", "--set", "train.batch_size=4",
        "--set", "train.eval_batch_size=4", "--set", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A finished run on your own tasks (smile binary no/yes, hair 3 classes, age regression), three
    images of other sizes, and `fastdmtg predict`'s CSV and Python predictions for them."""
    from PIL import Image

    from fastdmtg import load_grouped
    tmp = tmp_path_factory.mktemp("export")
    run = tmp / "run"
    root = mixed_folder(tmp / "data", n=16)
    assert main(["train", "--out", str(run), "--data-root", str(root), "--set", "train.epochs=2",
                 "--set", f"data.cache_dir={tmp / 'cache'}", *TINY]) == 0
    imgs = []
    for i, (h, w) in enumerate([(24, 20), (16, 16), (9, 31)]):
        imgs.append(tmp / f"x{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs[-1])
    assert main(["predict", str(run), *map(str, imgs), "--out", str(tmp / "p.csv")]) == 0
    with open(tmp / "p.csv") as f:
        rows = list(csv.DictReader(f))
    model, meta = load_grouped(run)
    want = model.predict([str(p) for p in imgs], details=True)          # what the predict command uses
    return run, imgs, rows, want, meta


def _prepared(imgs, meta):
    """The documented input: each image resized to S x S as in training, then / 255 (B, 3, S, S)."""
    from fastdmtg.predict import prepare_images
    return prepare_images([str(p) for p in imgs], meta["image_size"], meta["config"]["data"]["dataset"])


def _check_against_predict(got: dict, rows, want):
    """Exported outputs (task → tensor) = `fastdmtg predict`: the CSV's classes, probabilities (4
    decimals) and values (6 digits), and the Python predictions to float32 rounding."""
    assert list(got) == ["smile", "hair", "age"]
    for t in ("smile", "hair"):
        p = got[t]
        assert p.shape == want[t]["probabilities"].shape
        torch.testing.assert_close(p, want[t]["probabilities"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.sum(-1), torch.ones(len(rows)))
        for i, r in enumerate(rows):
            k = int(want[t]["class"][i])                 # the CSV writes the class's label name
            assert r[t] == str(want[t]["label"][i]) and int(p[i].argmax()) == k
            assert float(r[f"{t}:p"]) == pytest.approx(float(p[i, k]), abs=6e-5)
    assert got["age"].shape == (len(rows),)
    torch.testing.assert_close(got["age"], want["age"]["value"], rtol=1e-5, atol=1e-5)
    for i, r in enumerate(rows):
        assert float(r["age"]) == pytest.approx(float(got["age"][i]), rel=1e-5)


def test_torchscript_export_gives_predicts_values(folder_run, tmp_path, capsys):
    run, imgs, rows, want, meta = folder_run
    out = tmp_path / "m.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"torchscript: {out}" in printed and "output age: value in the data's units" in printed
    extra = {"fastdmtg.json": ""}
    m = torch.jit.load(str(out), _extra_files=extra)
    info = json.loads(extra["fastdmtg.json"])
    assert info["input"]["shape"] == ["batch", 3, 16, 16] and info["input"]["range"] == [0.0, 1.0]
    assert [o["name"] for o in info["outputs"]] == ["smile", "hair", "age"]
    assert info["outputs"][0]["labels"] == ["no", "yes"]
    with torch.no_grad():
        got = m(_prepared(imgs, meta))                       # 3 images; traced with a batch of 2
    _check_against_predict({k: v for k, v in got.items()}, rows, want)
    with torch.no_grad():
        one = m(_prepared(imgs[:1], meta))
    torch.testing.assert_close(one["age"], got["age"][:1], rtol=1e-5, atol=1e-5)


def test_onnx_export_gives_predicts_values_with_a_dynamic_batch(folder_run, tmp_path):
    for m in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} not installed (pip install 'fastdmtg[export]')")
    import onnx
    import onnxruntime as ort
    run, imgs, rows, want, meta = folder_run
    assert main(["export", str(run), "--format", "onnx"]) == 0
    path = run / "grouped_model.onnx"
    proto = onnx.load(str(path))
    info = json.loads({p.key: p.value for p in proto.metadata_props}["fastdmtg"])
    assert info["outputs"][2] == {"name": "age", "output": "value", "std": pytest.approx(info["outputs"][2]["std"]),
                                  "mean": pytest.approx(info["outputs"][2]["mean"])}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["smile", "hair", "age"]
    assert not isinstance(sess.get_inputs()[0].shape[0], int)            # the batch axis is dynamic
    x = _prepared(imgs, meta).numpy()
    got = dict(zip(["smile", "hair", "age"], (torch.from_numpy(a) for a in sess.run(None, {"image": x}))))
    _check_against_predict(got, rows, want)
    single = sess.run(["age"], {"image": x[2:3]})[0]
    assert single.shape == (1,) and single[0] == pytest.approx(float(got["age"][2]), rel=1e-5)


def test_output_plan_matches_predictions_for_every_task_kind():
    """One post-processing rule (fastdmtg.predict.output_plan) for the exported graph and for
    predictions, checked against PyTorch written out here: CelebA-style attributes (stacked (N, B, C),
    softmax over the classes), Taskonomy (segmentation softmax over dim 1, dense maps as they are), your
    own tasks (softmax with the labels as written, y * std + mean) — and your own tasks' own
    GenericTaskSet.predictions gives the same."""
    from fastdmtg.export import Exportable
    from fastdmtg.predict import output_plan, predictions
    from fastdmtg.tasks.attributes import AttributeTaskSet
    from fastdmtg.tasks.generic import GenericTaskSet, TaskDecl
    from fastdmtg.tasks.taskonomy import TaskonomyTaskSet
    g = torch.Generator().manual_seed(0)
    att = torch.randn(3, 4, 2, generator=g)
    tx = [torch.randn(4, 18, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g),
          torch.randn(4, 3, 8, 8, generator=g)]
    own = [torch.randn(4, 1, generator=g), torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g)]
    generic = GenericTaskSet([TaskDecl("r", "regression", mean=31.5, std=4.25), TaskDecl("m", "multiclass", classes=4),
                              TaskDecl("b", "binary", classes=2, labels=("no", "yes"))])
    cases = [  # (task set, raw outputs, {task: (what, its value by hand)})
        (AttributeTaskSet(["a", "b", "c"]), att, {t: ("probabilities", att[i].softmax(-1)) for i, t in enumerate("abc")}),
        (TaskonomyTaskSet(["segment_semantic", "depth_zbuffer", "normal"]), tx,
         {"segment_semantic": ("probabilities", tx[0].softmax(1)), "depth_zbuffer": ("value", tx[1]),
          "normal": ("value", tx[2])}),
        (generic, own, {"r": ("value", own[0][:, 0] * 4.25 + 31.5), "m": ("probabilities", own[1].softmax(-1)),
                        "b": ("probabilities", own[2].softmax(-1))}),
    ]
    for ts, raw, hand in cases:
        want = predictions(raw, ts)
        got = Exportable(lambda x, raw=raw: raw, output_plan(ts))(None)
        assert len(got) == len(ts.specs) and list(want) == [s.name for s in ts.specs]
        for spec, o in zip(ts.specs, got):
            what, ref = hand[spec.name]
            torch.testing.assert_close(o, ref, rtol=0, atol=0, msg=f"{type(ts).__name__} {spec.name}")
            torch.testing.assert_close(want[spec.name][what], ref, rtol=0, atol=0)
            if what == "probabilities":
                torch.testing.assert_close(want[spec.name]["class"], ref.argmax(1 if spec.kind == "segment" else -1))
    p = predictions(own, generic)
    assert p["b"]["label"] == [("no", "yes")[int(c)] for c in own[2].argmax(-1)]
    assert p["m"]["label"] == own[1].argmax(-1).tolist()
    assert predictions(att, cases[0][0])["a"]["label"] == att[0].argmax(-1).tolist()
    assert "label" not in predictions(tx, cases[1][0])["segment_semantic"]
    theirs = generic.predictions(own)
    for t in p:
        assert p[t].keys() == theirs[t].keys()
        for k, v in p[t].items():
            assert v == theirs[t][k] if isinstance(v, list) else torch.equal(v, theirs[t][k]), (t, k)


def test_an_unfinished_or_missing_run_is_a_clear_error(tmp_path, capsys):
    from fastdmtg.config import apply_overrides, get_recipe
    from fastdmtg.train import TrainingInterrupted, train
    run = tmp_path / "run"
    cfg = apply_overrides(get_recipe("synthetic_k3"), [
        "train.progress=false", "train.tensorboard=false", "data.synthetic_train=128", "data.synthetic_val=32",
        "data.synthetic_test=32", "train.batch_size=64", "model.width=2", "data.image_size=16", "train.epochs=2"])
    with pytest.raises(TrainingInterrupted):
        train(cfg, run, stop_after_steps=3)                   # in epoch 2: last.pt, no grouped model
    assert main(["export", str(run), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run}: the run has not finished (no grouped_model.json yet); continue it with: "
                   f"fastdmtg train --resume {run}"]
    assert not list(run.glob("grouped_model.*"))
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such run folder"
