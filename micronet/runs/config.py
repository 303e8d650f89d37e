"""Typed configuration: Hydra composes a tree, each stage takes typed dataclasses from it.

Library code never sees the whole Hydra tree. ``typed(Cls, node, "group")`` checks the node
against the dataclass (unknown keys, wrong types) and raises :class:`ConfigError` with one
clear line naming the offending key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

T = TypeVar("T")


class MicronetError(Exception):
    """A problem the user can fix (bad input, missing run, busy directory): reported in one line."""


class ConfigError(MicronetError, ValueError):
    """An invalid configuration value or key."""


def typed(cls: type[T], node: Any, where: str) -> T:
    """Validate ``node`` (DictConfig, dict or None) against dataclass ``cls`` and build it."""
    if node is None:
        node = {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), node)
        obj = OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "value"
        raise ConfigError(f"{where}: {key} is required (add {key}=... to the command line)") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}.{key}: {msg}" if key else f"{where}: {msg}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return obj


def as_dict(obj: Any) -> dict:
    """A dataclass as a plain dict (for checkpoints and JSON)."""
    return dataclasses.asdict(obj)
