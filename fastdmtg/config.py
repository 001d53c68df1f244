"""Typed configuration: nested dataclasses validated in ``__post_init__``, named recipes as
functions, and ``--set key=value`` overrides.

Every run writes its resolved config to ``RUN_DIR/config.json``; ``Config.from_dict`` reads it
back (resume, eval, pruned-model loading), so the JSON is the single source of truth of a run.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configcheck import ConfigError
from .configcheck import check as _check
from .data import registry as _formats
from .data.registry import FORMATS
from .methods import (AUGMENTATIONS, METHODS, augmentable, augmentation_class, augmentation_of, config_sections,
                      method_class)
from .registry import BACKBONES, LOADER_BACKENDS


@dataclass
class DataConfig:
    dataset: str = "synthetic"          # a name of fastdmtg.data.FORMATS: synthetic | celeba | taskonomy | folder | tensors
    root: str = ""                      # dataset folder (official layout); unused for synthetic
    tasks: list[str] | str = "all"      # task names, or a preset name (celeba9, celeba40, taskonomy5), or "all"
    image_size: int = 64                # CelebA: 64 (reference); synthetic: any multiple of 4 >= 16
    # the loader (fastdmtg.pipelines, docs/pipelines.md). auto = gpu-cache: the decoded data held on the
    # training device (a split that does not fit moves to host memory, then to streaming, with a log
    # line); memory = held in host memory; torch = a DataLoader decoding the files of every batch;
    # ffcv = .beton files; dali = NVIDIA DALI decoding the files
    backend: str = "auto"               # auto | gpu-cache | memory | torch | ffcv | dali
    num_workers: int = 2                # loader worker processes / threads (torch, ffcv, dali, streamed splits)
    cache_dir: str = ""                 # where decode caches go; default: ROOT/.fastdmtg_cache (Taskonomy) or ~/.cache/fastdmtg
    validate: bool = True               # before the first step: decode every split (or check its cache)
    limit_train: int = 0                # >0: use only the first n training samples (quick runs)
    limit_eval: int = 0                 # >0: same for val/test
    # synthetic (planted groups) dataset; see fastdmtg/data/synthetic.py
    synthetic_groups: int = 3
    synthetic_tasks_per_group: int = 3
    synthetic_train: int = 6000
    synthetic_val: int = 1000
    synthetic_test: int = 1000
    synthetic_seed: int = 1234
    taskonomy_split_file: str = ""      # optional custom split JSON {"train": [...], "val": [...], "test": [...]}
    taskonomy_seg_resize: str = "nearest"  # nearest (correct for class ids) | bilinear (reference behaviour, a bug)
    taskonomy_rotate_loss: bool = False    # reference "rotate" loss for depth/normal (min over 9 one-pixel shifts)
    # segmentation mIoU (docs/taskonomy.md §5): reference = Σ IoU over the classes present in the target / 18
    # (the release's IoU meter; the paper's Table A2); mean = mean IoU over classes 1..17 present in the
    # target or the prediction
    taskonomy_miou: str = "reference"      # reference | mean
    # evaluation loss per task: set = the mean over the whole split (pixels of the set; exact whatever the
    # evaluation batch size); batch_mean = the mean over evaluation batches of each batch's mean (the
    # release's Averager; depends on train.eval_batch_size) — docs/taskonomy.md §5
    taskonomy_eval_loss: str = "set"       # set | batch_mean
    # folder / tensors datasets (your own tasks, fastdmtg/data/folder.py): the resolved task declarations
    # {task: {type, classes, labels, weight, mean, std}}; empty = read tasks.json / infer from the training
    # split, then filled in when the data is opened, so the run's config.json makes a rerun exact
    folder_tasks: dict = field(default_factory=dict)

    def __post_init__(self):
        _check(self.dataset in FORMATS, f"data.dataset: expected {'|'.join(FORMATS)}, got {self.dataset!r}")
        _check(self.backend == "auto" or self.backend in LOADER_BACKENDS,
               f"data.backend: expected {'|'.join(['auto', *LOADER_BACKENDS])}, got {self.backend!r}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.image_size >= 16 and self.image_size % 4 == 0,
               f"data.image_size: expected a multiple of 4 >= 16, got {self.image_size}")
        _check(self.limit_train >= 0 and self.limit_eval >= 0, "data.limit_train/limit_eval must be >= 0")
        _check(self.synthetic_groups >= 1 and self.synthetic_tasks_per_group >= 1,
               "data.synthetic_groups and data.synthetic_tasks_per_group must be >= 1")
        check = _formats.get_format(self.dataset).check      # what the format itself requires
        if check is not None:
            try:
                check(self)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        _check(self.taskonomy_seg_resize in ("nearest", "bilinear"),
               f"data.taskonomy_seg_resize: expected nearest|bilinear, got {self.taskonomy_seg_resize!r}")
        _check(self.taskonomy_miou in ("reference", "mean"),
               f"data.taskonomy_miou: expected reference|mean, got {self.taskonomy_miou!r}")
        _check(self.taskonomy_eval_loss in ("set", "batch_mean"),
               f"data.taskonomy_eval_loss: expected set|batch_mean, got {self.taskonomy_eval_loss!r}")
        if self.folder_tasks:
            from .tasks.generic import decls_from_config
            try:
                decls_from_config(self.folder_tasks)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def task_names(self) -> list[str] | None:
        """Explicit task list, or None for 'all tasks the dataset has'."""
        if isinstance(self.tasks, str):
            if self.tasks == "all":
                return None
            presets = _formats.task_presets()
            if self.tasks in presets:
                return list(presets[self.tasks])
            return [t.strip() for t in self.tasks.split(",") if t.strip()]
        return list(self.tasks)


@dataclass
class ModelConfig:
    arch: str = "resnet_celeba"         # a backbone of fastdmtg.registry.BACKBONES: resnet_celeba | xception | vit_base
    # K: the number of encoder branches (maximum number of groups). 0 = auto (method_branches): dmtg
    # min(3, N), naive-mtl, tag-affinity, cs-affinity and the augmentations (uw, pcgrad, …) 1, fixed / networks the number of groups; a value the method
    # contradicts is an error, never silently replaced
    branches: int = 0
    width: int = 64                     # channels of the ResNet variant (64 = reference)
    shared: str = "none"                # resnet_celeba: none | stem (share conv stem, branch at the residual block)
    shared_blocks: int = 4              # xception/vit: number of shared early blocks before the split
    grad_scale: str = "reference"       # taskonomy: reference (1/sqrt(K) into branches and heads) | none
    num_classes: int = 2                # classification heads' outputs (CelebA: 2-way cross-entropy)
    # DDP: SyncBatchNorm instead of per-rank BatchNorm statistics (the release converts every model; a
    # no-op on one process; SyncBatchNorm runs on CUDA only, so CPU/gloo DDP runs need false)
    sync_bn: bool = True
    batched: str = "auto"               # run the K branches as one grouped network: auto | on | off
    # resnet_celeba: BN → ReLU → MaxPool of the stem as one fused op in training (docs/kernels.md);
    # auto stays off until a GPU measurement decides (fastdmtg.builder.FUSED_STEM_AUTO)
    fused_stem: str = "auto"            # auto | on | off
    # vit_base: a timm (vit_base_patch16_224) or torchvision (vit_b_16) state-dict file on disk to start the
    # encoder from (fastdmtg/models/vit.py: load_pretrained); "" = from scratch
    pretrained: str = ""

    def __post_init__(self):
        _check(self.arch in BACKBONES, f"model.arch: expected {'|'.join(BACKBONES)}, got {self.arch!r}")
        if self.pretrained and not BACKBONES.load(self.arch).loads_pretrained:
            # only now every backbone's declaration is loaded (for the message): a config with
            # model.pretrained unset imports no backbone module (they load on first use)
            able = "|".join(n for n in BACKBONES if BACKBONES.load(n).loads_pretrained)
            raise ConfigError(f"model.pretrained: model.arch={self.arch} loads no pretrained weights (the "
                              f"backbones that do: {able})")
        _check(self.branches >= 0, f"model.branches (K) must be >= 1, or 0 (auto), got {self.branches}")
        _check(self.branches <= 64, f"model.branches (K) must be <= 64, got {self.branches}")
        _check(self.width >= 1, f"model.width must be >= 1, got {self.width}")
        _check(self.shared in ("none", "stem"), f"model.shared: expected none|stem, got {self.shared!r}")
        _check(self.shared_blocks >= 0, f"model.shared_blocks must be >= 0, got {self.shared_blocks}")
        _check(self.batched in ("auto", "on", "off"), f"model.batched: expected auto|on|off, got {self.batched!r}")
        _check(self.fused_stem in ("auto", "on", "off"),
               f"model.fused_stem: expected auto|on|off, got {self.fused_stem!r}")
        _check(self.grad_scale in ("reference", "none"),
               f"model.grad_scale: expected reference|none, got {self.grad_scale!r}")


#: a partition inside the package: task indices (or task names, resolved once the task list is known)
#: per group, in group order; the "0,1|2" text exists only at the edge (fastdmtg.partition.parse_text)
Partition = list[list[typing.Union[int, str]]]


@dataclass
class GroupingConfig:
    """Which grouping method trains, and the groups of the methods that are given them. Each method's
    own settings live in its own section, which the method declares (``GroupingMethod.config_section``)."""
    method: str = "dmtg"                # dmtg | naive-mtl | fixed | tag-affinity | networks | cs-affinity | uw | gradnorm |
    # pcgrad | mgda | cagrad | nash-mtl | imtl | aligned-mtl | upgrad (fastdmtg.methods)
    # fixed / networks: the tasks of each group (fixed: a partition, every task once; networks: the tasks
    # trained in each network); --set 'grouping.groups=0,1|2' or names, "+t" marks t auxiliary (networks)
    groups: Partition = field(default_factory=list)
    # networks: per network, its auxiliary tasks (trained there, served by another network); [] = none
    auxiliary: Partition = field(default_factory=list)

    def __post_init__(self):
        _check(self.method in METHODS, f"grouping.method: expected one of {'|'.join(sorted(METHODS))}, "
                                       f"got {self.method!r}")
        from .partition import check_shape
        try:
            check_shape(self.groups, self.auxiliary)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        cls = method_class(self.method)
        if cls.groups_example:
            _check(bool(self.groups), f"grouping.groups: method {self.method!r} needs its groups, e.g. "
                                      f"--set 'grouping.groups={cls.groups_example}'")
        elif self.groups:                   # the methods that take groups listed only for the message
            given = [m for m in METHODS if method_class(m).groups_example]
            raise ConfigError(f"grouping.groups: only methods {' and '.join(given)} take groups "
                              f"(grouping.method={self.method})")
        if any(self.auxiliary) and not cls.takes_auxiliary:
            raise ConfigError("grouping.auxiliary: auxiliary tasks ('+') need grouping.method="
                              + "|".join(m for m in METHODS if method_class(m).takes_auxiliary))


#: the largest optim.lr accepted: no rate near it trains anything (Adam moves every weight by about lr
#: in its first step), and from ~3e37 up the optimizers' step sizes overflow float32 (a traceback
#: inside torch.optim instead of the run's non-finite-loss stop)
MAX_LR = 1e6


@dataclass
class OptimConfig:
    name: str = "adam"                  # adam | adamw | sgd
    lr: float = 8e-4
    momentum: float = 0.9               # sgd only
    weight_decay: float = 0.0
    schedule: str = "step"              # step (x gamma every step_epochs) | plateau | none
    step_epochs: int = 15
    gamma: float = 0.5
    plateau_patience: int = 3
    plateau_threshold: float = 0.1      # relative threshold (reference)
    min_lr: float = 3e-5
    # what the plateau schedule watches: val = the validation total loss (paper §4.1; stepped after each
    # validation only, so the patience counts validations), train = the epoch's training loss (the release)
    plateau_on: str = "val"             # val | train
    fused: str = "auto"                 # auto (fused on CUDA) | on | off

    def __post_init__(self):
        _check(self.name in ("adam", "adamw", "sgd"), f"optim.name: expected adam|adamw|sgd, got {self.name!r}")
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        # (inf is left to the finiteness check, which names it as such)
        _check(self.lr <= MAX_LR or math.isinf(self.lr), f"optim.lr must be <= {MAX_LR:g} (a larger rate cannot "
               f"train; docs: README, Configuration), got {self.lr:g}")
        _check(self.schedule in ("step", "plateau", "none"),
               f"optim.schedule: expected step|plateau|none, got {self.schedule!r}")
        _check(self.step_epochs >= 1, "optim.step_epochs must be >= 1")
        _check(0 < self.gamma <= 1, f"optim.gamma must be in (0, 1], got {self.gamma}")
        _check(self.plateau_on in ("val", "train"), f"optim.plateau_on: expected val|train, got {self.plateau_on!r}")
        _check(self.fused in ("auto", "on", "off"), f"optim.fused: expected auto|on|off, got {self.fused!r}")


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    # precision (docs/fidelity.md): mixed = bf16 autocast for the encoders, the task heads (decoders,
    # linear heads), losses and evaluation in fp32 (measured not to move the results); bf16 = autocast
    # everywhere, evaluation included (faster, moves Taskonomy's smallest losses); off = fp32 (the
    # release); auto = mixed on CUDA, off on CPU
    amp: str = "auto"                   # auto | mixed | bf16 | off
    kernels: str = "auto"               # auto (Triton on CUDA) | triton | reference
    val_every: int = 1                  # epochs between validations (the last epoch always validates)
    val_first_epoch: bool = True        # validate after epoch 1 too (the release)
    # best.pt: reference = saved when the validation total loss (for every dataset, classification
    # included, as the release) AND the epoch's training loss both improve on the values at the last save
    # (the release); val_loss = the lowest validation total loss
    best_rule: str = "reference"        # reference | val_loss
    log_every: int = 20                 # steps between TensorBoard scalars
    progress: bool = True               # tqdm progress bars
    init_from: str = ""                 # naive-MTL run dir or checkpoint to copy into all K branches
    # naive = a DMTG run must start from a trained naive-MTL model (train.init_from; the paper §4.1), and
    # stops with an error naming the two-stage commands when it is not given; scratch = random init
    # unless train.init_from is given (the release: no shipped config initialises from naive MTL)
    init: str = "scratch"               # scratch | naive
    reference: str = ""                 # naive-MTL results.json for NormGain
    tensorboard: bool = True
    # trackers next to TensorBoard (fastdmtg/trackers, docs/trackers.md): comma-separated names, e.g.
    # "mlflow" or "mlflow,wandb"; their runs are named after the run folder
    logger: str = ""                    # "" | mlflow | wandb | mlflow,wandb
    mlflow_uri: str = ""                # MLflow store; "" = MLFLOW_TRACKING_URI, else MLflow's default
    experiment: str = ""                # MLflow experiment / W&B project; "" = the tracker's env, else "fastdmtg"
    # speed switches; auto = on for CUDA, off on CPU (measured fastest combination on H100, see
    # benchmarks/results/h100_2026-11-23_step.md)
    compile: str = "auto"               # torch.compile the step's forward: auto | on | off
    cuda_graph: str = "auto"            # capture the whole training step in a CUDA graph: auto | on | off
    channels_last: str = "auto"         # channels_last activations: auto | on | off
    # divergence rule (README "Outputs"): an epoch whose mean training loss exceeds divergence_factor ×
    # the loss of the run's first step has diverged; error = stop there, evaluate, flag results.json,
    # exit 4 — warn = flag it and go on (exit 0)
    divergence_factor: float = 10.0
    on_divergence: str = "error"        # error | warn
    # a training augmentation for the networks of a method with 0/1 weights (naive-mtl, fixed, networks):
    # none | uw | gradnorm | pcgrad | mgda | cagrad | nash-mtl | imtl | aligned-mtl | upgrad (fastdmtg.methods.AUGMENTATIONS)
    aggregator: str = "none"

    def __post_init__(self):
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1 and self.eval_batch_size >= 1, "train.batch_size/eval_batch_size must be >= 1")
        _check(self.amp in ("auto", "mixed", "bf16", "off"),
               f"train.amp: expected auto|mixed|bf16|off, got {self.amp!r}")
        _check(self.best_rule in ("reference", "val_loss"),
               f"train.best_rule: expected reference|val_loss, got {self.best_rule!r}")
        _check(self.init in ("scratch", "naive"), f"train.init: expected scratch|naive, got {self.init!r}")
        _check(self.kernels in ("auto", "triton", "reference"),
               f"train.kernels: expected auto|triton|reference, got {self.kernels!r}")
        for key in ("compile", "cuda_graph", "channels_last"):
            val = getattr(self, key)
            _check(val in ("auto", "on", "off"), f"train.{key}: expected auto|on|off, got {val!r}")
        _check(self.val_every >= 1 and self.log_every >= 1, "train.val_every/log_every must be >= 1")
        _check(self.divergence_factor > 1, f"train.divergence_factor must be > 1, got {self.divergence_factor}")
        _check(self.on_divergence in ("error", "warn"),
               f"train.on_divergence: expected error|warn, got {self.on_divergence!r}")
        from .trackers import TRACKERS, logger_names
        for name in logger_names(self.logger):
            _check(name != "tensorboard", "train.logger: TensorBoard is train.tensorboard (on by default); "
                   f"train.logger names the trackers next to it: {'|'.join(n for n in TRACKERS if n != 'tensorboard')}")
            _check(name in TRACKERS, f"train.logger: unknown tracker {name!r}; expected "
                   f"{'|'.join(n for n in TRACKERS if n != 'tensorboard')} (comma-separated)")
        _check(self.aggregator == "none" or self.aggregator in AUGMENTATIONS,
               f"train.aggregator: expected none|{'|'.join(AUGMENTATIONS)}, got {self.aggregator!r}")


class _ConfigBody:
    """The behaviour of ``Config``, the typed config: the sections ``data``, ``model``, ``grouping``,
    each method's own (``METHOD_SECTIONS``: ``dmtg``, ``tag``, …, declared by the methods), ``optim``,
    ``train``; ``Config`` is this with those sections as dataclass fields."""

    def __post_init__(self):
        _check_finite(self)
        _resolve_paths(self)
        _check_sections_gathered(self)
        for section in METHOD_SECTIONS:          # a section's rules across sections (e.g. dmtg.prune_eps)
            rule = getattr(getattr(self, section), "check_config", None)
            if rule is not None:
                rule(self)
        _check_aggregator(self)
        method = self.grouping.method
        k = method_branches(self, None)
        if self.model.branches and k is not None and self.model.branches != k:
            why = method_class(method).branches_reason(self, k)
            raise ConfigError(f"model.branches={self.model.branches}, but grouping.method={method} trains {k} "
                              f"branch(es) ({why}); set model.branches={k}, or 0 (auto)")

    @property
    def num_branches(self) -> int | None:
        """K: model.branches, or for 0 (auto) the method's (method_branches); None while it depends on a
        number of tasks only the opened data knows (the builder resolves it then: resolved_branches)."""
        if self.model.branches:
            return self.model.branches
        from .data import known_task_names
        names = known_task_names(self.data)
        return method_branches(self, None if names is None else len(names))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a dict (config.json, a checkpoint's stored config, ``--set``); a value of the
        wrong JSON type raises ConfigError naming the field (no TypeError further down)."""
        _check(isinstance(d, dict), f"a config must be a JSON object, got {_json(d)}")
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - top
        _check(not unknown, f"config: unknown keys {sorted(unknown)}; expected {sorted(top)}")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            sub = _SECTIONS.get(f.name)
            if sub is None:
                kw[f.name] = _typed(f.name, str, d[f.name])
            else:
                _check(isinstance(d[f.name], dict), f"{f.name}: expected a JSON object, got {_json(d[f.name])}")
                hints = typing.get_type_hints(sub)
                unknown = set(d[f.name]) - set(hints)
                _check(not unknown, f"config section {f.name!r}: unknown keys {sorted(unknown)}")
                sec = dict(d[f.name])
                if f.name == "grouping" and isinstance(sec.get("groups"), str):
                    sec.update(_groups_from_text(sec["groups"], "grouping.groups", sec.get("auxiliary")))
                kw[f.name] = sub(**{k: _typed(f"{f.name}.{k}", hints[k], v) for k, v in sec.items()})
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        from .checkpoint import atomic_write_json
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """Read a config.json; every problem (missing, invalid JSON, a wrong field) is one line naming
        the file."""
        from .checkpoint import read_json
        d = read_json(path)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


#: the methods' own sections (section → dataclass), declared by the methods (GroupingMethod.config_section)
#: and gathered from the methods registry, in its order
METHOD_SECTIONS: dict[str, type] = config_sections()
_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "grouping": GroupingConfig,
                              **METHOD_SECTIONS, "optim": OptimConfig, "train": TrainConfig}
#: the typed config: ``name`` and one field per section, in _SECTIONS' order (config.json's order)
Config = dataclasses.make_dataclass(
    "Config", [("name", str, field(default="run"))] + [(sec, cls, field(default_factory=cls))
                                                      for sec, cls in _SECTIONS.items()],
    bases=(_ConfigBody,), namespace={"__module__": __name__})


def _check_sections_gathered(cfg: "Config") -> None:
    """The method (and augmentation) a config trains with has its section in ``Config``: a plugin
    registered after this module was imported (``METHODS.add`` late) is refused by name."""
    used = [("grouping.method", cfg.grouping.method, method_class(cfg.grouping.method))]
    agg = augmentation_of(cfg)
    if agg is not None:
        used.append(("train.aggregator" if cfg.train.aggregator != "none" else "grouping.method", agg,
                     augmentation_class(agg)))
    for field_name, name, cls in used:
        if cls.config_section is not None and cls.config_section[0] not in METHOD_SECTIONS:
            raise ConfigError(f"{field_name}={name}: its config section {cls.config_section[0]!r} was registered "
                              "after fastdmtg.config was imported (the config gathers the sections then); add it "
                              "as a file of fastdmtg/methods/ or an entry point of the group fastdmtg.methods")


def _check_aggregator(cfg: "Config") -> None:
    """train.aggregator trains the networks of a method with constant 0/1 weights; a method that is
    itself an augmentation (grouping.method=pcgrad, …) already names its own."""
    agg, method = cfg.train.aggregator, cfg.grouping.method
    if agg == "none":
        return
    _check(method not in AUGMENTATIONS, f"train.aggregator={agg}: grouping.method={method} already trains with "
                                        f"{method}; use one of the two")
    _check(method_class(method).augmentable, f"train.aggregator={agg} applies to the networks of grouping.method "
                                             f"{'|'.join(augmentable())} (constant 0/1 weights), not {method}")

# Paths in the config, stored absolute (resolved against the working folder where they were typed),
# so that eval / --resume / --init-from work from any working folder. Symlinks are kept as typed.
PATH_FIELDS = (("data", "root"), ("data", "cache_dir"), ("data", "taskonomy_split_file"),
               ("train", "init_from"), ("train", "reference"), ("model", "pretrained"))

# What a change of each field does to a run's results — the one table behind both rules "which fields
# may differ": a resume (RESUME_SAFE) and compare's reuse of a finished run (SAME_RESULTS_FIELDS). A
# field not listed changes results. field → (effect, resumable, what it is):
#   effect    none      does not touch what is computed (display, logging, paths, loader parallelism)
#             rounding  the same function with another float rounding (speed switches, device, decoder)
#             results   changes the results (the run's length, validation cadence, divergence rule)
#   resumable whether a resume may change it (`fastdmtg train --resume RUN --set KEY=VALUE`, or an edit of
#             RUN/config.json); any other difference from the config stored in checkpoints/last.pt stops
#             the resume (exit 2) with the list of fields, old → new. Not resumable although they do not
#             change results: what the checkpoint's state depends on (train.device: optimizer and RNG
#             state of another device; model.batched: another parameter layout; data.backend: another
#             image decoder; data.root: another dataset for the recorded data fingerprint).
# A run resumed with a "rounding" field changed is not bit-identical to an uninterrupted run.
FIELD_EFFECTS: dict[str, tuple[str, bool, str]] = {
    "name": ("none", True, "the run's label"),
    "train.epochs": ("results", True, "the run's length (not below the epochs already trained)"),
    "train.val_every": ("results", True, "validation cadence"),
    "train.log_every": ("results", True, "steps between loss checks and TensorBoard scalars"),
    "train.progress": ("none", True, "progress bars"),
    "train.tensorboard": ("none", True, "TensorBoard scalars"),
    "train.logger": ("none", True, "trackers next to TensorBoard"),
    "train.mlflow_uri": ("none", True, "the MLflow store"),
    "train.experiment": ("none", True, "the MLflow experiment / W&B project"),
    "train.eval_batch_size": ("rounding", True, "evaluation batch size (the same predictions)"),
    "train.divergence_factor": ("results", True, "divergence rule"),
    "train.on_divergence": ("results", True, "what a divergence does"),
    "train.kernels": ("rounding", True, "kernel backend (speed)"),
    "train.compile": ("rounding", True, "torch.compile (speed)"),
    "train.cuda_graph": ("rounding", True, "CUDA graphs (speed)"),
    "train.channels_last": ("rounding", True, "memory layout (speed)"),
    "optim.fused": ("rounding", True, "fused optimizer kernels (speed)"),
    "data.num_workers": ("none", True, "loader processes (speed)"),
    "data.cache_dir": ("none", True, "where decoded caches live"),
    "train.device": ("rounding", False, "the device"),
    "model.batched": ("rounding", False, "the batched form of the branches (another parameter layout)"),
    "data.backend": ("rounding", False, "the loader (another image decoder)"),
    "data.root": ("none", False, "where the dataset is (the data fingerprint says whether it is the same)"),
}
EFFECTS = ("none", "rounding", "results")

# the fields a resume may change, with what they are (listed by the resume's error message)
RESUME_SAFE: dict[str, str] = {k: what for k, (_, resumable, what) in FIELD_EFFECTS.items() if resumable}
# the (section, key) fields whose change leaves a finished run's results as they are up to float rounding
# (compare reuses such a run instead of training it again); the run's name is not a section field
SAME_RESULTS_FIELDS: frozenset[tuple[str, str]] = frozenset(
    tuple(k.split(".")) for k, (effect, _, _) in FIELD_EFFECTS.items() if effect != "results" and "." in k)


_EXPECT = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a JSON object"}


def method_branches(cfg: "Config", num_tasks: int | None) -> int | None:
    """K for model.branches=0 (auto), as the method declares it (``GroupingMethod.auto_branches``):
    naive-mtl, tag-affinity, cs-affinity and the augmentations (uw, gradnorm, pcgrad, …) 1 (one encoder
    for all tasks), fixed and networks one branch per group, dmtg min(3, N) (3: the paper's CelebA-9 /
    Taskonomy default; a folder of fewer tasks gets one branch per task at most). None: not known yet
    (dmtg before the number of tasks N is known: the builder resolves it with the opened data)."""
    return method_class(cfg.grouping.method).auto_branches(cfg, num_tasks)


def resolved_branches(cfg: "Config", num_tasks: int) -> "Config":
    """A copy of ``cfg`` with model.branches=0 (auto) resolved for N tasks (method_branches), for the
    components that build the model; ``cfg`` itself when K is set. (The run's config.json keeps 0: what
    the user asked for; results.json records the K that ran.)"""
    if cfg.model.branches:
        return cfg
    return evolve(cfg, model={"branches": method_branches(cfg, num_tasks)})


def evolve(cfg: "Config", name: str | None = None, **sections: dict) -> "Config":
    """A validated copy of ``cfg`` with typed field values replaced per section, e.g.
    ``evolve(cfg, grouping={"method": "fixed", "groups": [[0, 1], [2]]}, model={"branches": 2})``
    (``--set`` is the text form of the same, at the command line)."""
    for sec, changes in sections.items():
        _check(sec in _SECTIONS, f"evolve: unknown section {sec!r}; expected {sorted(_SECTIONS)}")
        names = {f.name for f in dataclasses.fields(_SECTIONS[sec])}
        unknown = set(changes) - names
        _check(not unknown, f"evolve: {sec} has no field(s) {sorted(unknown)}")
    base = copy.deepcopy(cfg)           # no list or dict shared between the two configs
    return Config(name=cfg.name if name is None else name,
                  **{sec: dataclasses.replace(getattr(base, sec), **sections.get(sec, {})) for sec in _SECTIONS})


def _json(v: Any) -> str:
    return json.dumps(v, default=repr)


def _typed(where: str, typ: Any, v: Any) -> Any:
    """``v`` checked against the field's type (a JSON int is accepted for a float field)."""
    if typ is bool:
        ok = isinstance(v, bool)
    elif typ is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif typ is float:                      # (finiteness: _check_finite, for every way a config is built)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        v = float(v) if ok else v
    elif typ is str:
        ok = isinstance(v, str)
    elif typ is dict:                       # data.folder_tasks (checked by its section)
        ok = isinstance(v, dict)
    elif typ == Partition:                  # grouping.groups / auxiliary (shape: GroupingConfig)
        ok = isinstance(v, list) and all(isinstance(g, list) for g in v)
        _check(ok, f"{where}: expected a list of groups, e.g. [[0, 1], [2]] or the text \"0,1|2\", got {_json(v)}")
    else:                                   # list[str] | str
        ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        _check(ok, f"{where}: expected a string or a list of strings, got {_json(v)}")
    _check(ok, f"{where}: expected {_EXPECT.get(typ, typ)}, got {_json(v)}")
    return v


def _check_finite(cfg: "Config") -> None:
    """Every float field is finite (covers configs built in Python, not only parsed ones)."""
    for section in _SECTIONS:
        sec = getattr(cfg, section)
        for f in dataclasses.fields(sec):
            v = getattr(sec, f.name)
            if isinstance(v, float):
                _check(math.isfinite(v), f"{section}.{f.name}: expected a finite number, got {v}")


def _resolve_paths(cfg: "Config") -> None:
    for section, name in PATH_FIELDS:
        sec = getattr(cfg, section)
        v = getattr(sec, name)
        if isinstance(v, str) and v:
            setattr(sec, name, os.path.abspath(os.path.expanduser(v)))


def config_diff(old: "Config", new: "Config") -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) for every field that differs, in declaration order."""
    a, b = old.to_dict(), new.to_dict()
    out = []
    for key, v in b.items():
        if isinstance(v, dict):
            out += [(f"{key}.{k}", a[key].get(k), x) for k, x in v.items() if a[key].get(k) != x]
        elif a.get(key) != v:
            out.append((key, a.get(key), v))
    return out


def resume_changes(old: "Config", new: "Config", epochs_done: int) -> list[tuple[str, Any, Any]]:
    """The changes a resume may apply (fields of RESUME_SAFE); any other change raises ConfigError
    listing each changed field, old → new."""
    diff = config_diff(old, new)
    bad = [f"{k}: {_json(o)} → {_json(n)}" for k, o, n in diff if k not in RESUME_SAFE]
    if new.train.epochs < epochs_done:
        bad.append(f"train.epochs: {new.train.epochs} is below the {epochs_done} epochs already trained")
    if bad:
        raise ConfigError("cannot resume with these changes to the run's config (old → new):\n  " + "\n  ".join(bad) +
                          "\nstart a new run (--out) for them; a resume may change only: " + ", ".join(RESUME_SAFE))
    return diff


def _parse_value(text: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {key}: expected a boolean (true/false), got {text!r}")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--set {key}: expected an integer, got {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--set {key}: expected a number, got {text!r}") from None
    if typ is str:
        return text
    if typ is dict:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--set {key}: expected a JSON object, got {text!r} ({e.msg})") from None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return text  # list[str] | str: keep the string form, DataConfig.task_names() splits commas
    return text


def _groups_from_text(text: str, where: str, auxiliary=None) -> dict:
    """The edge: "0,1,+2|2,3" → {"groups": [[0, 1, 2], [2, 3]], "auxiliary": [[2], []]}."""
    from .partition import parse_text
    try:
        groups, aux = parse_text(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    _check(not (aux and auxiliary), f"{where}: '+' marks and grouping.auxiliary both given; use one")
    return {"groups": groups, "auxiliary": aux or (auxiliary or [])}


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (e.g. ``train.epochs=5``), re-validating the result."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] == "name":
            d["name"] = value
            continue
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(f"--set {key}: expected SECTION.KEY with SECTION in {sorted(_SECTIONS)}")
        section, name = parts
        hints = typing.get_type_hints(_SECTIONS[section])
        if name not in hints:
            valid = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[section]))
            raise ConfigError(f"--set {key}: unknown key; {section} has: {valid}")
        if (section, name) == ("grouping", "groups"):   # the text form; '+t' marks fill grouping.auxiliary
            d[section].update(_groups_from_text(value, f"--set {key}"))
            continue
        if hints[name] == Partition:
            d[section][name] = _groups_from_text(value, f"--set {key}")["groups"]
            continue
        d[section][name] = _parse_value(value, hints[name], key)
    return Config.from_dict(d)


# ----------------------------------------------------------------------------- recipes
# Named recipes: plain functions returning a Config; override anything with --set. Each recipe says
# which source it reproduces (``RECIPE_FOLLOWS``, shown by ``fastdmtg recipes``):
#   paper      fastdmtg's defaults: the paper where it is explicit, otherwise the authors' released code
#              (the naive-MTL baselines, which the paper does not describe, are the release's values),
#              plus the documented fastdmtg choices (precision policy, nearest resize of class ids);
#   reference  the released code as it is (the ``*_reference`` recipes);
#   ours       fastdmtg's own test and demo settings (the synthetic planted-group data).
# docs/fidelity.md has one row per difference between the two, with the switch that selects it.

def reference_common(cfg: Config) -> Config:
    """The switches where fastdmtg's default differs from the released code whatever the recipe: fp32
    (no autocast), the plateau schedule on the training loss, no naive-MTL initialisation, no stop on
    divergence (the release stops only on a NaN loss: train.on_divergence=warn flags it in results.json
    and trains on). A format adds its own (Taskonomy: the release's bilinear resize of segmentation ids
    and its evaluation loss). Everything else the recipes
    already set to the release's values (best-checkpoint rule, validation after epoch 1, mIoU
    definition, SyncBatchNorm, shared Gumbel noise, rotate loss, 1/√K scaling)."""
    cfg.name += "_reference"
    cfg.train.amp = "off"
    cfg.train.init = "scratch"
    cfg.train.on_divergence = "warn"
    cfg.optim.plateau_on = "train"
    return cfg


def naive_twin(cfg: Config, name: str) -> Config:
    """The naive-MTL twin of a DMTG recipe's config, named ``name``: the same data, model and schedule,
    one encoder for all tasks (grouping.method=naive-mtl; model.branches=0 resolves to K = 1)."""
    cfg.name = name
    cfg.grouping.method = "naive-mtl"
    return cfg


# The recipes are the dataset formats' (each format's ``recipes``, fastdmtg/data/base.py), with the
# naive-MTL twin of each (``--method naive-mtl`` switches a recipe to its twin).
RECIPES: dict[str, typing.Callable[[], Config]] = {}
RECIPE_FOLLOWS: dict[str, str] = {}       # recipe -> paper | reference | ours
NAIVE_OF: dict[str, str] = {}             # recipe -> its naive-MTL twin


_FORMATS_WITH_RECIPES: set[str] = set()


def register_format_recipes() -> None:
    """Register the recipes of every format of ``FORMATS`` not registered yet: the built-in ones at
    import, a format added to FORMATS later (a plugin outside the package) on its first recipe lookup."""
    for name in [n for n in FORMATS if n not in _FORMATS_WITH_RECIPES]:
        _FORMATS_WITH_RECIPES.add(name)
        for r in _formats.recipes_of(name, sys.modules[__name__]):
            register_recipe(r.name, r.build, r.follows, r.naive)


def register_recipe(name: str, fn: typing.Callable[[], Config], follows: str = "ours",
                    naive: str | None = None) -> None:
    """Add a named recipe; ``follows`` says what it reproduces: paper | reference | ours; ``naive`` is
    its naive-MTL twin (the recipe ``--method naive-mtl`` runs instead), if it has one."""
    _check(follows in ("paper", "reference", "ours"), f"recipe {name}: follows must be paper|reference|ours")
    RECIPES[name] = fn
    RECIPE_FOLLOWS[name] = follows
    if naive is not None:
        NAIVE_OF[name] = naive


register_format_recipes()


def get_recipe(name: str) -> Config:
    register_format_recipes()
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    try:        # recipes edit fields after construction: validated again as a whole
        return Config.from_dict(RECIPES[name]().to_dict())
    except ConfigError as e:
        raise ConfigError(f"recipe {name}: {e}") from None


def check_init(cfg: Config) -> None:
    """When a run starts: train.init=naive (the paper's DMTG recipes) needs the naive-MTL model to start
    from. A clear error instead of silently training from scratch (the paper's §4.1 initialises DMTG
    from the trained naive-MTL weights; the release ships no config that does)."""
    if cfg.train.init == "naive" and cfg.grouping.method == "dmtg" and not cfg.train.init_from:
        raise ConfigError(
            "train.init=naive: this recipe follows the paper (§4.1), which starts DMTG from a trained naive-MTL "
            "model, but train.init_from is empty — train the naive model first (`fastdmtg train --method naive-mtl "
            "--recipe SAME --out runs/naive ...`), then add `--init-from runs/naive --reference runs/naive`; or "
            "`--set train.init=scratch` to start from scratch as the released code does (docs/fidelity.md)")
