"""Loading `configs/*.py` files and applying `--config.a.b=value` overrides.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`; it is named on the
command line as `path/to/file.py[:arg]`. Overrides may only set keys that exist: an unknown key is
an error that names it (a typo must not silently train the wrong model).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
from collections.abc import Iterable

import ml_collections


class ConfigError(ValueError):
    pass


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`configs/shapes.py:ldm,smoke` -> get_config("ldm,smoke"), locked."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_ldm_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    config = module.get_config(arg or None)
    config.lock()
    return config


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --config.sample.sampler=ddim


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set `config.<key>` from its command-line text, checking that the key exists."""
    *parents, leaf = key.split(".")
    node = config
    walked = []
    for name in parents + [leaf]:
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            where = ".".join(walked) or "<top level>"
            valid = (
                ", ".join(sorted(node.keys()))
                if isinstance(node, ml_collections.ConfigDict)
                else ""
            )
            raise ConfigError(
                f"unknown config key {key!r}: {where} has no field {name!r}"
                + (f" (valid: {valid})" if valid else "")
            )
        if name != leaf:
            node = node[name]
        walked.append(name)
    old = node[leaf]
    value = _parse_value(text)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(old, str) and not isinstance(value, str):
        value = text
    if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
        value = (value,)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"bad value for config key {key!r}: {text!r} ({e})") from None


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Load a config file and apply `a.b=value` overrides (without the `--config.` prefix)."""
    config = load_config_file(spec)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --config.some.key=value")
        apply_override(config, key, text)
    return config


def save_config(config: ml_collections.ConfigDict, path: pathlib.Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2, default=list) + "\n")


def read_config(path: pathlib.Path) -> ml_collections.ConfigDict:
    """A config saved by `save_config` (as written next to a run's checkpoints)."""
    return ml_collections.ConfigDict(json.loads(pathlib.Path(path).read_text()))


def param_groups(*names: str) -> dict:
    """`config.param_groups` for an objective's trainable groups: per group, the optimizer fields
    and `ema_decay` that replace `config.optimizer`'s and `config.ema_decay` when set (None: not
    set), e.g. `--config.param_groups.text_encoder.learning_rate=1e-4`; `ema_decay=0`: no EMA
    copy of that group."""
    placeholder = ml_collections.config_dict.placeholder
    fields = dict(
        learning_rate=float, warmup_steps=int, lr_schedule=str, b1=float, b2=float,
        weight_decay=float, ema_decay=float,
    )  # fmt: skip
    return {name: {k: placeholder(t) for k, t in fields.items()} for name in names}
