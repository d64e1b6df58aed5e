"""Backbone weights from a file: our own ``backbone.pth`` or a published checkpoint, loaded safely.

Formats (``pretrain.checkpoint.format``; ``auto`` guesses from the file's structure):

- ``barlow``: our ``backbone.pth``, ``{"arch", "state_dict", "config", "epochs", ...}``;
- ``official``: facebookresearch/barlowtwins ``resnet50.pth``, the torchvision ResNet-50 state dict
  with ``fc`` removed (main.py: ``torch.save(model.module.backbone.state_dict(), 'resnet50.pth')``
  after ``backbone.fc = nn.Identity()``);
- ``mmselfsup``: an mmcv checkpoint (MMSelfSup's ``barlowtwins_resnet50_8xb256-coslr-300e_in1k_*.pth``):
  ``{"state_dict": {"backbone.conv1.weight", ..., "neck.fc0.weight", ...}, "meta": {...}}``. mmcls'
  ResNet (which MMSelfSup's subclasses) names its modules as torchvision does (``conv1``, ``bn1``
  via ``build_norm_layer(..., postfix=1)``, ``layer1.0.conv1``, ``downsample.0``/``.1`` for conv/BN
  when ``avg_down=False``, the default), so ``backbone.<key>`` maps to ``<key>``;
- ``torchvision``: a torchvision classifier's state dict (with ``fc``).

Keys are mapped by stripping ``module.`` (DDP) and keeping only the ``backbone.``/``encoder.``
sub-tree when there is one (this drops the projector, neck and head), then dropping ``fc.``; every
tensor of the config's backbone must then be present with its shape, and nothing else may be left.

Safe loading: every file is read with ``torch.load(weights_only=True)``, which builds only tensors
and plain containers/numbers/strings and never runs code from the pickle. The one allow-list on top
of torch's defaults is numpy scalars and their dtypes (``SAFE_NUMPY``: plain numbers an mmcv
``meta`` may hold). A file that needs any other global is refused with one line naming it, unless
the experiment sets ``pretrain.checkpoint.trust_checkpoint: true`` (then ``weights_only=False``:
only for a file from a source you trust, since unpickling it can run arbitrary code).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from barlow.errors import BadInput
from barlow.provenance import file_sha256

FORMATS = ("barlow", "official", "mmselfsup", "torchvision")
TRUST_HINT = "pretrain.checkpoint.trust_checkpoint: true"


def _numpy_safe_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType",
                                              "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType",
                                              "Float16DType", "Float32DType", "Float64DType") if hasattr(np, "dtypes")]
    # numpy 1 pickles name the scalar constructor numpy.core.multiarray.scalar, numpy 2 numpy._core...
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *dtypes]


SAFE_NUMPY = _numpy_safe_globals()


sha256 = file_sha256  # (the name its callers import)


def safe_load(path: str | Path, trust: bool = False, what: str = "weights file"):
    """``torch.load`` of a file this run did not write: weights_only unless ``trust``; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such {what}")
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - torch raises several types for damaged files
            raise BadInput(f"{path}: damaged or not a PyTorch {what} ({type(e).__name__}: "
                           f"{_first_line(e)})") from None
    try:
        with torch.serialization.safe_globals(SAFE_NUMPY):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        if "weights only load failed" in str(e).lower():
            needs = _unsafe_globals(path, e)
            raise BadInput(f"{path}: refused: loading it needs {needs}, which safe (weights_only) loading does not "
                           "allow (unpickling it could run code); if you trust the file's source, set "
                           f"{TRUST_HINT}") from None
        raise BadInput(f"{path}: damaged, truncated or not a PyTorch {what} ({type(e).__name__}: "
                       f"{_first_line(e)}); download or write it again") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0].split(". ")[0][:120] if text else "").rstrip(".")  # the first sentence


def _unsafe_globals(path: Path, err: Exception) -> str:
    """The globals the pickle refers to beyond the allow-list (read from its opcodes, never executed)."""
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files: read the name from torch's message
        pass
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_NUMPY if not isinstance(g, tuple)}
    allowed |= {g[1] for g in SAFE_NUMPY if isinstance(g, tuple)}
    names = [n for n in names if n not in allowed] or re.findall(r"GLOBAL ([\w.]+)", str(err))[:1]
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "") if names else \
        "objects beyond tensors and plain types"


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_module(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def guess_format(obj) -> str | None:
    """The format of a loaded file by its structure, None when it is none we know."""
    if isinstance(obj, dict) and "arch" in obj and _is_tensor_dict(obj.get("state_dict")):
        return "barlow"
    if isinstance(obj, dict) and _is_tensor_dict(obj.get("state_dict")):
        keys = _strip_module(obj["state_dict"])
        return "mmselfsup" if any(k.startswith("backbone.") for k in keys) else None
    if _is_tensor_dict(obj):
        keys = _strip_module(obj)
        return "torchvision" if any(k == "fc.weight" or k.endswith(".fc.weight") for k in keys
                                    if not k.startswith(("projector.", "neck.", "head."))) else "official"
    return None


def backbone_keys(sd: dict) -> dict:
    """A state dict in torchvision's backbone names: ``module.`` stripped, only the ``backbone.``/``encoder.``
    sub-tree kept when there is one (no projector/neck/head), ``fc.`` dropped."""
    sd = _strip_module(sd)
    for prefix in ("backbone.", "encoder."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in sd.items() if not k.startswith(("fc.", "projector.", "neck.", "head."))}


@functools.lru_cache(maxsize=None)
def expected_shapes(arch: str) -> dict[str, tuple]:
    """Every tensor of the config's backbone (on the meta device: no memory, no init cost)."""
    from barlow.model import backbone as make_backbone

    with torch.device("meta"):
        net = make_backbone(arch)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}.copy()


def check_backbone(sd: dict, arch: str, where: str) -> None:
    """One BadInput line naming the first missing or mismatched (or left-over) tensor."""
    for k, shape in expected_shapes(arch).items():
        if k not in sd:
            raise BadInput(f"{where}: has no tensor {k!r} of a {arch} backbone ({len(sd)} backbone tensors found); "
                           "wrong file, format or model.arch")
        if tuple(sd[k].shape) != shape:
            raise BadInput(f"{where}: tensor {k!r} has shape {list(sd[k].shape)}, a {arch} backbone needs "
                           f"{list(shape)}; a checkpoint of another model (fix model.arch or the preset)")
    extra = sorted(set(sd) - set(expected_shapes(arch)))
    if extra:
        raise BadInput(f"{where}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not part of a {arch} backbone; "
                       "a checkpoint of another model (fix model.arch or the preset)")


@dataclass
class Loaded:
    state_dict: dict
    format: str
    sha256: str
    info: dict = field(default_factory=dict)  # our backbone.pth's provenance (epochs, steps, commit, ...)


def load_weights(path: str | Path, arch: str, fmt: str = "auto", trust: bool = False) -> Loaded:
    """The backbone state dict (torchvision names) of ``path`` for ``arch``, checked tensor by tensor."""
    path = Path(path)
    obj = safe_load(path, trust)
    guessed = guess_format(obj)
    if fmt == "auto":
        if guessed is None:
            raise BadInput(f"{path}: not a checkpoint format we know ({_describe(obj)}); expected one of "
                           f"{', '.join(FORMATS)} (see README, 'Probe a released model')")
        fmt, how = guessed, "guessed"
    elif fmt not in FORMATS:
        raise BadInput(f"pretrain.checkpoint.format {fmt!r}: unknown; use auto or one of {', '.join(FORMATS)}")
    else:
        how = "given"
    where = f"{path} (format {fmt}, {how})"
    info: dict = {}
    if fmt == "barlow":
        if not (isinstance(obj, dict) and _is_tensor_dict(obj.get("state_dict"))):
            raise BadInput(f"{where}: no 'state_dict' of tensors in it ({_describe(obj)})")
        if obj.get("arch") is not None and obj.get("arch") != arch:
            raise BadInput(f"{where}: weights are for {obj.get('arch')!r}, the config says {arch!r}")
        sd = obj["state_dict"]
        info = {k: v for k, v in obj.items() if k not in ("state_dict", "config")}
    elif fmt == "mmselfsup":
        if not (isinstance(obj, dict) and _is_tensor_dict(obj.get("state_dict"))):
            raise BadInput(f"{where}: not an mmcv checkpoint (no 'state_dict' of tensors; {_describe(obj)})")
        sd = obj["state_dict"]
    else:
        if not _is_tensor_dict(obj):
            raise BadInput(f"{where}: not a plain state dict of tensors ({_describe(obj)})")
        sd = obj
    sd = backbone_keys(sd)
    check_backbone(sd, arch, where)
    return Loaded(sd, fmt, sha256(path), info)


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:4]
        return f"a dict with keys {', '.join(map(repr, keys))}{', ...' if len(obj) > 4 else ''}"
    return f"a {type(obj).__name__}"
