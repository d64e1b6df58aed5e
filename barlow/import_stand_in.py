"""Placeholder modules that stand in for the length of one import, for names a library imports at its top and
never needs there (barlow.torchvision_import: torch._dynamo; barlow.ffcv_import: distutils.log)."""
from __future__ import annotations

import contextlib
import sys
import types


@contextlib.contextmanager
def stand_in(modules: dict[str, dict]):
    """``{module name: its attributes}`` put in ``sys.modules`` while the block runs, each child module also set
    as its parent's attribute; taken out after, so a later import of the same name is the real one. Does nothing
    where one of the names is imported already (the real module is then used as it is)."""
    if any(name in sys.modules for name in modules):
        yield
        return
    placed = {}
    for name, attrs in modules.items():
        placed[name] = module = types.ModuleType(name)
        vars(module).update(attrs)
        parent, _, child = name.rpartition(".")
        if parent in placed:
            setattr(placed[parent], child, module)
    sys.modules.update(placed)
    try:
        yield
    finally:
        for name, module in placed.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
