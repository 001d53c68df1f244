"""What a backbone declares (``fastdmtg.registry.BACKBONES``: model.arch → the ``BACKBONE`` of a module of
fastdmtg/models/).

Everything the rest of the package needs to know about one architecture lives with it: how it builds
its parts, whether it reads ``model.pretrained``, and which model fields leave it no shared trunk (the
STL baseline trains single-task networks that share nothing); whether ``model.batched=auto`` batches
it on CUDA, its fused stem, and BMTN's RSA locations and split points. The config, the builder and the
baselines ask this declaration and hold no branch on an architecture's name. Adding a backbone: its
file in fastdmtg/models/ (a ``build_parts`` and a ``BACKBONE = Backbone(...)``); nothing else names it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class RSALocations:
    """Where BMTN (fastdmtg.methods.bmtn) reads a single-task encoder's features, and where the
    backbone can split into a shared trunk and branches. A backbone without it does not support BMTN."""
    locations: tuple[str, ...]           # D points of one unshared encoder, in order
    split_field: str                     # the model field that picks the split (e.g. "shared")
    splits: dict[str, int]               # its values → how many of ``locations`` lie in the shared trunk
    # (unshared branch module, images (M, 3, S, S)) → the features at each location, D tensors (M, ...)
    features: Callable[[Any, Any], list]


@dataclass(frozen=True)
class Backbone:
    name: str
    build_parts: Callable[[Any, list, int], Any]   # (model config, task specs, image size) -> models.Parts
    loads_pretrained: bool = False                 # model.pretrained (a state-dict file) applies to it
    # model fields → the value that leaves nothing shared between the branches (STL)
    nothing_shared: dict[str, Any] = field(default_factory=dict)
    order: int = 10                                # its place in listings and messages
    # model.batched=auto turns batched branches on for CUDA: only where measured faster (docs/LOG.md)
    batched_auto: bool = False
    # model.fused_stem: (model, train.kernels) → how many stems now run the fused BN-ReLU-maxpool op;
    # None: the backbone has no such stem
    set_fused_stem: Callable[[Any, str], int] | None = None
    rsa: RSALocations | None = None                # BMTN's RSA locations and split points

    def share_nothing(self, model_cfg) -> dict[str, Any]:
        """The model fields to change so that no trunk is shared (those already so left out)."""
        return {k: v for k, v in self.nothing_shared.items() if getattr(model_cfg, k) != v}
