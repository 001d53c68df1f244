"""Taskonomy-5: raw format parsing/decoding, prepared format, batches, models, losses, metrics.

Runs on CPU in well under a minute: fixture images are 32×32 (the networks need multiples of 16).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastdmtg.config import DataConfig, ModelConfig
from fastdmtg.data.taskonomy import TASKONOMY_5
from fastdmtg.data import taskonomy as tx
from fastdmtg.data.taskonomy import TaskonomyFormatError
from fastdmtg.models import build_multibranch, build_parts
from fastdmtg.models import xception as X
from fastdmtg.pipelines import build_source, flip_flags
from fastdmtg.tasks.taskonomy import TaskonomyTaskSet, rotate_l1

from taskonomy_fixture import path_of, write_fixture, write_png

SIZE = 32


def _cfg(root, **kw) -> DataConfig:
    base = dict(dataset="taskonomy", root=str(root), image_size=SIZE, tasks="taskonomy5", num_workers=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("tx") / "raw", layout="domain", size=SIZE)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("txp") / "prep"
    tx.prepare(raw["root"], out, SIZE, split_file=raw["split_file"], workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def source(prepared):
    return build_source(_cfg(prepared, backend="memory"), progress=False)


# ------------------------------------------------------------------------------------------ layout
def test_layouts_detected_and_equivalent(raw, prepared, tmp_path):
    other = write_fixture(tmp_path / "raw_b", layout="building", size=SIZE)   # same seed → same content
    assert tx.detect_layout(raw["root"]) == tx.LAYOUT_DOMAIN_FIRST
    assert tx.detect_layout(other["root"]) == tx.LAYOUT_BUILDING_FIRST
    out = tx.prepare(other["root"], tmp_path / "prep_b", SIZE, split_file=other["split_file"], workers=1,
                     progress=False)
    ia, ib = tx.read_index(prepared), tx.read_index(out)
    assert ia["info"]["layout"] == "domain/building" and ib["info"]["layout"] == "building/domain"
    for s in tx.SPLITS:
        assert ia["splits"][s]["info"]["samples"] == ib["splits"][s]["info"]["samples"]
        for d in tx.DOMAINS:
            assert np.array_equal(np.load(prepared / s / f"{d}.npy"), np.load(out / s / f"{d}.npy"))


def test_mixed_and_unknown_layout(raw, tmp_path):
    mixed = write_fixture(tmp_path / "mixed", layout="domain", size=SIZE)["root"]
    (mixed / "alpha" / "rgb").mkdir(parents=True)                            # + a per-building folder
    with pytest.raises(TaskonomyFormatError, match="mixed layout"):
        tx.detect_layout(mixed)
    (tmp_path / "junk" / "stuff").mkdir(parents=True)
    with pytest.raises(TaskonomyFormatError, match="not a Taskonomy root"):
        tx.detect_layout(tmp_path / "junk")
    with pytest.raises(TaskonomyFormatError, match="not found"):
        tx.detect_layout(tmp_path / "nowhere")


def test_sample_order_is_numeric(raw, source):
    ids = source.dataset.sample_ids("train")
    assert ids == sorted(ids) and ids[0] == ("alpha", 1, 0) and len(ids) == 6
    assert source.num_samples("val") == 3 and source.num_samples("test") == 3


def test_split_file_errors(raw, tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"train": ["alpha"], "val": ["alpha"], "test": ["delta"]}))
    with pytest.raises(TaskonomyFormatError, match="in train and in val/test"):
        tx.load_split(bad)
    bad.write_text('{"train": ["alpha"], "val": []}')
    with pytest.raises(TaskonomyFormatError, match='"val" must be a non-empty list'):
        tx.load_split(bad)
    bad.write_text("{oops")
    with pytest.raises(TaskonomyFormatError, match=r"s\.json:1: not valid JSON"):
        tx.load_split(bad)
    assert tx.load_split(None)["val"] == ["wiconisco", "corozal", "collierville", "markleeville", "darden"]
    assert len(tx.load_split(None)["train"]) == 25


def test_missing_building_named(raw, tmp_path):
    split = tmp_path / "s.json"
    split.write_text(json.dumps({"train": ["alpha", "zulu"], "val": ["charlie"], "test": ["delta"]}))
    with pytest.raises(TaskonomyFormatError, match=r"\['zulu'\]"):
        tx.prepare(raw["root"], tmp_path / "o", SIZE, split_file=split, progress=False)
    # the default (tiny) split names real buildings the fixture lacks
    with pytest.raises(TaskonomyFormatError, match="hanson"):
        tx.prepare(raw["root"], tmp_path / "o2", SIZE, progress=False)


# ------------------------------------------------------------------------------------------ decoding
def test_decoded_values_match_reference_normalisation(raw, source):
    batch = next(source.batches("train", 6, shuffle=False, train=False))
    ids = source.dataset.sample_ids("train")
    for j, key in enumerate(ids):
        a = raw["arrays"][key]
        d = a["depth_zbuffer"].astype(np.float64)
        t = batch["targets"]
        assert np.allclose(t["depth_zbuffer"][j, 0].numpy(), (d - 1500) / 1000, atol=1e-6)
        assert np.array_equal(batch["mask"][j, 0].numpy(), a["depth_zbuffer"] < 8192)
        assert np.allclose(t["normal"][j].numpy(), (a["normal"].transpose(2, 0, 1) / 255 - 0.5) * 2, atol=1e-6)
        assert np.allclose(t["keypoints2d"][j, 0].numpy(), (a["keypoints2d"] - 50.0) / 100, atol=1e-6)
        assert np.allclose(t["edge_texture"][j, 0].numpy(), (a["edge_texture"] - 718.0) / 1070, atol=1e-6)
        assert np.array_equal(t["segment_semantic"][j].numpy(), a["segment_semantic"])
        assert np.allclose(batch["image"][j].numpy(), a["rgb"].transpose(2, 0, 1) / 255, atol=1e-7)
    assert batch["targets"]["segment_semantic"].dtype == torch.int64
    assert batch["targets"]["segment_semantic"].shape == (6, SIZE, SIZE)
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (6, 1, SIZE, SIZE)


def test_known_16bit_values(tmp_path):
    d = np.array([[0, 1500], [8191, 8192]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)   # 16×16
    write_png(tmp_path / "d.png", d)
    got = tx.load_domain(tmp_path / "d.png", "depth_zbuffer")
    assert got.dtype == np.uint16 and got.shape == (1, 16, 16) and np.array_equal(got[0], d)
    raw = {"rgb": torch.zeros(1, 3, 16, 16, dtype=torch.uint8),
           "depth_zbuffer": torch.from_numpy(got[None].view(np.int16))}
    b = tx.make_batch(raw, ["depth_zbuffer"], None)
    assert b["targets"]["depth_zbuffer"][0, 0, 0, ::8].tolist() == [-1.5, 0.0]
    assert b["targets"]["depth_zbuffer"][0, 0, 8, ::8].tolist() == pytest.approx([6.691, 6.692])
    assert b["mask"][0, 0, 8, ::8].tolist() == [True, False] and bool(b["mask"][0, 0, 0, 0])
    big = np.full((16, 16), 65535, np.uint16)                                # > int16 range survives the bit-cast
    write_png(tmp_path / "e.png", big)
    e = tx.load_domain(tmp_path / "e.png", "edge_texture")
    b = tx.make_batch({"rgb": raw["rgb"], "edge_texture": torch.from_numpy(e[None].view(np.int16))},
                      ["edge_texture"], None)
    assert float(b["targets"]["edge_texture"][0, 0, 0, 0]) == pytest.approx((65535 - 718) / 1070)


def test_resize_matches_pil_bilinear_and_nearest_keeps_ids():
    from PIL import Image
    rng = np.random.default_rng(1)
    a = rng.integers(0, 65535, (1, 32, 32)).astype(np.uint16)
    got = tx.resize_map(a, 16, "bilinear")
    # the reference resized with PIL BILINEAR (antialiased); PIL's float mode is its exact filter
    ref = np.asarray(Image.fromarray(a[0].astype(np.float32), mode="F").resize((16, 16), Image.BILINEAR))
    assert got.dtype == np.uint16 and np.abs(got[0].astype(np.float64) - ref).max() <= 0.51
    seg = rng.integers(0, 18, (1, 32, 32)).astype(np.uint8)
    near = tx.resize_map(seg, 16, "nearest")
    assert np.array_equal(near[0], seg[0, 1::2, 1::2])                       # the pixel under each centre
    bil = tx.resize_map(seg, 16, "bilinear")                                 # the reference's bug: ids blended
    assert not np.array_equal(bil, near) and bil.max() <= 17


def test_prepare_downsamples_and_records_settings(raw, tmp_path):
    out = tx.prepare(raw["root"], tmp_path / "p16", 16, split_file=raw["split_file"], seg_resize="bilinear",
                     domains=("rgb", "segment_semantic"), splits=("val",), workers=1, progress=False)
    idx = tx.read_index(out)
    p = idx["params"]
    assert p["image_size"] == 16 and p["seg_resize"] == "bilinear" and p["domains"] == ["rgb", "segment_semantic"]
    assert idx["splits"]["val"]["info"]["source_side"] == SIZE and idx["format"] == "fastdmtg-arrays"
    assert idx["dataset"] == "taskonomy" and list(idx["splits"]) == ["val"]
    rgb = np.load(out / "val" / "rgb.npy", mmap_mode="r")
    assert rgb.shape == (3, 3, 16, 16) and rgb.dtype == np.uint8
    first = raw["arrays"][("charlie", 1, 0)]["rgb"].transpose(2, 0, 1)
    assert np.array_equal(rgb[0], tx.resize_map(first, 16, "bilinear"))


# ------------------------------------------------------------------------------------------ errors
def _one_sample_root(tmp_path, mutate):
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}
    fx = write_fixture(tmp_path / "r", size=SIZE, samples_per_building=1, split=split)
    mutate(fx["root"])
    return fx


@pytest.mark.parametrize("case,pattern", [
    ("missing", r"point_1_view_0_domain_normal\.png: missing normal label of a point 1 view 0"),
    ("eight_bit_depth", r"domain_depth_zbuffer\.png: expected a 16-bit grayscale PNG for depth_zbuffer, found 8-bit grayscale"),
    ("rgb_depth", r"domain_depth_zbuffer\.png: expected a 16-bit grayscale PNG .* found 8-bit RGB"),
    ("not_square", r"domain_edge_texture\.png: image is 32x16; Taskonomy images are square"),
    ("wrong_size", r"domain_keypoints2d\.png: image is 16x16, expected 32x32"),
    ("truncated", r"domain_segmentsemantic\.png: unreadable or truncated PNG"),
    ("not_png", r"domain_normal\.png: not a PNG file"),
    ("bad_class", r"domain_segmentsemantic\.png: class id 200 out of range"),
    ("bad_name", r"point_x_domain_rgb\.png: unexpected file name"),
])
def test_format_errors_name_the_file(tmp_path, case, pattern):
    def mutate(root):
        f = lambda d: path_of(root, "domain", d, "a", 1, 0)   # noqa: E731
        if case == "missing":
            f("normal").unlink()
        elif case == "eight_bit_depth":
            write_png(f("depth_zbuffer"), np.zeros((SIZE, SIZE), np.uint8))
        elif case == "rgb_depth":
            write_png(f("depth_zbuffer"), np.zeros((SIZE, SIZE, 3), np.uint8))
        elif case == "not_square":
            write_png(f("edge_texture"), np.zeros((16, SIZE), np.uint16))
        elif case == "wrong_size":
            write_png(f("keypoints2d"), np.zeros((16, 16), np.uint16))
        elif case == "truncated":
            data = f("segment_semantic").read_bytes()
            f("segment_semantic").write_bytes(data[: len(data) // 2])
        elif case == "not_png":
            f("normal").write_bytes(b"GIF89a" + bytes(40))
        elif case == "bad_class":
            write_png(f("segment_semantic"), np.full((SIZE, SIZE), 200, np.uint8))
        elif case == "bad_name":
            write_png(root / "rgb" / "a" / "point_x_domain_rgb.png", np.zeros((SIZE, SIZE, 3), np.uint8))
    fx = _one_sample_root(tmp_path, mutate)
    with pytest.raises(TaskonomyFormatError, match=pattern):
        tx.prepare(fx["root"], tmp_path / "out", SIZE, split_file=fx["split_file"], workers=1, progress=False)
    assert not list((tmp_path / "out").glob(".train.tmp-*"))                # no half-written split left


def test_rerun_skips_done_splits_and_refuses_other_settings(raw, prepared, monkeypatch):
    before = (prepared / "train" / "rgb.npy").stat().st_mtime_ns

    def boom(job):
        raise AssertionError("a finished split was converted again")
    from fastdmtg.data import base
    monkeypatch.setattr(base, "_decode_chunk", boom)
    tx.prepare(raw["root"], prepared, SIZE, split_file=raw["split_file"], workers=1, progress=False)
    assert (prepared / "train" / "rgb.npy").stat().st_mtime_ns == before
    with pytest.raises(TaskonomyFormatError, match="image_size=32"):
        tx.prepare(raw["root"], prepared, 16, split_file=raw["split_file"], progress=False)
    with pytest.raises(TaskonomyFormatError, match="prepared at image_size 32"):
        build_source(_cfg(prepared, image_size=64), progress=False)
    with pytest.raises(TaskonomyFormatError, match="taskonomy_seg_resize"):
        build_source(_cfg(prepared, taskonomy_seg_resize="bilinear"), progress=False)


def test_build_source_from_raw_root_prepares_into_cache(raw, tmp_path):
    cfg = _cfg(raw["root"], taskonomy_split_file=str(raw["split_file"]), cache_dir=str(tmp_path / "cache"),
               tasks="segment_semantic,normal", limit_train=4, limit_eval=2)
    src = build_source(cfg, progress=False, validate=True)
    assert src.num_samples("train") == 4 and src.num_samples("test") == 2
    assert src.dataset.domains == ("rgb", "depth_zbuffer", "normal", "segment_semantic")   # depth for the mask
    folder = next((tmp_path / "cache").iterdir())
    assert (folder / "index.json").is_file() and not (folder / "train" / "edge_texture.npy").exists()
    b = next(src.batches("val", 2, shuffle=False))
    assert set(b["targets"]) == {"segment_semantic", "normal"}
    assert src.taskset.names == ["segment_semantic", "normal"] and src.image_size == SIZE


# ------------------------------------------------------------------------------------------ batches
def _collect(src, **kw):
    return [{"image": b["image"], "mask": b["mask"], **b["targets"]} for b in src.batches("train", 2, **kw)]


def test_order_deterministic_and_skip_resumes_exactly(source):
    a = _collect(source, shuffle=True, seed=3, epoch=1, train=True)
    b = _collect(source, shuffle=True, seed=3, epoch=1, train=True)
    c = _collect(source, shuffle=True, seed=3, epoch=1, train=True, skip=1)
    d = _collect(source, shuffle=True, seed=3, epoch=2, train=True)
    assert len(a) == 3 and len(c) == 2
    same = lambda x, y: all(torch.equal(x[k], y[k]) for k in x)   # noqa: E731
    assert all(same(x, y) for x, y in zip(a, b))
    assert all(same(x, y) for x, y in zip(a[1:], c))
    assert not all(same(x, y) for x, y in zip(a, d))


def test_flip_flips_every_map_and_negates_normal_x(source):
    n = source.num_samples("train")
    flags = flip_flags(n, 5, 0)
    assert 0 < int(flags.sum()) < n           # the fixture's seed flips some samples, not all
    plain = next(source.batches("train", n, shuffle=False, train=False))
    aug = next(source.batches("train", n, shuffle=False, seed=5, epoch=0, train=True))
    for j in range(n):
        f = (lambda x: x.flip(-1)) if flags[j] else (lambda x: x)   # noqa: E731
        assert torch.equal(aug["image"][j], f(plain["image"][j]))
        assert torch.equal(aug["mask"][j], f(plain["mask"][j]))
        for t in ("depth_zbuffer", "keypoints2d", "edge_texture", "segment_semantic"):
            assert torch.equal(aug["targets"][t][j], f(plain["targets"][t][j]))
        nrm = f(plain["targets"]["normal"][j]).clone()
        if flags[j]:
            nrm[0] = -nrm[0]
        assert torch.equal(aug["targets"]["normal"][j], nrm)


def test_worker_processes_give_the_same_batches(prepared, source):
    """Streamed from the memory-mapped files (nothing may be held: fraction 0) by 2 worker processes."""
    src2 = build_source(_cfg(prepared, backend="memory", num_workers=2), progress=False, device_fraction=0.0)
    a = _collect(source, shuffle=True, seed=1, epoch=0, train=True)
    b = _collect(src2, shuffle=True, seed=1, epoch=0, train=True)
    assert src2.placement["train"] == "stream" and len(a) == len(b)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


# ------------------------------------------------------------------------------------------ models
TS = TaskonomyTaskSet(TASKONOMY_5)
N_PARAMS = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
DECODERS = 520225 + 520803 + 525138 + 2 * 520225      # seg (18) + depth (1) + normal (3) + kp + edges


def test_xception_parameter_counts_match_reference():
    sh, br = X.split_encoder(4)
    assert (N_PARAMS(sh), N_PARAMS(br)) == (5_169_464, 11_678_144)   # reference ≈ 5.17 M / 11.68 M
    assert [N_PARAMS(X.Decoder(c)) for c in (1, 3, 18)] == [520_225, 520_803, 525_138]   # ≈ 0.52 M
    total = 5_169_464 + 11_678_144
    for s in (0, 1, 3, 6, 7, 9, 11):
        sh, br = X.split_encoder(s)
        assert N_PARAMS(sh) + N_PARAMS(br) == total
    with pytest.raises(ValueError, match="0..11"):
        X.split_encoder(12)


@pytest.mark.parametrize("k,shared", [(1, 4), (3, 0), (3, 3), (3, 6), (3, 9)])
def test_xception_output_shapes(k, shared):
    torch.manual_seed(0)
    model = build_multibranch(ModelConfig(arch="xception", branches=k, shared_blocks=shared), TS.specs, 64)
    sh, br = X.split_encoder(shared)
    assert N_PARAMS(model) == N_PARAMS(sh) + k * (N_PARAMS(br) + DECODERS)
    assert model.branch_grad_scale == model.head_grad_scale == pytest.approx(1 / math.sqrt(k))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(k, 2, c, 64, 64) for c in (18, 1, 3, 1, 1)]
    assert len(model.heads[0].heads) == 5


def test_grad_scale_none_and_odd_size():
    p = build_parts(ModelConfig(arch="xception", branches=4, grad_scale="none"), TS.specs, 64)
    assert p.branch_grad_scale == p.head_grad_scale == 1.0
    p = build_parts(ModelConfig(arch="xception", branches=4), TS.specs, 64)
    assert p.branch_grad_scale == p.head_grad_scale == 0.5
    with pytest.raises(ValueError, match="multiple of 16"):
        build_parts(ModelConfig(arch="xception"), TS.specs, 40)


def test_vit_shapes_and_counts():
    from fastdmtg.models import vit
    torch.manual_seed(0)
    model = build_multibranch(ModelConfig(arch="vit_base", branches=2, shared_blocks=11), TS.specs, 32)
    layer = 7_087_872                                          # 4·768² + 2·768·3072 + biases + 2 LN
    assert N_PARAMS(vit.Layer()) == layer
    patch = 3 * 16 * 16 * 768 + 768 + 4 * 768                  # conv + bias + 2×2 position embeddings
    tomap = 2 * 768 + 768 * 512 + 512
    assert N_PARAMS(model.shared) == patch + 11 * layer
    assert N_PARAMS(model.branches[0]) == layer + tomap
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 2, c, 32, 32) for c in (18, 1, 3, 1, 1)]


# ------------------------------------------------------------------------------------------ pretrained ViT
_TINY = {"DIM": 32, "HEADS": 4, "MLP": 64}                 # the ViT-B/16 layout at a test's size


def _timm_state_dict(grid: int, seed: int = 0) -> dict:
    """Random tensors under timm's vit_base_patch16_224 key names (timm/models/vision_transformer.py:
    VisionTransformer, Block, Attention, Mlp), at the _TINY width: class token and position embedding
    over 1 + grid² tokens, 12 blocks, final norm, a 10-class head."""
    g = torch.Generator().manual_seed(seed)
    d, m = _TINY["DIM"], _TINY["MLP"]
    r = lambda *shape: torch.randn(*shape, generator=g)         # noqa: E731
    sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, 1 + grid * grid, d),
          "patch_embed.proj.weight": r(d, 3, 16, 16), "patch_embed.proj.bias": r(d)}
    for i in range(12):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                   b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                   b + "norm2.weight": r(d), b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(m, d),
                   b + "mlp.fc1.bias": r(m), b + "mlp.fc2.weight": r(d, m), b + "mlp.fc2.bias": r(d)})
    sd.update({"norm.weight": r(d), "norm.bias": r(d), "head.weight": r(10, d), "head.bias": r(10)})
    return sd


def _as_torchvision(sd: dict) -> dict:
    """The same tensors under torchvision's vit_b_16 names (torchvision/models/vision_transformer.py)."""
    out = {"class_token": sd["cls_token"], "encoder.pos_embedding": sd["pos_embed"],
           "conv_proj.weight": sd["patch_embed.proj.weight"], "conv_proj.bias": sd["patch_embed.proj.bias"],
           "encoder.ln.weight": sd["norm.weight"], "encoder.ln.bias": sd["norm.bias"],
           "heads.head.weight": sd["head.weight"], "heads.head.bias": sd["head.bias"]}
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
             "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
             "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for a, b in names.items():
                rest = rest.replace(a, b) if rest.startswith(a) else rest
            out[f"encoder.layers.encoder_layer_{i}.{rest}"] = v
    return out


def _timm_block(sd: dict, i: int, x: torch.Tensor) -> torch.Tensor:
    """timm's Block.forward written out from the file's tensors: x + proj(attn(norm1 x)), then
    x + fc2(gelu(fc1(norm2 x))); LayerNorm eps 1e-6, heads split from qkv as (3, heads, head_dim)."""
    import torch.nn.functional as F
    b, d, h = f"blocks.{i}.", _TINY["DIM"], _TINY["HEADS"]
    y = F.layer_norm(x, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
    q, k, v = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).view(
        x.shape[0], x.shape[1], 3, h, d // h).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), -1) @ v           # (B, H, L, d_h)
    x = x + F.linear(a.transpose(1, 2).reshape(x.shape), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
    y = F.layer_norm(x, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
    y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                 sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return x + y


@pytest.mark.parametrize("layout", ["timm", "torchvision"])
@pytest.mark.parametrize("shared", [0, 2])
def test_vit_loads_a_pretrained_state_dict_file(tmp_path, monkeypatch, layout, shared):
    """model.pretrained=FILE: every encoder tensor of the file lands in its place in the shared part and
    in all K branches; the class token's position entry is dropped (this encoder has none); each layer
    computes timm's block on the file's tensors; the 1×1 projection keeps its initialisation."""
    from fastdmtg.models import vit
    for k, v in _TINY.items():
        monkeypatch.setattr(vit, k, v)
    sd = _timm_state_dict(grid=2)                                   # 32×32 input: a 2×2 grid, as the model
    path = tmp_path / f"{layout}.pth"
    torch.save(sd if layout == "timm" else _as_torchvision(sd), path)
    cfg = ModelConfig(arch="vit_base", branches=2, shared_blocks=shared, pretrained=str(path))
    specs = TaskonomyTaskSet(["depth_zbuffer"]).specs
    torch.manual_seed(0)
    model = build_multibranch(cfg, specs, 32)
    torch.manual_seed(0)
    scratch = build_multibranch(ModelConfig(arch="vit_base", branches=2, shared_blocks=shared), specs, 32)
    for k in range(2):
        mods = (list(model.shared) if shared else []) + list(model.branches[k])
        patch = next(m for m in mods if isinstance(m, vit.PatchEmbed))
        layers = [m for m in mods if isinstance(m, vit.Layer)]
        end = mods[-1]
        assert len(layers) == 12 and isinstance(end, vit.ToMap)
        assert torch.equal(patch.proj.weight, sd["patch_embed.proj.weight"])
        assert torch.equal(patch.proj.bias, sd["patch_embed.proj.bias"])
        assert torch.equal(patch.pos, sd["pos_embed"][:, 1:])
        assert torch.equal(end.norm.weight, sd["norm.weight"]) and torch.equal(end.norm.bias, sd["norm.bias"])
        scratch_end = list(scratch.branches[k])[-1]
        assert torch.equal(end.proj.weight, scratch_end.proj.weight)        # not in the file: initialised
        x = torch.randn(2, 4, _TINY["DIM"], generator=torch.Generator().manual_seed(k))
        for i, layer in enumerate(layers):
            with torch.no_grad():
                assert torch.allclose(layer(x), _timm_block(sd, i, x), rtol=1e-5, atol=1e-4), (k, i)


def test_vit_pretrained_resamples_another_grid(tmp_path, monkeypatch):
    """A file made for another image size (3×3 grid + class token) → the grid resampled bicubically to
    the model's 2×2, as timm does (PyTorch's interpolate as the reference)."""
    import torch.nn.functional as F
    from fastdmtg.models import vit
    for k, v in _TINY.items():
        monkeypatch.setattr(vit, k, v)
    sd = _timm_state_dict(grid=3)
    torch.save(sd, tmp_path / "w.pth")
    parts = build_parts(ModelConfig(arch="vit_base", branches=1, shared_blocks=1, pretrained=str(tmp_path / "w.pth")),
                        TaskonomyTaskSet(["depth_zbuffer"]).specs, 32)
    grid = sd["pos_embed"][:, 1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 4, -1)
    assert torch.allclose(parts.shared[0].pos, want)


def test_vit_pretrained_errors_name_the_file_and_the_key(tmp_path, monkeypatch):
    from fastdmtg.config import ConfigError
    from fastdmtg.models import vit
    for k, v in _TINY.items():
        monkeypatch.setattr(vit, k, v)
    specs = TaskonomyTaskSet(["depth_zbuffer"]).specs

    def build(sd, name="w.pth"):
        p = tmp_path / name
        if sd is not None:
            torch.save(sd, p)
        build_parts(ModelConfig(arch="vit_base", branches=1, shared_blocks=1, pretrained=str(p)), specs, 32)
        return p
    sd = _timm_state_dict(grid=2)
    broken = {k: v for k, v in sd.items() if k != "blocks.5.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"model.pretrained: .*w.pth: key 'blocks.5.mlp.fc2.bias' missing"):
        build(broken)
    wide = dict(sd, **{"blocks.0.attn.qkv.weight": torch.zeros(3 * 48, 32)})
    with pytest.raises(ValueError, match=r"w.pth: key 'blocks.0.attn.qkv.weight' has shape \(144, 32\), "
                                         r"this vit_base expects \(96, 32\)"):
        build(wide)
    with pytest.raises(ValueError, match=r"w.pth: key 'blocks.0.ls1.gamma' has no place"):
        build(dict(sd, **{"blocks.0.ls1.gamma": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"w.pth: neither a timm nor a torchvision ViT state dict"):
        build({"conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"w.pth: expected a dict of tensors"):
        build([torch.zeros(1)])
    with pytest.raises(FileNotFoundError, match=r"model.pretrained: .*nothing.pth: no such file"):
        build(None, "nothing.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text.pth: not a readable torch state dict"):
        build(None, "text.pth")
    with pytest.raises(ConfigError, match=r"model.pretrained: model.arch=xception loads no pretrained weights "
                                          r"\(the backbones that do: vit_base\)"):
        ModelConfig(arch="xception", pretrained="w.pth")


# ------------------------------------------------------------------------------------------ losses
def _batch(b=2, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, 1, h, h, generator=g) > 0.3
    return {"targets": {"segment_semantic": torch.randint(0, 18, (b, h, h), generator=g),
                        "depth_zbuffer": torch.randn(b, 1, h, h, generator=g),
                        "normal": torch.randn(b, 3, h, h, generator=g),
                        "keypoints2d": torch.randn(b, 1, h, h, generator=g),
                        "edge_texture": torch.randn(b, 1, h, h, generator=g)},
            "mask": mask}


def _outputs(k, b=2, h=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, b, c, h, h, generator=g, requires_grad=True) for c in (18, 1, 3, 1, 1)]


def test_head_losses_match_definitions():
    import torch.nn.functional as F
    k = 3
    batch, outs = _batch(), _outputs(k)
    z = torch.softmax(torch.randn(5, k), 1).requires_grad_()
    total, L = TS.head_losses(outs, batch, z)
    t, m = batch["targets"], batch["mask"].float()
    for j in range(k):
        assert float(L[0, j]) == pytest.approx(float(F.cross_entropy(outs[0][j].detach(), t["segment_semantic"], ignore_index=0)), rel=1e-5)
        assert float(L[1, j]) == pytest.approx(float(((outs[1][j].detach() - t["depth_zbuffer"]).abs() * m).mean()), rel=1e-5)
        assert float(L[2, j]) == pytest.approx(float(((outs[2][j].detach() - t["normal"]).abs() * m).mean()), rel=1e-5)
        assert float(L[3, j]) == pytest.approx(float((outs[3][j].detach() - t["keypoints2d"]).abs().mean()), rel=1e-5)
    assert float(total.detach()) == pytest.approx(float((z.detach() * L).sum()), rel=1e-5)
    total.backward()
    assert torch.allclose(z.grad, L, rtol=1e-5)
    # masked L1 of the normals: ∂/∂pred = z[2, j] · sign(pred − t) · mask / (B·C·H·W), per head j
    for j in range(k):
        want = z[2, j].detach() * torch.sign(outs[2][j].detach() - t["normal"]) * m / t["normal"].numel()
        torch.testing.assert_close(outs[2].grad[j], want, rtol=1e-5, atol=1e-8)
    # CE over the pixels whose class != 0: ∂/∂logits = z[0, j] · (softmax − onehot) / n_valid, 0 at class-0 pixels
    seg = t["segment_semantic"]
    valid = (seg != 0)
    for j in range(k):
        p = torch.softmax(outs[0][j].detach(), dim=1) - F.one_hot(seg, 18).permute(0, 3, 1, 2).float()
        want = z[0, j].detach() * p * valid[:, None] / valid.sum()
        torch.testing.assert_close(outs[0].grad[j], want, rtol=1e-4, atol=1e-7)


def test_rotate_loss_is_min_over_nine_shifts():
    k, batch, outs = 2, _batch(h=6), _outputs(2, h=6)
    ts = TaskonomyTaskSet(TASKONOMY_5, rotate_loss=True)
    z = torch.full((5, k), 0.5, requires_grad=True)
    total, L = ts.head_losses(outs, batch, z)
    p, t, m = outs[1].detach(), batch["targets"]["depth_zbuffer"], batch["mask"].float()
    for j in range(k):
        per_sample = []
        for b in range(2):
            vals = [float(((p[j, b, :, dy:dy + 4, dx:dx + 4] - t[b, :, 1:5, 1:5]).abs() * m[b, :, 1:5, 1:5]).mean())
                    for dy in range(3) for dx in range(3)]
            per_sample.append(min(vals))
        assert float(L[1, j]) == pytest.approx(sum(per_sample) / 2, rel=1e-5)
    # a prediction shifted by one pixel has zero rotate loss
    tgt = torch.randn(1, 1, 6, 6)
    shifted = torch.roll(tgt, shifts=1, dims=-1)
    assert float(rotate_l1(shifted, tgt, None)) == pytest.approx(0.0, abs=1e-7)
    total.backward()
    assert outs[1].grad.abs().sum() > 0


def test_rotate_loss_per_sample_of_a_single_head():
    """A (B, C, H, W) prediction (the meter's call) gives one loss per sample (B,): for each sample
    the minimum over the 9 one-pixel shifts of Σ |p − t|·m / (C·(H−2)·(W−2)), written out here."""
    g = torch.Generator().manual_seed(3)
    b, c, h = 3, 3, 5
    p, t = torch.randn(b, c, h, h, generator=g), torch.randn(b, c, h, h, generator=g)
    m = torch.rand(b, 1, h, h, generator=g) > 0.4
    p[1, :, 2:, 1:4] = t[1, :, 1:4, 1:4]               # sample 1: target interior shifted by (dy, dx) = (2, 1)
    got = rotate_l1(p, t, m)
    assert got.shape == (b,)
    want = []
    for i in range(b):
        vals = []
        for dy in range(3):
            for dx in range(3):
                d = (p[i, :, dy:dy + h - 2, dx:dx + h - 2] - t[i, :, 1:h - 1, 1:h - 1]).abs()
                vals.append(float((d * m[i, :, 1:h - 1, 1:h - 1]).sum()) / (c * (h - 2) * (h - 2)))
        want.append(min(vals))
    assert want[1] == 0.0 and min(want[0], want[2]) > 0
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=0)
    # without a mask every pixel counts
    full = rotate_l1(p, t, None)
    want0 = min(float((p[0, :, dy:dy + 3, dx:dx + 3] - t[0, :, 1:4, 1:4]).abs().mean())
                for dy in range(3) for dx in range(3))
    assert float(full[0]) == pytest.approx(want0, rel=1e-6)


def test_miou_edge_cases_and_an_unknown_definition():
    """No valid pixel at all: the reference definition sums nothing (0 %, 0 classes), the mean one
    has no class to average (NaN, 0 classes). A class found only in the target (its pixels all
    predicted 0) counts in both, with IoU 0: reference (IoU_1 + IoU_3) / 18 over classes 1 and 3.
    An unknown definition is refused, naming the field."""
    from fastdmtg.tasks.taskonomy import miou_from_confusion
    empty = torch.zeros(18, 18, dtype=torch.long)
    assert miou_from_confusion(empty, "reference") == (0.0, 0)
    mean, n = miou_from_confusion(empty, "mean")
    assert math.isnan(mean) and n == 0
    c = empty.clone()
    c[1, 1], c[3, 0] = 2, 1                         # IoU_1 = 2/2, IoU_3 = 0/1
    ref, n = miou_from_confusion(c, "reference")
    assert ref == pytest.approx(100 * 1.0 / 18) and n == 2
    assert miou_from_confusion(c, "mean") == (pytest.approx(50.0), 2)
    with pytest.raises(ValueError, match="data.taskonomy_miou: expected reference|mean, got 'iou'"):
        miou_from_confusion(empty, "iou")


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_hand_computed():
    ts = TaskonomyTaskSet(TASKONOMY_5)
    meter = ts.meter()
    h = 2
    # segmentation: target [[1, 1], [2, 0]], prediction [[1, 2], [2, 5]] (last pixel ignored)
    seg_t = torch.tensor([[[1, 1], [2, 0]]])
    seg_logits = torch.zeros(1, 18, h, h)
    for (r, c), cls in {(0, 0): 1, (0, 1): 2, (1, 0): 2, (1, 1): 5}.items():
        seg_logits[0, cls, r, c] = 5.0
    # IoU(1) = 1/2 (inter {00}, union {00, 01}); IoU(2) = 1/2 (inter {10}, union {01, 10}); 5 only on an ignored pixel
    depth_t = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    depth_p = torch.tensor([[[[1.0, 1.0], [2.0, 9.0]]]])
    mask = torch.tensor([[[[True, True], [True, False]]]])   # RMSE over 3 valid pixels: sqrt(1/3)
    nrm_t = torch.zeros(1, 3, h, h)
    nrm_t[:, 2] = 1.0
    nrm_p = torch.zeros(1, 3, h, h)
    ang = torch.tensor([[10.0, 29.0], [31.0, 80.0]])         # degrees from +z in the x-z plane
    nrm_p[0, 0], nrm_p[0, 2] = torch.sin(torch.deg2rad(ang)) * 3, torch.cos(torch.deg2rad(ang)) * 3
    # keypoints: raw threshold 50 ↔ normalised 0
    kp_t = torch.tensor([[[[1.0, 1.0], [-1.0, -1.0]]]])      # positives at the top row
    kp_p = torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]]])      # TP 1, FN 1, FP 1 → F1 = 2/4
    edge_t = torch.full((1, 1, h, h), -1.0)
    edge_p = torch.full((1, 1, h, h), -0.5)                  # nothing to find, nothing found → 100
    batch = {"targets": {"segment_semantic": seg_t, "depth_zbuffer": depth_t, "normal": nrm_t,
                         "keypoints2d": kp_t, "edge_texture": edge_t}, "mask": mask}
    meter.update([seg_logits, depth_p, nrm_p, kp_p, edge_p], batch)
    r = meter.compute()
    m, e = r["metrics"], r["error"]
    # the reference definition (default): Σ IoU over classes in the target / 18; the mean one: 50 %
    assert m["segment_semantic"]["miou"] == pytest.approx(100 / 18) and m["segment_semantic"]["classes"] == 2
    assert m["segment_semantic"]["miou_mean"] == pytest.approx(50.0)
    assert m["depth_zbuffer"]["rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert m["normal"]["acc30"] == pytest.approx(200 / 3)    # 10° and 29° of the 3 valid pixels
    assert m["normal"]["mean_angle"] == pytest.approx((10 + 29 + 31) / 3, rel=1e-4)
    assert m["keypoints2d"]["f1"] == pytest.approx(50.0) and m["edge_texture"]["f1"] == 100.0
    assert e == pytest.approx({"segment_semantic": 100 - 100 / 18, "depth_zbuffer": math.sqrt(1 / 3),
                               "normal": 100 - 200 / 3, "keypoints2d": 50.0, "edge_texture": 0.0})
    assert r["loss"]["depth_zbuffer"] == pytest.approx(1 / 4)   # masked L1 over all 4 pixels
    assert r["loss"]["keypoints2d"] == pytest.approx(1.0)
    assert r["count"] == 1 and ts.unified_error is False


def test_meter_accumulates_over_the_set_not_per_batch():
    ts = TaskonomyTaskSet(["depth_zbuffer"])
    one, two = ts.meter(), ts.meter()
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    mask = torch.rand(4, 1, 4, 4, generator=g) > 0.5
    one.update([p], {"targets": {"depth_zbuffer": t}, "mask": mask})
    two.update([p[:1]], {"targets": {"depth_zbuffer": t[:1]}, "mask": mask[:1]})
    two.update([p[1:]], {"targets": {"depth_zbuffer": t[1:]}, "mask": mask[1:]})
    a, b = one.compute(), two.compute()
    assert a["loss"] == pytest.approx(b["loss"]) and a["error"] == pytest.approx(b["error"])


def test_eval_loss_mean_of_batch_means_or_set_mean_by_hand():
    """Three evaluation batches of 1, 2 and 1 samples (1×4 pixels). Segmentation: labelled pixels 1, 3
    and 0, each pixel's CE = log(e^v + 17) − v for its target logit v, every other logit 0. Keypoints:
    |p − t| = 1, 3, 0.5. set: the mean over every labelled pixel / sample of the split; batch_mean
    (the release's Averager): the plain mean of the three batches' means (a batch without a labelled
    pixel counts 0, as in training). The metrics do not depend on the switch."""
    ce = lambda v: math.log(math.exp(v) + 17) - v                   # noqa: E731
    batches = []
    for tgt, vals, kp in (([[1, 0, 0, 0]], [[0.0, 0, 0, 0]], 1.0),
                          ([[2, 2, 2, 0], [0, 0, 0, 0]], [[1.0, 2.0, 3.0, 0], [0, 0, 0, 0]], 3.0),
                          ([[0, 0, 0, 0]], [[0.0, 0, 0, 0]], 0.5)):
        t = torch.tensor(tgt).view(-1, 1, 4)
        logits = torch.zeros(len(tgt), 18, 1, 4)
        for b, (row_t, row_v) in enumerate(zip(tgt, vals)):
            for j, (c, v) in enumerate(zip(row_t, row_v)):
                logits[b, c, 0, j] = v
        n = len(tgt)
        batches.append(([logits, torch.full((n, 1, 1, 4), kp)],
                        {"targets": {"segment_semantic": t, "keypoints2d": torch.zeros(n, 1, 1, 4)}}))
    res = {}
    for mode in ("set", "batch_mean"):
        meter = TaskonomyTaskSet(["segment_semantic", "keypoints2d"], eval_loss=mode).meter()
        for out, batch in batches:
            meter.update(out, batch)
        res[mode] = meter.compute()
    c0, c123 = ce(0.0), [ce(1.0), ce(2.0), ce(3.0)]
    assert res["set"]["loss"]["segment_semantic"] == pytest.approx((c0 + sum(c123)) / 4)
    assert res["batch_mean"]["loss"]["segment_semantic"] == pytest.approx((c0 + sum(c123) / 3 + 0.0) / 3)
    assert res["set"]["loss"]["keypoints2d"] == pytest.approx((1 * 1 + 2 * 3 + 1 * 0.5) / 4)
    assert res["batch_mean"]["loss"]["keypoints2d"] == pytest.approx((1 + 3 + 0.5) / 3)
    assert res["set"]["metrics"] == res["batch_mean"]["metrics"] and res["set"]["error"] == res["batch_mean"]["error"]
    with pytest.raises(ValueError, match="data.taskonomy_eval_loss: expected set|batch_mean"):
        TaskonomyTaskSet(["keypoints2d"], eval_loss="batches")


# ------------------------------------------------------------------------------------------ end to end
def test_short_dmtg_run_on_fixture(source):
    """A few DMTG steps (Gumbel-softmax over K=2, τ=4) on the fixture + argmax evaluation."""
    from fastdmtg import ops
    from fastdmtg.models import MultiBranchNet
    torch.manual_seed(0)
    k = 2
    # shared_blocks=9: small branches keep the CPU time down; the wiring is the same at any split
    model = build_multibranch(ModelConfig(arch="xception", branches=k, shared_blocks=9), source.taskset.specs, SIZE)
    logits = torch.nn.Parameter(torch.ones(5, k))
    opt = torch.optim.Adam(list(model.parameters()) + [logits], lr=1e-3)
    seed = torch.tensor(7, dtype=torch.int64)
    losses = []
    for epoch in range(2):
        for batch in source.batches("train", 3, shuffle=True, seed=0, epoch=epoch, train=True, skip=epoch):
            z = ops.gumbel_softmax_mask(logits, 4.0, seed)                   # (N, K)
            seed += 1
            total, L = source.taskset.head_losses(model(batch["image"]), batch, z)
            opt.zero_grad()
            total.backward()
            opt.step()
            assert L.shape == (5, k) and torch.isfinite(L).all()
            losses.append(float(total.detach()))
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    model.eval()
    meter = source.taskset.meter()
    assignment = logits.detach().argmax(1)
    with torch.no_grad():
        for batch in source.batches("val", 2, shuffle=False):
            meter.update(MultiBranchNet.select_outputs(model(batch["image"]), assignment), batch)
    r = meter.compute()
    assert r["count"] == 3 and set(r["error"]) == set(TASKONOMY_5)
    assert all(math.isfinite(v) for v in r["loss"].values())


def test_train_entry_point_on_fixture(prepared, tmp_path):
    """The lead's trainer end to end (1 epoch, K=2, 32×32), when it accepts this config."""
    from fastdmtg.config import Config, GroupingConfig, OptimConfig, TrainConfig
    from fastdmtg.methods.dmtg import DMTGConfig
    from fastdmtg.train import train
    cfg = Config(name="tx_fixture", data=_cfg(prepared),
                 model=ModelConfig(arch="xception", branches=2, shared_blocks=4),
                 dmtg=DMTGConfig(tau=4.0),
                 optim=OptimConfig(name="adam", lr=1e-3, schedule="plateau", gamma=0.5),
                 train=TrainConfig(epochs=1, batch_size=3, eval_batch_size=3, device="cpu", progress=False,
                                   tensorboard=False))
    res = train(cfg, tmp_path / "run", progress=False)
    assert set(res["test"]["loss"]) == set(TASKONOMY_5)
    # the exported grouped model loads on its own and reproduces the run's test evaluation
    from fastdmtg import load_grouped
    from fastdmtg.train import evaluate
    model, meta = load_grouped(tmp_path / "run")
    data = build_source(Config.load(tmp_path / "run" / "config.json").data, progress=False)
    got = evaluate(model, data.taskset, data, "test", 3, "cpu")
    for t in TASKONOMY_5:
        assert got["loss"][t] == pytest.approx(res["test"]["loss"][t], rel=1e-4, abs=1e-6)


def test_batched_branches_with_pruning_match_per_branch_run_on_fixture(prepared, tmp_path):
    """model.batched=on for the Xception + decoders model, with head pruning forced early (τ tiny; one
    decoder is dropped at step 1 of 4 — a dying branch is covered in test_models): the same drops,
    groups and test losses as the per-branch run. (2 epochs: the drop and a step after it are there;
    the time goes mostly into writing the ~20 M-parameter checkpoints after each epoch.)"""
    from fastdmtg.config import Config, OptimConfig, TrainConfig
    from fastdmtg.methods.dmtg import DMTGConfig
    from fastdmtg.train import train

    def cfg(batched):
        return Config(name="tx_batched", data=_cfg(prepared),
                      model=ModelConfig(arch="xception", branches=3, shared_blocks=10, batched=batched),
                      dmtg=DMTGConfig(tau=0.001, prune_eps=0.3, prune_patience=1),
                      optim=OptimConfig(name="adam", lr=1e-3, schedule="none"),
                      train=TrainConfig(epochs=2, batch_size=3, eval_batch_size=3, device="cpu", progress=False,
                                        tensorboard=False, seed=0))
    sep = train(cfg("off"), tmp_path / "sep", progress=False)
    bat = train(cfg("on"), tmp_path / "bat", progress=False)
    assert bat["speed"]["batched"] and not sep["speed"]["batched"]
    key = lambda r: [(e["task"], e["branch"], e["step"]) for e in r["pruning"]["events"]]
    assert key(bat) and key(bat) == key(sep)
    assert bat["assignment"] == sep["assignment"]
    for t in TASKONOMY_5:
        assert bat["test"]["loss"][t] == pytest.approx(sep["test"]["loss"][t], rel=1e-3, abs=1e-5)


def test_annotations_resolve():
    """The loss and metric functions' annotations are valid types (strings until something such as
    typing.get_type_hints evaluates them)."""
    import typing
    from fastdmtg.tasks.taskonomy import miou_from_confusion, rotate_l1
    assert typing.get_type_hints(rotate_l1) == {"pred": torch.Tensor, "target": torch.Tensor,
                                                "mask": torch.Tensor | None, "return": torch.Tensor}
    assert typing.get_type_hints(miou_from_confusion) == {"conf": torch.Tensor, "definition": str,
                                                          "return": tuple[float, int]}


# ------------------------------------------------------------------------------------------ task set and meter, edge cases
def test_taskset_rejects_bad_arguments_and_reads_a_bare_config():
    """Unknown mIoU definition, unknown task, duplicate task: a ValueError naming the field. A config
    object without the Taskonomy switches gets the defaults (no rotate loss, reference mIoU)."""
    with pytest.raises(ValueError, match=r"data.taskonomy_miou: expected reference\|mean, got 'iou'"):
        TaskonomyTaskSet(["normal"], miou="iou")
    with pytest.raises(ValueError, match=r"data.tasks: unknown Taskonomy task\(s\) \['depth'\]"):
        TaskonomyTaskSet(["normal", "depth"])
    with pytest.raises(ValueError, match="data.tasks: duplicate task names"):
        TaskonomyTaskSet(["normal", "depth_zbuffer", "normal"])
    ts = TaskonomyTaskSet(["normal"], miou="mean")
    assert ts.miou == "mean" and ts.rotate_loss is False
    bare = TaskonomyTaskSet.from_config(["normal"], object())
    assert bare.rotate_loss is False and bare.miou == "reference"


def test_head_losses_of_a_pruned_layout_and_the_rotate_total():
    """``active``: task i's output holds only the heads active[i]; its losses equal the full
    layout's at those heads, 0 elsewhere, and the total is Σ z·L over the active heads only (so
    ∂total/∂z is L there and 0 elsewhere). With the rotate loss the total is Σ z·L too."""
    k = 3
    batch = _batch(h=6, seed=2)
    active = [[0, 2], [1], [0, 1, 2], [2], [0, 1]]
    zv = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3], [0.25, 0.25, 0.5], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    for rotate in (False, True):
        ts = TaskonomyTaskSet(TASKONOMY_5, rotate_loss=rotate)
        full = _outputs(k, h=6, seed=3)
        z = zv.clone().requires_grad_()
        total, L = ts.head_losses(full, batch, z, kernels="reference")
        total.backward()
        assert L.shape == (5, k)
        assert float(total.detach()) == pytest.approx(float((zv * L).sum()), rel=1e-6)
        torch.testing.assert_close(z.grad, L, rtol=1e-6, atol=0)     # ∂(Σ z·L)/∂z = L
        sub = [o.detach()[a].requires_grad_() for o, a in zip(full, active)]
        z2 = zv.clone().requires_grad_()
        total2, L2 = ts.head_losses(sub, batch, z2, active=active, kernels="reference")
        total2.backward()
        keep = torch.zeros(5, k, dtype=torch.bool)
        for i, a in enumerate(active):
            keep[i, a] = True
        torch.testing.assert_close(L2, torch.where(keep, L, torch.zeros(())), rtol=1e-6, atol=0)
        assert float(total2.detach()) == pytest.approx(float((zv * L * keep).sum()), rel=1e-6)
        torch.testing.assert_close(z2.grad, torch.where(keep, L, torch.zeros(())), rtol=1e-6, atol=0)


def test_meter_without_mask_by_hand():
    """No mask in the batch: every pixel counts. B = 2, H×W = 1×2 (not square), written out by hand.
    depth: errors (2, 0 | 3, 1): loss mean(1, 2) = 1.5, rmse sqrt(14/4), rmse_m = rmse·1000/512 m.
    normal, per pixel (target, prediction): (+z, +z/2) 0°; (+z, 0) a zero-length prediction, 90°,
    a miss; (+z, (1, 0, −1)) 135°; (+z/2, 3·(+z)) a short target, 0°. acc30 50 %, mean angle
    56.25°; L1 per sample (0.5 + 1)/6 and (1 + 2 + 2.5)/6. keypoints (normalised threshold 0):
    predictions (1, 3 | 0, 0), targets (1, 0 | 0, −1): TP 1, FP 1, FN 0 (a target exactly at the
    threshold is negative), F1 2/3; L1 per sample (0 + 3)/2, (0 + 1)/2, loss 1."""
    ts = TaskonomyTaskSet(["depth_zbuffer", "normal", "keypoints2d"])
    meter = ts.meter()
    d_t = torch.zeros(2, 1, 1, 2)
    d_p = torch.tensor([[[[2.0, 0.0]]], [[[3.0, 1.0]]]])
    n_t = torch.zeros(2, 3, 1, 2)
    n_t[0, 2, 0, :] = 1.0
    n_t[1, 2, 0, 0], n_t[1, 2, 0, 1] = 1.0, 0.5
    n_p = torch.zeros(2, 3, 1, 2)
    n_p[0, 2, 0, 0] = 0.5
    n_p[1, 0, 0, 0], n_p[1, 2, 0, 0] = 1.0, -1.0
    n_p[1, 2, 0, 1] = 3.0
    kp_p = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])
    kp_t = torch.tensor([[[[1.0, 0.0]]], [[[0.0, -1.0]]]])
    meter.update([d_p, n_p, kp_p], {"targets": {"depth_zbuffer": d_t, "normal": n_t, "keypoints2d": kp_t}})
    r = meter.compute()
    assert r["count"] == 2
    assert r["loss"]["depth_zbuffer"] == pytest.approx(1.5)
    assert r["metrics"]["depth_zbuffer"]["rmse"] == pytest.approx(math.sqrt(3.5))
    assert r["metrics"]["depth_zbuffer"]["rmse_m"] == pytest.approx(math.sqrt(3.5) * 1000 / 512)
    assert r["metrics"]["normal"]["acc30"] == pytest.approx(50.0)
    assert r["metrics"]["normal"]["mean_angle"] == pytest.approx((0 + 90 + 135 + 0) / 4, rel=1e-5)
    assert r["metrics"]["keypoints2d"]["f1"] == pytest.approx(200 / 3) and r["loss"]["keypoints2d"] == pytest.approx(1.0)
    assert r["error"] == pytest.approx({"depth_zbuffer": math.sqrt(3.5), "normal": 50.0, "keypoints2d": 100 / 3})
    assert r["loss"]["normal"] == pytest.approx(((0.5 + 1) / 6 + (1 + 2 + 2.5) / 6) / 2)


def test_meter_with_nothing_or_one_pixel_valid():
    """No valid pixel: depth rmse and normal acc30/mean angle are NaN (no value to report), the
    segmentation loss 0 (no pixel to average). One valid pixel: rmse = |error|, acc30 0 or 100.
    Segmentation loss = Σ CE / valid pixels: logits (ln 17 at class 1) on a class-1 pixel give
    ln 2, zero logits on a class-2 pixel ln 18; the class-0 pixel is ignored → ln 36 / 2 = ln 6.
    A zero-length normal target on a masked-out pixel does not turn the mean angle into NaN.
    An empty meter refuses to compute."""
    names = ["segment_semantic", "depth_zbuffer", "normal"]
    ts = TaskonomyTaskSet(names)
    with pytest.raises(ValueError, match="no samples were evaluated"):
        ts.meter().compute()
    seg_logits = torch.zeros(1, 18, 1, 3)
    seg_logits[0, 5, 0, 0] = 9.0                              # an ignored pixel, confidently wrong
    seg_logits[0, 1, 0, 1] = math.log(17.0)
    d_p, d_t = torch.tensor([[[[2.0, 5.0, 1.0]]]]), torch.zeros(1, 1, 1, 3)
    n_t = torch.zeros(1, 3, 1, 3)
    n_t[0, 2] = 1.0
    n_t[0, 2, 0, 0] = 0.0                                     # a zero-length target, masked out: no NaN
    n_p = torch.zeros(1, 3, 1, 3)
    n_p[0, 2] = 1.0
    outs = [seg_logits, d_p, n_p]

    def run(seg_t, mask):
        m = ts.meter()
        m.update(outs, {"targets": {"segment_semantic": seg_t, "depth_zbuffer": d_t, "normal": n_t},
                        "mask": mask})
        return m.compute()

    none = run(torch.zeros(1, 1, 3, dtype=torch.long), torch.zeros(1, 1, 1, 3, dtype=torch.bool))
    assert none["loss"]["segment_semantic"] == 0.0
    assert none["metrics"]["segment_semantic"]["miou"] == 0.0 and none["metrics"]["segment_semantic"]["classes"] == 0
    assert math.isnan(none["metrics"]["depth_zbuffer"]["rmse"]) and math.isnan(none["error"]["depth_zbuffer"])
    assert math.isnan(none["metrics"]["normal"]["acc30"]) and math.isnan(none["metrics"]["normal"]["mean_angle"])
    one = run(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[[False, True, False]]]]))
    assert one["loss"]["segment_semantic"] == pytest.approx(math.log(6.0), rel=1e-6)
    assert one["metrics"]["depth_zbuffer"]["rmse"] == pytest.approx(5.0)
    assert one["metrics"]["normal"]["acc30"] == 100.0 and one["metrics"]["normal"]["mean_angle"] == pytest.approx(0.0, abs=0.1)


def test_meter_keypoint_threshold_and_rotate_loss_without_autograd(monkeypatch):
    """A raw keypoint threshold of 150 is normalised value (150 − 50)/100 = 1: predictions
    (0.5, 1.5, 2, 0.5) against targets (0.5, 0.5, 0.5, 0.5) (the other pixels 0) give TP 0, FP 2,
    FN 0, F1 0 % (the default threshold 0 would find every pixel: 100 %). Edges at the default
    threshold: TP 3, FP 1, FN 4, F1 2·3/(2·3 + 1 + 4) = 6/11. With the rotate loss a prediction shifted
    by one pixel has loss 0 in the meter too; the meter computes without autograd."""
    from fastdmtg.tasks import taskonomy as T
    ts = TaskonomyTaskSet(["keypoints2d", "depth_zbuffer", "edge_texture"], rotate_loss=True,
                          f1_thresholds={"keypoints2d": 150.0})
    kp_p, kp_t = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)    # zeros: negative at either threshold
    kp_p[0, 0, 0] = torch.tensor([0.5, 1.5, 2.0, 0.5])
    kp_t[0, 0, 0] = torch.tensor([0.5, 0.5, 0.5, 0.5])
    ed_p, ed_t = torch.full((1, 1, 4, 4), -1.0), torch.full((1, 1, 4, 4), -1.0)
    ed_p[0, 0, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    ed_t[0, 0, 0] = torch.tensor([1.0, 1.0, 1.0, -1.0])
    ed_t[0, 0, 1] = torch.tensor([1.0, 1.0, 1.0, 1.0])      # default threshold 0: TP 3, FP 1, FN 4 → 6/11
    d_t = torch.arange(16.0).view(1, 1, 4, 4)
    d_p = torch.roll(d_t, shifts=1, dims=-1).requires_grad_()
    grad_on = []
    real = T.rotate_l1
    monkeypatch.setattr(T, "rotate_l1", lambda *a: grad_on.append(torch.is_grad_enabled()) or real(*a))
    meter = ts.meter()
    meter.update([kp_p.requires_grad_(), d_p, ed_p],
                 {"targets": {"keypoints2d": kp_t, "depth_zbuffer": d_t, "edge_texture": ed_t}, "mask": torch.ones(1, 1, 4, 4, dtype=torch.bool)})
    r = meter.compute()
    assert r["metrics"]["keypoints2d"] == {"f1": 0.0, "threshold_raw": 150.0}
    assert r["loss"]["keypoints2d"] == pytest.approx((0 + 1 + 1.5 + 0) / 16)   # plain L1 over the 16 pixels
    assert r["metrics"]["edge_texture"] == {"f1": pytest.approx(600 / 11), "threshold_raw": 718.0}
    assert r["loss"]["depth_zbuffer"] == pytest.approx(0.0, abs=1e-7) and grad_on == [False]


def test_taskset_and_meter_annotations_resolve():
    """The annotations of the task set's and the meter's methods are valid types."""
    import typing
    from fastdmtg.tasks.taskonomy import TaskonomyMeter
    hints = typing.get_type_hints(TaskonomyTaskSet.__init__)
    assert hints == {"names": list[str], "rotate_loss": bool, "f1_thresholds": dict[str, float] | None,
                     "miou": str, "eval_loss": str}
    assert typing.get_type_hints(TaskonomyTaskSet.head_losses) == {"outputs": list[torch.Tensor], "batch": dict,
                                                                   "z": torch.Tensor, "kernels": str}
    assert typing.get_type_hints(TaskonomyMeter.update) == {"outputs": list[torch.Tensor], "batch": dict,
                                                            "return": type(None)}
    assert typing.get_type_hints(TaskonomyMeter._add) == {"task": str, "key": str, "value": torch.Tensor,
                                                          "return": type(None)}
    assert typing.get_type_hints(TaskonomyMeter._add_loss) == {"task": str, "total": torch.Tensor, "n": torch.Tensor,
                                                               "return": type(None)}


def test_meter_normal_angles_at_the_edges():
    """Three pixels: a prediction equal to the target (1, 1, 0) (0°, a hit; in fp32 its cosine is
    2 / fl(√2)² = 2 / (2 − 2⁻²³) → 1 + 2⁻²³, just above 1, and must still give 0°, not NaN), the
    opposite vector (180°; cosine −1 − 2⁻²³), and a prediction exactly 30° off (cosine == cos 30° in
    fp32: not "< 30°", a miss).
    acc30 = 100/3 %, mean angle (0 + 180 + 30)/3 = 70°."""
    ts = TaskonomyTaskSet(["normal"])
    x = torch.tensor([1.0, 1.0, 0.0])
    c30 = float(torch.tensor(math.cos(math.radians(30.0)), dtype=torch.float32))
    t = torch.stack([x, x, torch.tensor([0.0, 0.0, 1.0])], dim=1).view(1, 3, 1, 3)
    p = torch.stack([x, -x, torch.tensor([0.5, 0.0, c30])], dim=1).view(1, 3, 1, 3)   # |(0.5, 0, c30)| = 1 in fp32
    meter = ts.meter()
    meter.update([p], {"targets": {"normal": t}})
    m = meter.compute()["metrics"]["normal"]
    assert m["acc30"] == pytest.approx(100 / 3)
    assert m["mean_angle"] == pytest.approx(70.0, rel=1e-5)
