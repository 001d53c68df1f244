"""Config files (``--config``).

``fastdmtg train --config FILE``: FILE is a JSON object (or YAML, .yaml/.yml, when PyYAML is
installed) holding a full config — e.g. a run's config.json, or the file ``--dry-run --save-config``
wrote — or any part of one: ``{"train": {"epochs": 5}, "dmtg": {"tau": 4}}``. Its fields are laid
over the recipe (``--recipe``, or the default), then ``--data-root``/``--method`` and ``--set``
apply on top. Unknown sections or keys and wrongly typed values are one-line errors naming the
file and field; so is a key given twice in one object (JSON and YAML would silently keep the
last one). Relative paths in it are resolved against the working folder, as with ``--set``.

The config of ``--dry-run`` / ``--save-config``, every ``auto`` replaced by what this machine would
run, is ``fastdmtg.builder.resolve(cfg).as_config()``: the resolver the training step is built from.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config, ConfigError


class _Duplicate(ValueError):
    """A key given twice in one object of a config file (the message: the key's dotted path)."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json's ``object_pairs_hook``: the object as a dict, or ``_Duplicate`` naming the repeated key
    (its sections are filled in by the enclosing objects, which parse after their contents)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _dotted(d: dict, key: str) -> str:
    """``key`` prefixed with its section when ``d`` holds it in exactly one section (names the place)."""
    where = [sec for sec, v in d.items() if isinstance(v, dict) and key in v] if isinstance(d, dict) else []
    return f"{where[0]}.{key}" if len(where) == 1 else key


def _yaml_loader(yaml):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""
    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            k = loader.construct_object(key_node, deep=deep)
            if k in seen:
                raise ConfigError(f"key {k!r} given twice (lines {seen[k]} and {key_node.start_mark.line + 1})")
            seen[k] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep=deep)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def read_config_file(path: str | Path) -> dict:
    """A config file → its dict (not yet validated). One-line errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found (--config)")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{p}: reading YAML needs PyYAML (pip install pyyaml); or write the config as "
                              "JSON") from None
        try:
            d = yaml.load(text, Loader=_yaml_loader(yaml))
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}; a config file gives each key once") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            d = json.loads(text, object_pairs_hook=_no_duplicates)
        except _Duplicate as e:
            # where: parse again keeping the last value, to name the section holding the key
            raise ConfigError(f"{p}: key {_dotted(json.loads(text), str(e))!r} given twice; a config file gives "
                              "each key once") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object with sections (data, model, grouping, optim, train), "
                          f"got {type(d).__name__}")
    return d


def merge_config(base: Config, partial: dict, source: str | Path) -> Config:
    """``partial`` (a full or partial config dict) laid over ``base``, validated."""
    d = base.to_dict()
    for key, val in partial.items():
        if isinstance(val, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **val}
        else:
            d[key] = val
    try:
        return Config.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
