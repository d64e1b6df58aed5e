"""Import torchvision without importing ``torch._dynamo`` (~1 s of every stage's start).

torchvision 0.29's ``ops/roi_align.py`` wraps its kernel in ``lazy_compile`` so that importing it "avoids
eagerly importing dynamo" (pytorch/vision#8436: importing dynamo "has undesirable side effects for eager mode
only users"), yet the same file's line 7, ``from torch._dynamo.utils import is_compile_supported``, imports
dynamo at once: 1.06 s of ``import torchvision``'s 1.16 s here (``python -X importtime``, 2026-12-08), in every
process that builds a ResNet, although a stage that trains nothing (a convert, a random-init backbone, a report)
never needs dynamo. ``import_torchvision`` lets that one name resolve to a function that imports the real one on
its first call (roi_align's deterministic path, which the pipeline never takes); the placeholder modules exist
only while torchvision's package is imported, so a later ``import torch._dynamo`` (an optimizer's first step,
``torch.compile``) is the real one. tests/test_torchvision_import.py checks both, and that roi_align still runs.
"""
from __future__ import annotations

import sys

from barlow.import_stand_in import stand_in


def _is_compile_supported(device_type):
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


def import_torchvision():
    """``import torchvision``, with dynamo left unimported (where neither is imported yet: barlow.import_stand_in)."""
    if "torchvision" not in sys.modules:
        import torch  # noqa: F401  (torch's own import must not see the placeholders)

        with stand_in({"torch._dynamo": {}, "torch._dynamo.utils": {"is_compile_supported": _is_compile_supported}}):
            import torchvision  # noqa: F401
    import torchvision
    return torchvision
