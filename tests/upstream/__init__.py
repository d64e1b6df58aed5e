"""Load the vendored upstream files (see README.md): mmcv configs and the few code objects we test against."""
from __future__ import annotations

import copy
import types
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

HERE = Path(__file__).parent
MMSELFSUP = HERE / "mmselfsup"
MMCV = HERE / "mmcv"
PRETRAIN_300E = "configs/selfsup/barlowtwins/barlowtwins_resnet50_8xb256-coslr-300e_in1k.py"
MHEAD_90E = "configs/benchmarks/classification/imagenet/resnet50_mhead_linear-8xb32-steplr-90e_in1k.py"
LINEAR_100E = "configs/benchmarks/classification/imagenet/resnet50_linear-8xb32-steplr-100e_in1k.py"


def _merge(base: dict, child: dict) -> dict:
    """mmcv.Config's rule: child dicts merge into base dicts key by key (``_delete_`` replaces)."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_delete_"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = {a: b for a, b in v.items() if a != "_delete_"} if isinstance(v, dict) else copy.deepcopy(v)
    return out


def mmcv_config(rel: str) -> dict:
    """An MMSelfSup config file with its ``_base_`` files merged, as mmcv.Config.fromfile builds it."""
    path = MMSELFSUP / rel
    ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)  # noqa: S102 - our vendored copy
    bases = ns.pop("_base_", [])
    cfg: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        cfg = _merge(cfg, mmcv_config(str((path.parent / b).resolve().relative_to(MMSELFSUP.resolve()))))
    own = {k: v for k, v in ns.items() if not k.startswith("__") and not isinstance(v, types.ModuleType)}
    return _merge(cfg, own)


class _Registry:
    def register_module(self, *a, **k):
        return lambda cls: cls


def _exec_code(path: Path, replace: dict[str, str], names: dict) -> dict:
    src = path.read_text()
    for old, new in replace.items():
        assert old in src, f"{path}: expected import line {old!r} not found"
        src = src.replace(old, new)
    ns = dict(names)
    exec(compile(src, str(path), "exec"), ns)  # noqa: S102 - our vendored copy
    return ns


def mmselfsup_lars() -> type:
    """mmselfsup/core/optimizer/optimizers.py LARS, as is."""
    ns = _exec_code(MMSELFSUP / "mmselfsup/core/optimizer/optimizers.py",
                    {"from mmcv.runner.optimizer.builder import OPTIMIZERS": ""}, {"OPTIMIZERS": _Registry()})
    return ns["LARS"]


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def latent_cross_correlation_head() -> type:
    """mmselfsup/models/heads/latent_pred_head.py LatentCrossCorrelationHead, as is (BaseModule = nn.Module)."""
    path = MMSELFSUP / "mmselfsup/models/heads/latent_pred_head.py"
    src_imports = [line for line in path.read_text().splitlines() if line.startswith(("from ", "import "))]
    replace = {line: "" for line in src_imports if "mmcv" in line or "builder" in line or line.startswith("from ..")}
    ns = _exec_code(path, replace, {"BaseModule": nn.Module, "get_dist_info": _dist_info, "HEADS": _Registry(),
                                    "build_neck": None, "torch": torch, "nn": nn})
    return ns["LatentCrossCorrelationHead"]


def mmcv_cosine_lr_hook() -> type:
    """mmcv/runner/hooks/lr_updater.py CosineAnnealingLrUpdaterHook, as is (Hook = object)."""
    ns = _exec_code(MMCV / "mmcv/runner/hooks/lr_updater.py", {"import mmcv\n": "", "from .hook import HOOKS, Hook": ""},
                    {"HOOKS": _Registry(), "Hook": object, "mmcv": types.SimpleNamespace(is_list_of=lambda *a, **k: False)})
    return ns["CosineAnnealingLrUpdaterHook"]


def mmcv_kaiming_init_defaults() -> dict:
    """The defaults of mmcv/cnn/utils/weight_init.py KaimingInit.__init__ (read from the file's AST)."""
    import ast

    tree = ast.parse((MMCV / "mmcv/cnn/utils/weight_init.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KaimingInit")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = init.args.args[-len(init.args.defaults):]
    return {a.arg: ast.literal_eval(d) for a, d in zip(args, init.args.defaults)}
