"""Import FFCV without compiling a numba typed Dict in every process (3 s of each stage's start).

``ffcv.fields.rgb_image`` builds ``IMAGE_MODES = numba.typed.Dict()`` with two entries at import,
and numba compiles the typed-Dict methods for it anew in every process (3.0 s measured here; numba
cannot cache them). FFCV 1.0.2 reads that table only from Python (``generate_code`` and the
writer's ``encode``), never inside jitted code, so a plain dict with the same entries behaves the
same; the only other module that imports ``Dict`` (``ffcv.memory_managers.base``) never uses it.
FFCV is pinned (requirements.txt); tests/test_ffcv_import.py checks the table and both storage modes.

It also silences one known-harmless message: when a process has used FFCV pipelines with two
different decoders (the probes' crop decoder for training, the center decoder for evaluation),
numba 0.68's dispatcher finalizer (``numba/core/dispatcher.py``, ``finalizer``) raises a KeyError
while iterating the overloads of a dispatcher FFCV compiled and dropped; Python prints it as
"Exception ignored in: <finalize object ...>" with a traceback, in a run that succeeded. Only
that exception, raised in that function, is dropped; every other unraisable exception is shown.

And it lets numba keep what it compiles for FFCV on disk. FFCV's ``Compiler.compile`` calls ``njit`` without
``cache=True``, so every process (each stage's every rank) compiled the loader's functions again: ~2.5 s of
a 1-task pretraining stage's ~6.5 s here (a ResNet-18 at 32 px, 5 steps, timed by hand on 2026-12-08). With
numba's own cache (its index is keyed by the function's bytecode, its closure's values, the signature and
the CPU) the first process compiles and writes ``__pycache__/*.nbi|nbc`` beside FFCV's sources (or numba's
user cache directory where those are read-only; ``NUMBA_CACHE_DIR`` to choose), the next ones load. Numba
itself declines functions that hold pointers or large arrays (FFCV's JPEG decoders; a warning that is
silenced here), and parallel-compiled code is left uncached (the index does not key on that flag).
``BARLOW_FFCV_CACHE=0`` compiles as FFCV does.
"""
from __future__ import annotations

import os
import sys

from barlow.import_stand_in import stand_in

# numba runs FFCV's parallel code on its first available threading layer, TBB before OpenMP. Debian's oneTBB
# 2021.8 (libtbb12, which libopencv-dev pulls in) deadlocks in tbb::finalize at interpreter exit when the process
# may run on one CPU (a 1-CPU SLURM task, a pinned process): the stage finished its work and never exits
# (numba/numba#10556; tests/test_ffcv_import.py). There OpenMP goes first. With 2 CPUs or more TBB stays first:
# OpenMP halved FFCV's two-thread decoding here (benchmarks/loader.py --quick, the same minute: 3,709 samples/s
# with OpenMP first, 9,895 with TBB first; loader_full_aug fell from 7.2x to 2.85x). A user's own
# NUMBA_THREADING_LAYER or NUMBA_THREADING_LAYER_PRIORITY still decides.
ONE_CPU_PRIORITY, PRIORITY = "omp tbb workqueue", "tbb omp workqueue"


def _layer_priority() -> str:
    return ONE_CPU_PRIORITY if len(os.sched_getaffinity(0)) <= 1 else PRIORITY


def _numba_finalizer_keyerror(unraisable) -> bool:
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (unraisable.exc_type is KeyError and tb is not None and tb.tb_frame.f_code.co_name == "finalizer"
            and tb.tb_frame.f_code.co_filename.endswith("numba/core/dispatcher.py"))


def _install_unraisable_filter() -> None:
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _numba_finalizer_keyerror(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook


# FFCV 1.0.2's ``ffcv/pipeline/graph.py`` opens with ``from distutils.log import warn``, a name it never uses (it
# warns through ``warnings.warn``). In a virtualenv setuptools' distutils shim (distutils-precedence.pth) answers
# that import by importing setuptools itself: 0.16 s of ``import ffcv`` here (``python -X importtime``, 2026-12-08).
# A placeholder stands in while FFCV is imported (barlow.import_stand_in).
DISTUTILS_LOG = {"distutils": {}, "distutils.log": {"warn": lambda msg, *args: print(msg % args if args else msg,
                                                                                    file=sys.stderr)}}


def import_ffcv() -> None:
    """Import the ffcv package (once per process) with ``numba.typed.Dict`` standing as ``dict``."""
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    _install_unraisable_filter()
    # ours unless the user set it: a value this module exported in a parent (BARLOW_NUMBA_LAYER) is chosen again
    # for this process's own CPUs (a 1-CPU task started by a 2-CPU launcher)
    given = os.environ.get("NUMBA_THREADING_LAYER_PRIORITY")
    ours = given is None or given == os.environ.get("BARLOW_NUMBA_LAYER")
    if ours:
        layer = _layer_priority()
        os.environ["NUMBA_THREADING_LAYER_PRIORITY"] = os.environ["BARLOW_NUMBA_LAYER"] = layer  # (children too)
    import numba.typed

    if ours:  # numba read its config when first imported, which may have been before this call
        numba.config.THREADING_LAYER_PRIORITY = os.environ["NUMBA_THREADING_LAYER_PRIORITY"].split()

    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        with stand_in(DISTUTILS_LOG):
            import ffcv.fields.rgb_image  # noqa: F401  (imports the whole package)
    finally:
        numba.typed.Dict = typed_dict
    if os.environ.get("BARLOW_FFCV_CACHE", "1") != "0":
        _cache_compiled()


def _cache_compiled() -> None:
    """FFCV's ``Compiler.compile`` (ffcv/pipeline/compiler.py, 1.0.2) with ``cache=True`` where numba can use it."""
    import warnings

    from numba import njit
    from numba.core.errors import NumbaWarning
    from ffcv.pipeline.compiler import Compiler

    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)

    def compile(cls, code, signature=None):
        parallel = bool(getattr(code, "is_parallel", False)) and cls.num_threads > 1
        if not cls.is_enabled:
            return code
        return njit(signature, fastmath=True, nogil=True, error_model="numpy", parallel=parallel,
                    cache=not parallel)(code)

    Compiler.compile = classmethod(compile)
