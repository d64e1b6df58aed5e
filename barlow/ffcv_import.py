"""Import FFCV without compiling a numba typed Dict in every process (3 s of each stage's start).

``ffcv.fields.rgb_image`` builds ``IMAGE_MODES = numba.typed.Dict()`` with two entries at import,
and numba compiles the typed-Dict methods for it anew in every process (3.0 s measured here; numba
cannot cache them). FFCV 1.0.2 reads that table only from Python (``generate_code`` and the
writer's ``encode``), never inside jitted code, so a plain dict with the same entries behaves the
same; the only other module that imports ``Dict`` (``ffcv.memory_managers.base``) never uses it.
FFCV is pinned (requirements.txt); tests/test_ffcv_import.py checks the table and both storage modes.
"""
from __future__ import annotations

import sys


def import_ffcv() -> None:
    """Import the ffcv package (once per process) with ``numba.typed.Dict`` standing as ``dict``."""
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    import numba.typed

    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        import ffcv.fields.rgb_image  # noqa: F401  (imports the whole package)
    finally:
        numba.typed.Dict = typed_dict
