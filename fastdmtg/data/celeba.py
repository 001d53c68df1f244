"""CelebA in its official release format.

    ROOT/img_align_celeba/000001.jpg ...       aligned 178×218 JPEGs
    ROOT/list_attr_celeba.txt                  line 1: image count; line 2: the 40 attribute names;
                                               then one row per image: `file v_1 ... v_40`, v ∈ {-1, 1},
                                               fields separated by irregular runs of spaces
    ROOT/list_eval_partition.txt               `file p` per line, p = 0 train / 1 val / 2 test

Images are decoded, converted to RGB and bilinearly resized (half-pixel centres, no antialias —
the TF `tf.image.resize` default the reference pipeline used) to S×S ignoring the aspect ratio, then
stored as uint8; the model sees x / 255 in [0, 1] with no mean/std normalisation. Labels: +1 → 1,
-1 → 0.

Annotation files are UTF-8 (a byte-order mark is ignored). Every malformed input raises
``CelebAFormatError`` naming the file, the line and what was expected.

``CelebADataset`` fields: ``image`` (3, S, S) uint8 decoded from the JPEG, ``labels`` (N,) uint8 from
the attribute file; batch {"image": (B, 3, S, S) float32 in [0, 1], "labels": (B, N) int64}.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..methods.dmtg import DMTGConfig
from ..tasks.attributes import AttributeTaskSet
from .base import (SPLITS, BenchData, DataFormatError, Dataset, DatasetFormat, Field, Recipe, image_labels_batch,
                   recipe_fn)

if TYPE_CHECKING:
    from ..config import Config

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# the 40 attributes of list_attr_celeba.txt, in its column order; CelebA-9 = the paper's 9-task subset
CELEBA_40 = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
]
CELEBA_9 = [
    "5_o_Clock_Shadow", "Black_Hair", "Blond_Hair", "Brown_Hair", "Goatee", "Mustache",
    "No_Beard", "Rosy_Cheeks", "Wearing_Hat",
]


#: bump when ``load_image`` changes what it computes: decoded caches made before are then rebuilt
DECODE_VERSION = 1


class CelebAFormatError(DataFormatError):
    """A CelebA file is missing or not in the official format."""


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CelebAFormatError(f"{path}: missing ({what}); expected the official CelebA layout "
                                f"ROOT/{IMAGE_DIR}/, ROOT/{ATTR_FILE}, ROOT/{PARTITION_FILE}")
    return path


def _read_text(path: Path) -> list[str]:
    """The lines of an annotation file: UTF-8, a leading byte-order mark ignored (some editors add
    one); a byte that is not UTF-8 is reported with its line."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise CelebAFormatError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {col} is not UTF-8 text "
                                "(expected the official ASCII annotation file)") from None


def parse_attributes(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse list_attr_celeba.txt → (attribute names, file names, labels (M, A) int8 in {0, 1})."""
    path = _require(Path(path), "attribute annotations")
    lines = _read_text(path)
    if len(lines) < 2:
        raise CelebAFormatError(f"{path}: expected a count line and a names line, file has {len(lines)} line(s)")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise CelebAFormatError(f"{path}:1: expected the image count (an integer), got {lines[0]!r}") from None
    names = lines[1].split()
    if not names:
        raise CelebAFormatError(f"{path}:2: expected attribute names, got an empty line")
    if len(set(names)) != len(names):
        raise CelebAFormatError(f"{path}:2: duplicate attribute names")
    rows = [(i + 3, ln) for i, ln in enumerate(lines[2:]) if ln.strip()]
    if len(rows) != count:
        raise CelebAFormatError(f"{path}: line 1 says {count} images but the file has {len(rows)} rows")
    files, labels = [], np.empty((count, len(names)), dtype=np.int8)
    seen = set()
    for r, (lineno, ln) in enumerate(rows):
        parts = ln.split()
        if len(parts) != len(names) + 1:
            got = len(parts) - 1
            raise CelebAFormatError(f"{path}:{lineno}: {parts[0]}: {got} value{'s' if got != 1 else ''}, "
                                    f"expected {len(names)} (one per attribute on line 2)")
        fname = parts[0]
        if fname in seen:
            raise CelebAFormatError(f"{path}:{lineno}: duplicate image {fname!r}")
        seen.add(fname)
        for j, v in enumerate(parts[1:]):
            if v == "1":
                labels[r, j] = 1
            elif v == "-1":
                labels[r, j] = 0
            else:
                raise CelebAFormatError(f"{path}:{lineno}: attribute {names[j]!r} of {fname}: "
                                        f"expected 1 or -1, got {v!r}")
        files.append(fname)
    return names, files, labels


def parse_partition(path: str | Path) -> dict[str, int]:
    """Parse list_eval_partition.txt → {file name: 0 | 1 | 2}."""
    path = _require(Path(path), "train/val/test partition")
    out: dict[str, int] = {}
    for lineno, ln in enumerate(_read_text(path), 1):
        if not ln.strip():
            continue
        parts = ln.split()
        if len(parts) != 2:
            raise CelebAFormatError(f"{path}:{lineno}: expected `file partition`, got {ln.rstrip()!r}")
        if parts[1] not in ("0", "1", "2"):
            raise CelebAFormatError(f"{path}:{lineno}: partition of {parts[0]} must be 0, 1 or 2, "
                                    f"got {parts[1]!r}")
        if parts[0] in out:
            raise CelebAFormatError(f"{path}:{lineno}: duplicate image {parts[0]!r}")
        out[parts[0]] = int(parts[1])
    return out


def select_tasks(all_names: list[str], wanted: list[str] | None, path: str = ATTR_FILE) -> list[int]:
    if wanted is None:
        return list(range(len(all_names)))
    idx = []
    for w in wanted:
        if w not in all_names:
            raise CelebAFormatError(f"{path}: unknown attribute {w!r} (data.tasks); the file has: {', '.join(all_names)}; "
                                    "to train on all of them: --set data.tasks=all, or pick some: "
                                    "--set data.tasks=NAME,NAME,...")
        idx.append(all_names.index(w))
    if len(set(idx)) != len(idx):
        raise CelebAFormatError(f"data.tasks: duplicate attribute names in {wanted}")
    return idx


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one image → (3, size, size) uint8, bilinear (half-pixel, no antialias)."""
    from .images import ImageReadError, read_rgb
    path = Path(path)
    try:
        arr = read_rgb(path)           # the one reader (fastdmtg/data/images.py): (H, W, 3) uint8
    except ImageReadError as e:
        if e.missing:
            raise CelebAFormatError(f"{path}: image listed in the annotations is missing") from None
        raise CelebAFormatError(str(e)) from None
    return resize_like_reference(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None], size)[0].numpy()


class CelebAIndex:
    """Parsed annotations: which files, which labels, which split."""

    def __init__(self, root: str | Path, tasks: list[str] | None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CelebAFormatError(f"{self.root}: CelebA folder not found (data.root / --data-root)")
        all_names, files, labels = parse_attributes(self.root / ATTR_FILE)
        part = parse_partition(self.root / PARTITION_FILE)
        cols = select_tasks(all_names, tasks, str(self.root / ATTR_FILE))
        self.task_names = [all_names[c] for c in cols]
        missing = [f for f in files if f not in part]
        if missing:
            raise CelebAFormatError(f"{self.root / PARTITION_FILE}: no partition for {len(missing)} annotated "
                                    f"image(s), e.g. {missing[0]}")
        _require(self.root / IMAGE_DIR, "image folder")
        self.splits: dict[str, tuple[list[str], np.ndarray]] = {}
        split_of = np.array([part[f] for f in files])
        for name, sid in SPLIT_IDS.items():
            sel = np.nonzero(split_of == sid)[0]
            self.splits[name] = ([files[i] for i in sel], labels[sel][:, cols].astype(np.int64))

    def image_paths(self, split: str) -> list[Path]:
        return [self.root / IMAGE_DIR / f for f in self.splits[split][0]]

    def labels(self, split: str) -> np.ndarray:
        return self.splits[split][1]


def decode_item(item: dict, size: int) -> dict[str, np.ndarray]:
    """The reference decoder of one sample: {"image": (3, size, size) uint8}."""
    return {"image": load_image(item["image"], size)}


def resize_like_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """``load_image``'s resize, batched (on any device): (B, 3, H, W) uint8 → (B, 3, size, size)
    uint8, bilinear, half-pixel centres, no antialias, rounded."""
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x.to(torch.float32), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


class CelebADataset(Dataset):
    """The parsed official release: labels in memory, images decoded on demand (or from a cache)."""

    name = "celeba"
    decode_version = DECODE_VERSION
    table_fields = ("labels",)
    default_flip = False          # the reference trains CelebA without augmentation

    def __init__(self, root: str | Path, tasks: list[str] | None, image_size: int,
                 limits: dict[str, int] | None = None):
        self.index = CelebAIndex(root, tasks)
        self.root = self.index.root.resolve()
        self.image_size = image_size
        self.taskset = AttributeTaskSet(self.index.task_names)
        n_tasks = len(self.index.task_names)
        self.fields = {"image": Field(np.uint8, (3, image_size, image_size), "image", "jpeg"),
                       "labels": Field(np.uint8, (n_tasks,), "value")}
        self.decode_one = functools.partial(decode_item, size=image_size)
        self.limits = {s: int((limits or {}).get(s, 0)) for s in SPLITS}
        for s in SPLITS:
            if self.num_samples(s) == 0:
                raise CelebAFormatError(f"{self.index.root / PARTITION_FILE}: split {s!r} is empty")

    def num_samples(self, split: str) -> int:
        n = len(self.index.splits[split][0])
        return min(n, self.limits[split]) if self.limits[split] else n

    def items(self, split):
        # resolved paths: the cache key does not depend on how the folder was typed
        return [{"image": str(self.root / IMAGE_DIR / f)} for f in self.index.splits[split][0][:self.num_samples(split)]]

    def table(self, split):
        return {"labels": self.index.labels(split)[:self.num_samples(split)].astype(np.uint8)}

    def missing_error(self, path: str) -> CelebAFormatError:
        return CelebAFormatError(f"{path}: image listed in the annotations is missing")

    def fingerprint(self) -> dict[str, str]:
        """The attribute and partition files by content, the image list by names and sizes."""
        from .base import file_digest
        return {ATTR_FILE: file_digest(self.root / ATTR_FILE), PARTITION_FILE: file_digest(self.root / PARTITION_FILE),
                **super().fingerprint()}

    def resize(self, field, x):
        return resize_like_reference(x, self.image_size)

    def to_batch(self, raw, flags):
        return image_labels_batch(raw, flags)


def open_celeba(cfg, progress: bool = True) -> CelebADataset:
    if not cfg.root:
        raise CelebAFormatError("data.root: the celeba dataset needs its folder (--data-root PATH)")
    return CelebADataset(cfg.root, cfg.task_names(), cfg.image_size,
                         {"train": cfg.limit_train, "val": cfg.limit_eval, "test": cfg.limit_eval})


def celeba_taskset(cfg, names: list[str]) -> AttributeTaskSet:
    return AttributeTaskSet(names, cfg.model.num_classes)


def is_celeba_root(root: Path) -> bool:
    """Whether ``root`` looks like the official release (its attribute file, or its image folder)."""
    return (root / ATTR_FILE).is_file() or (root / IMAGE_DIR).is_dir()


def celeba_known_tasks(cfg) -> list[str]:
    """data.tasks, or the 40 attributes for "all"."""
    names = cfg.task_names()
    return list(CELEBA_40) if names is None else names


def _celeba_cfg(c, tasks: str, k: int, name: str, follows: str = "paper") -> Config:
    """CelebA DMTG. Paper §4.1: Adam lr 8e-4, plateau decay ×0.5 on the validation loss, 100 epochs,
    τ 2.5, initialised from the trained naive-MTL model (train.init=naive: pass --init-from); the
    plateau's patience / threshold / floor, which the paper does not give, are the release's only
    plateau settings (its Taskonomy configs: 3, relative 0.1, 3e-5). Reference: MultiStepLR ×0.5 at
    epochs 15, 30, …, 90 (= ×0.5 every 15 epochs over 100), from scratch."""
    # data.root stays empty in recipes: the CLI fills it from --data-root, the loader says if it is missing
    cfg = c.Config(
        name=name,
        data=c.DataConfig(dataset="celeba", tasks=tasks, image_size=64),
        model=c.ModelConfig(arch="resnet_celeba", branches=k, width=64),
        dmtg=DMTGConfig(tau=2.5),
        optim=c.OptimConfig(name="adam", lr=8e-4, schedule="plateau", gamma=0.5, plateau_patience=3,
                            plateau_threshold=0.1, min_lr=3e-5, plateau_on="val"),
        # fp32 (train.amp=off): the paper and the release train without autocast, and the measured cost of
        # the mixed policy is not yet bounded on real-size data (docs/fidelity.md, "Precision")
        train=c.TrainConfig(epochs=100, batch_size=256, init="naive", amp="off"),
    )
    if follows == "reference":
        cfg.optim = c.OptimConfig(name="adam", lr=8e-4, schedule="step", step_epochs=15, gamma=0.5)
        c.reference_common(cfg)
    return cfg


def _celeba_naive(c, tasks: str, name: str) -> Config:
    """CelebA naive MTL (the NormGain reference and the source of train.init=naive). The paper does not
    describe its training: the release's mtl config — SGD lr 5e-4 momentum 0.9, ×0.5 every 15 epochs
    (the base config's MultiStepLR)."""
    cfg = _celeba_cfg(c, tasks, 1, name)
    cfg.grouping.method = "naive-mtl"
    cfg.optim = c.OptimConfig(name="sgd", lr=5e-4, momentum=0.9, schedule="step", step_epochs=15, gamma=0.5)
    cfg.train.init = "scratch"
    return cfg


def _celeba_naive_reference(c, tasks: str, name: str) -> Config:
    return c.reference_common(_celeba_naive(c, tasks, name))


def celeba_recipes(c) -> list[Recipe]:
    """CelebA-9 at K = 2..5 and CelebA-40 at K = 5 (paper §4.1), their naive-MTL twins, and each as the
    release has it (``*_reference``)."""
    paper = "Paper (where explicit; else the release): {}. See {} for the values."
    ref = "Reference code as released: {} (the release's schedule and lr; reference_common)."
    naive_ref = "Reference code as released: {} with the release's values (reference_common)."
    out = []
    for tasks, ks in (("celeba9", (2, 3, 4, 5)), ("celeba40", (5,))):
        pretty = {"celeba9": "CelebA-9", "celeba40": "CelebA-40"}[tasks]
        for k in ks:
            name = f"{tasks}_k{k}"
            out.append(Recipe(name, recipe_fn(_celeba_cfg, c, tasks, k, name,
                                              doc=paper.format(f"{pretty} DMTG, K={k}", "_celeba_cfg")),
                              "paper", naive=f"{tasks}_naive"))
            out.append(Recipe(name + "_reference", recipe_fn(_celeba_cfg, c, tasks, k, name, "reference",
                                                             doc=ref.format(name)),
                              "reference", naive=f"{tasks}_naive_reference"))
        naive = f"{tasks}_naive"
        out.append(Recipe(naive, recipe_fn(_celeba_naive, c, tasks, naive, doc=paper.format(
            f"{pretty} naive MTL (the paper is silent: the release's values)", "_celeba_naive")), "paper"))
        out.append(Recipe(naive + "_reference", recipe_fn(_celeba_naive_reference, c, tasks, naive,
                                                          doc=naive_ref.format(naive)), "reference"))
    return out


#: CelebA's official training split (list_eval_partition.txt: 162,770 train, 19,867 val, 19,962 test)
CELEBA_TRAIN_IMAGES = 162_770
#: the CelebA rows of ``bench step --scaling``: K = 2..5 and N = 40
CELEBA_SCALING = ("celeba9_k2", "celeba9_k3", "celeba9_k4", "celeba9_k5", "celeba40_k5")


def celeba_bench(t, c, train_images=None) -> BenchData:
    """CelebA-shaped benchmark data (``DatasetFormat.bench``; ``t`` = fastdmtg.testing, ``c`` = the
    config module): random uint8 images and 0/1 labels; the DataLoader row decodes CelebA JPEGs."""
    def scaling(recipe, names):
        return [(name, c.get_recipe(name)) for name in (names or CELEBA_SCALING)]
    return BenchData(synthetic=t.synthetic_celeba, write_raw=lambda root, n, size: t.write_celeba_raw(root, n),
                     raw_data=lambda root: {"dataset": "celeba"}, scaling=scaling,
                     train_images=train_images or (lambda cfg: (cfg.data.limit_train or CELEBA_TRAIN_IMAGES, "CelebA")))


FORMAT = DatasetFormat("celeba", open_celeba, celeba_taskset,
                       "CelebA official release: img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt",
                       detect=is_celeba_root, looks_for=f"{ATTR_FILE} or {IMAGE_DIR}/ (CelebA)", recipe="celeba9_k3",
                       presets={"celeba9": CELEBA_9, "celeba40": CELEBA_40}, known_tasks=celeba_known_tasks,
                       resize=resize_like_reference, recipes=celeba_recipes, bench=celeba_bench, order=1)
