"""The one builder of the training step: speed switches, model preparation, method, optimizer, step
module and runner. Used by the Trainer (fastdmtg.train), ``fastdmtg bench step`` and ``fastdmtg
profile`` (fastdmtg.bench), so a benchmark times exactly the step a run trains with.

    build_training_step(cfg, taskset, image_size, device, world_size, rank, init_from) -> TrainingStep

      resolve ─▶ Resolved (every auto decided: precision, kernels, compile, cuda_graph, channels_last,
                 batched, fused_stem, fused optimizer, data backend, K)
      build_multibranch(cfg.model) ─▶ [init_from: load_single_branch] ─▶ prepare_model ─▶ model
      build_method(cfg) ─▶ method (set_rank)          build_optimizer(model + method params)
      StepModule(model, method, taskset) ─▶ [DDP] ─▶ StepRunner(eager | compile | graph)

The caller owns the data (it passes the taskset and image size), the random seed (set before the
call: the model's initialisation draws from it) and everything around the step (scheduler,
checkpoints, evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import ops, pipelines
from .config import Config, resolved_branches
from .methods import GroupingMethod, method_class
from .methods.augment import build_augmentation
from .models import BranchedNet, build_multibranch
from .models.batched import BatchedMultiBranchNet, supports_batching
from .registry import BACKBONES
from .step import DDP_GRAPH_WARMUP, StepModule, StepRunner, autocast_factory, set_output_precision, wrap_ddp

# model.fused_stem=auto: the fused BN-ReLU-maxpool stem op is tested against the PyTorch reference but
# not yet timed on a GPU (benchmarks/gpu_check.sh times it), so auto leaves it off everywhere
FUSED_STEM_AUTO = False


def build_method(cfg, num_tasks: int, task_names: list[str] | None = None) -> GroupingMethod:
    """Every method class is built as ``cls.from_config(cfg, num_tasks, task_names)``; with
    train.aggregator set, it trains with that augmentation."""
    method = method_class(cfg.grouping.method).from_config(cfg, num_tasks, task_names)
    if cfg.train.aggregator != "none":
        method.augment = build_augmentation(cfg.train.aggregator, cfg, num_tasks, method.num_branches)
    return method


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return dev


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """train.amp: bf16 autocast in the training forward for mixed / bf16, and by default (auto) on CUDA."""
    return cfg.train.amp in ("mixed", "bf16") or (cfg.train.amp == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class Resolved:
    """A config's ``auto`` values decided for one device and number of processes (``resolve``). The
    builder assembles the step from it, ``--dry-run`` / ``--save-config`` write it back as a config
    (``as_config``), results.json records its speed switches (``speed``)."""
    cfg: Config                   # the config as asked (its auto values kept)
    device: torch.device          # train.device
    bf16: bool                    # train.amp: bf16 autocast in the training forward
    kernels: str                  # train.kernels: the fused ops' backend here (triton | reference)
    compile: bool                 # train.compile
    cuda_graph: bool              # train.cuda_graph
    channels_last: bool           # train.channels_last
    batched: bool                 # model.batched (prepare_model: off where the architecture can't)
    fused_stem: bool              # model.fused_stem (prepare_model: off where the backbone has no stem)
    fused_optimizer: bool         # optim.fused
    data_backend: str             # data.backend
    branches: int | None          # model.branches, K (None while it depends on the data's task count)

    def speed(self) -> dict[str, bool]:
        """The speed switches by name (results.json's "speed" entries, ``TrainingStep.speed``)."""
        return {"compile": self.compile, "cuda_graph": self.cuda_graph, "channels_last": self.channels_last,
                "batched": self.batched, "fused_stem": self.fused_stem}

    def as_config(self) -> tuple[Config, list[str]]:
        """→ (the config with every ``auto`` replaced by its value here, the fields that were auto as
        ``section.key=value``): what ``--dry-run`` prints and ``--save-config`` writes."""
        onoff = {True: "on", False: "off"}
        values = {
            ("train", "device"): str(self.device),
            ("train", "amp"): "mixed" if self.bf16 else "off",
            ("train", "kernels"): self.kernels,
            ("train", "compile"): onoff[self.compile],
            ("train", "cuda_graph"): onoff[self.cuda_graph],
            ("train", "channels_last"): onoff[self.channels_last],
            ("model", "batched"): onoff[self.batched],
            ("model", "fused_stem"): onoff[self.fused_stem],
            ("optim", "fused"): onoff[self.fused_optimizer],
            ("data", "backend"): self.data_backend,
        }
        d = self.cfg.to_dict()
        changed = []
        for (sec, key), val in values.items():
            if d[sec][key] == "auto":
                d[sec][key] = val
                changed.append(f"{sec}.{key}={val}")
        if d["model"]["branches"] == 0 and self.branches is not None:        # 0 = auto: the method's K
            d["model"]["branches"] = self.branches
            changed.append(f"model.branches={self.branches}")
        return Config.from_dict(d), changed


def resolve(cfg: Config, device: torch.device | None = None, world_size: int = 1) -> Resolved:
    """Every ``auto`` of ``cfg`` decided for ``device`` (default: train.device's) and ``world_size``
    processes — the one place these rules are applied. A switch set ``on`` that cannot run here is a
    ValueError naming the field (train.kernels=triton without triton fails here, not mid-step)."""
    device = resolve_device(cfg.train.device) if device is None else device
    kernels = ops.resolve_backend(cfg.train.kernels, device)
    speed = _speed_switches(cfg, device, world_size)
    backend = pipelines.AUTO if cfg.data.backend == "auto" else cfg.data.backend   # the loaders' own auto
    return Resolved(cfg, device, use_bf16(cfg, device), kernels, **speed,
                    fused_optimizer=use_fused_optimizer(cfg, device), data_backend=backend,
                    branches=cfg.num_branches)


def _speed_switches(cfg: Config, device: torch.device, world_size: int) -> dict:
    """The auto|on|off speed switches as booleans for this device (everything is eager on CPU)."""
    t = cfg.train
    method = method_class(cfg.grouping.method)
    pruning = method.prunes_heads(cfg)          # its head mask may change during training
    cuda = device.type == "cuda"

    def pick(name, default_on_cuda):
        v = getattr(t, name)
        if v == "on":
            return True
        if v == "off":
            return False
        return cuda and default_on_cuda
    out = {"compile": pick("compile", True), "cuda_graph": pick("cuda_graph", True),
           "channels_last": pick("channels_last", True)}
    b = cfg.model.batched
    # auto: batched where the backbone declares it measured faster (its module loads only then)
    out["batched"] = b == "on" or (b == "auto" and cuda and BACKBONES.load(cfg.model.arch).batched_auto)
    fs = cfg.model.fused_stem
    out["fused_stem"] = fs == "on" or (fs == "auto" and cuda and FUSED_STEM_AUTO)
    if out["cuda_graph"] and not cuda:
        raise ValueError("train.cuda_graph=on needs a CUDA device")
    if out["cuda_graph"] and world_size > 1:
        # opt-in only (auto: off) until measured on several GPUs; docs/kernels.md "CUDA graphs under DDP"
        if t.cuda_graph != "on":
            out["cuda_graph"] = False
        elif pruning:
            raise ValueError(f"train.cuda_graph=on under DDP does not combine with head pruning ({method.pruning_switch}): "
                             "DDP then searches unused parameters on the host every step, which a replay skips; "
                             "use train.cuda_graph=off")
        elif cfg.model.sync_bn:
            raise ValueError("train.cuda_graph=on under DDP is not verified with model.sync_bn=true; "
                             "use train.cuda_graph=off")
    _eager_for_augmentation(cfg, out, world_size)
    if out["batched"] and pruning and cfg.model.sync_bn and world_size > 1:
        # batched branches skip dead branches through their own BN layers, which SyncBatchNorm
        # conversion replaces (docs/pruning.md): per-branch modules then
        if b == "on":
            raise ValueError(f"model.batched=on is not supported with {method.pruning_switch} and "
                             "model.sync_bn=true under DDP; use model.batched=off")
        out["batched"] = False
    return out


def _eager_for_augmentation(cfg: Config, speed: dict, world_size: int) -> None:
    """A training augmentation (methods.StepBackward) takes per-head losses and per-task gradients
    outside any graph: the step runs eagerly (compile and CUDA graph off), on per-branch modules
    (batched off: its blocks are per-branch parameters), on one process (its gradients are not DDP's
    all-reduced ones). An explicit ``on`` is an error; ``auto`` turns off with one log line."""
    from .methods import augmentation_of
    name = augmentation_of(cfg)
    if name is None:
        return
    if world_size > 1:
        raise ValueError(f"training augmentation {name}: not supported under DDP (its per-task gradients are "
                         "not all-reduced); run on one process")
    switched = []
    for key, field in (("compile", cfg.train.compile), ("cuda_graph", cfg.train.cuda_graph),
                       ("batched", cfg.model.batched)):
        if field == "on":
            where = "model.batched" if key == "batched" else f"train.{key}"
            raise ValueError(f"{where}=on: training augmentation {name} runs eagerly on per-branch modules; "
                             f"set {where}=auto or off")
        if speed[key]:
            switched.append(key)
        speed[key] = False
    from .log import get_logger
    get_logger("fastdmtg.builder").info(
        f"training augmentation {name}: eager step{' (' + ', '.join(switched) + ' off)' if switched else ''}: "
        "it computes per-head losses and per-task gradients outside any graph")


def step_mode(resolved: Resolved) -> str:
    return "+".join(m for m, on in (("compile", resolved.compile), ("graph", resolved.cuda_graph)) if on) or "eager"


def load_init(model: BranchedNet, path: str) -> None:
    """train.init_from: copy a naive-MTL (K = 1) model (a run folder's best.pt, or a checkpoint file)
    into every branch."""
    from . import checkpoint as ckpt
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "best.pt"
    model.load_single_branch(ckpt.load_checkpoint(p)["model"])


def prepare_model(model: BranchedNet, cfg: Config, resolved: Resolved,
                  world_size: int = 1) -> tuple[BranchedNet, Resolved]:
    """Apply the model-side switches: batched branches (when the architecture supports them),
    SyncBatchNorm under DDP, channels_last, the fused stem (when the backbone declares one:
    ``Backbone.set_fused_stem``), and the precision of the task heads (train.amp,
    fastdmtg.step.set_output_precision). → (the model, ``resolved`` with batched / fused_stem turned
    off where an ``auto`` could not apply: what ran)."""
    if resolved.batched:
        if not supports_batching(model):
            if cfg.model.batched == "on":
                raise ValueError(f"model.batched=on is not supported for model.arch={cfg.model.arch}")
            resolved = replace(resolved, batched=False)
        else:
            model = BatchedMultiBranchNet(model)
    if cfg.model.sync_bn and world_size > 1:
        if next(model.parameters()).device.type != "cuda":
            raise ValueError("model.sync_bn=true: SyncBatchNorm runs on CUDA only; set model.sync_bn=false "
                             "for a CPU (gloo) DDP run (per-rank BatchNorm statistics)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if resolved.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if resolved.fused_stem:
        set_fused_stem = BACKBONES.load(cfg.model.arch).set_fused_stem
        if set_fused_stem is None or set_fused_stem(model, cfg.train.kernels) == 0:
            if cfg.model.fused_stem == "on":
                raise ValueError(f"model.fused_stem=on: model.arch={cfg.model.arch} has no ResNet-variant stem")
            resolved = replace(resolved, fused_stem=False)
    set_output_precision(model, keep_fp32=cfg.train.amp != "bf16")     # after the conversions above
    return model, resolved


def build_step_module(model, method, taskset, cfg: Config, resolved: Resolved) -> StepModule:
    return StepModule(model, method, taskset, autocast_factory(resolved.bf16, resolved.device, resolved.cuda_graph),
                      resolved.channels_last, kernels=cfg.train.kernels)


def use_fused_optimizer(cfg: Config, device: torch.device) -> bool:
    """optim.fused: the fused Adam/AdamW/SGD kernels, by default (auto) on CUDA."""
    return cfg.optim.fused == "on" or (cfg.optim.fused == "auto" and device.type == "cuda")


def build_optimizer(cfg: Config, params, device: torch.device, *, fused: bool,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD from core PyTorch. ``fused``: the fused kernels (``Resolved.fused_optimizer``:
    optim.fused, by default on CUDA). For CUDA-graph capture the optimizer is capturable and its
    learning rate a device tensor the schedulers update in place."""
    o = cfg.optim
    kw = {"fused": True} if fused else {}
    lr = torch.tensor(o.lr, device=device) if capturable else o.lr
    if capturable and o.name != "sgd":
        kw["capturable"] = True
    if o.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=o.weight_decay, **kw)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, **kw)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, **kw)


def _raise_dynamo_limits(cfg: Config, num_tasks: int) -> None:
    """Head pruning under torch.compile: every change of the active head set is a new graph for
    dynamo, at most one per drop step (≤ N·(K−1)) — above dynamo's default limit of 8, after which it
    would silently fall back to eager for the rest of the run."""
    import torch._dynamo.config as dynamo_cfg
    need = num_tasks * (cfg.model.branches - 1) + 2
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_cfg, name):           # the name changed across torch versions
            setattr(dynamo_cfg, name, max(getattr(dynamo_cfg, name), need))


@dataclass
class TrainingStep:
    """The parts of one training step, as built for a config. ``runner(batch)`` runs forward,
    backward and the optimizer step → (total loss, L (N, K))."""
    model: BranchedNet
    method: GroupingMethod
    optimizer: torch.optim.Optimizer
    runner: StepRunner
    resolved: Resolved   # the config's auto values decided (what runs, after the model's own limits)
    mode: str            # eager | compile | graph | compile+graph
    prunes_heads: bool = False   # the method's head mask may change during training (HeadsPruned)

    @property
    def speed(self) -> dict[str, bool]:
        """The speed switches that run (results.json's "speed" entries)."""
        return self.resolved.speed()

    @property
    def kernels(self) -> str:
        """The backend the fused ops resolve to on this device (triton | reference)."""
        return self.resolved.kernels


def build_training_step(cfg: Config, taskset, image_size: int, device: torch.device, *, world_size: int = 1,
                        rank: int = 0, init_from: str | None = None) -> TrainingStep:
    """Build model, method, optimizer and step runner for ``cfg`` on ``device`` (under DDP when
    ``world_size`` > 1: the step module is wrapped and SyncBatchNorm applied per model.sync_bn).
    ``init_from``: a naive-MTL model to copy into every branch first (train.init_from)."""
    cfg = resolved_branches(cfg, taskset.num_tasks)            # model.branches=0 (auto) → K for these tasks
    resolved = resolve(cfg, device, world_size)               # fails here, not mid-step, if triton is missing
    model = build_multibranch(cfg.model, taskset.specs, image_size).to(device)
    if init_from:
        load_init(model, init_from)
    model, resolved = prepare_model(model, cfg, resolved, world_size)
    method = build_method(cfg, taskset.num_tasks, taskset.names).to(device)
    method.set_rank(rank)                       # dmtg.ddp_noise: one shared draw per step, or per rank
    optimizer = build_optimizer(cfg, list(model.parameters()) + list(method.parameters()), device,
                                capturable=resolved.cuda_graph, fused=resolved.fused_optimizer)
    pruning = method.prunes_heads(cfg)          # its head mask may change during training (HeadsPruned)
    module = build_step_module(model, method, taskset, cfg, resolved)
    warmup = 3
    if world_size > 1:
        # head pruning: dropped heads/branches take no part in the step (the same on all ranks)
        module = wrap_ddp(module, device, pruning, for_graph=resolved.cuda_graph)
        warmup = DDP_GRAPH_WARMUP if resolved.cuda_graph else warmup
    mode = step_mode(resolved)
    augment = method.step_backward()            # a training augmentation, or None: plain backward
    if augment is not None:
        augment.bind(model, taskset, method.weights())
    runner = StepRunner(module, optimizer, mode, warmup=warmup, full_batch=cfg.train.batch_size,
                        step_backward=augment)
    if resolved.compile and pruning:
        _raise_dynamo_limits(cfg, taskset.num_tasks)
    return TrainingStep(model, method, optimizer, runner, resolved, mode, pruning)
