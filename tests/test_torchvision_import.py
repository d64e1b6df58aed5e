"""barlow.torchvision_import: torchvision without torch._dynamo, and nothing of it left behind."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

CHECK = r"""
import sys
import torch
from barlow.torchvision_import import import_torchvision

tv = import_torchvision()
assert "torch._dynamo" not in sys.modules, "torchvision's import imported dynamo"
assert "_dynamo" not in vars(torch), "a placeholder is left as torch._dynamo"
tv.models.resnet18()
# roi_align itself: a constant map gives the constant in every bin (an oracle independent of torchvision)
x = torch.full((1, 2, 8, 8), 3.0)
boxes = torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]])
out = tv.ops.roi_align(x, boxes, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2)
assert out.shape == (1, 2, 2, 2) and torch.allclose(out, torch.full_like(out, 3.0)), out
# the deferred name resolves to dynamo's own function, and dynamo itself is the real one afterwards
roi = sys.modules["torchvision.ops.roi_align"]
assert roi.is_compile_supported("cpu") is True
import torch._dynamo
from torch._dynamo.utils import is_compile_supported
assert hasattr(torch._dynamo, "optimize") and hasattr(torch._dynamo, "disable")
assert roi.is_compile_supported("cpu") == is_compile_supported("cpu")
print("ok")
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_torchvision_imports_without_dynamo_and_leaves_the_real_one_importable():
    r = _python(CHECK)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_a_plain_torchvision_import_does_import_dynamo():
    """The cost this module removes is there without it (so the test above can tell the two apart)."""
    r = _python("import sys, torchvision; print('torch._dynamo' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]


def test_an_imported_dynamo_or_torchvision_is_used_as_it_is():
    r = _python("import sys, torch._dynamo; from barlow.torchvision_import import import_torchvision\n"
                "tv = import_torchvision(); m = sys.modules['torchvision.ops.roi_align']\n"
                "print(m.is_compile_supported is sys.modules['torch._dynamo.utils'].is_compile_supported)")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]
