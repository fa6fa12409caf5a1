"""Import user code named on the command line (never from values stored in a run)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click


def load_object(reference: str) -> Any:
    """`PKG.MOD:NAME` → the object; the current directory is importable, as with `python -m`."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"{reference!r}: name an object as PKG.MODULE:NAME")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise click.BadParameter(f"can't import {module_name!r} ({e})") from e
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise click.BadParameter(f"{module_name!r} has no {attribute!r}") from None


def load_data(reference: str) -> Any:
    """A dataset or (inputs, labels) tuple; a function is called to produce one."""
    value = load_object(reference)
    is_data = isinstance(value, (tuple, list)) or hasattr(value, "__getitem__")
    return value() if callable(value) and not is_data else value
