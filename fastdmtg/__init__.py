"""fastdmtg: fast one-shot differentiable multi-task grouping (DMTG) and baselines in PyTorch."""
from ._version import __version__  # noqa: F401

from .config import Config, get_recipe  # noqa: E402,F401


def load_grouped(run_dir, device="cpu"):
    """Load the pruned grouped model of a finished run → (GroupedNet, metadata)."""
    from .export import load_grouped as _lg
    return _lg(run_dir, device)
