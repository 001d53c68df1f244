"""What every config section's validation raises: ``ConfigError`` and ``check``. A module of its own so
that the method files, which declare their own config sections (``GroupingMethod.config_section``),
do not import ``fastdmtg.config`` (which gathers those sections from the methods registry)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def check(cond: bool, msg: str) -> None:
    """``ConfigError(msg)`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)
