"""barlow imports FFCV with a plain dict for its image-mode table (barlow/ffcv_import.py): the table
is the same, numba is left as it was, and images stored both ways FFCV knows decode correctly."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from barlow.convert import WriteOptions, convert
from barlow.loader import make_loader
from tests.conftest import REPO

CHECK = """
import numba.typed
from barlow.ffcv_import import import_ffcv
import_ffcv()
import ffcv.fields.rgb_image as r
assert type(r.IMAGE_MODES) is dict and r.IMAGE_MODES == {"jpg": 0, "raw": 1}, r.IMAGE_MODES
assert numba.typed.Dict is not dict
import sys
assert "setuptools" not in sys.modules and "distutils" not in sys.modules, "FFCV's import loaded setuptools"
import distutils.log  # the real one afterwards (setuptools' shim, or the standard library's)
assert hasattr(distutils.log, "Log"), distutils.log
print("ok")
"""


def test_import_leaves_the_same_table_and_restores_numba():
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _smooth_folder(root, n=4):
    yy, xx = np.mgrid[0:32, 0:32]
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = np.stack([xx * 8, yy * 8, np.full_like(xx, 40 * (i + c))], -1).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def _decode_all(path, n):
    it = iter(make_loader(path, batch_size=n, train=False, workers=1, drop_last=False))
    try:
        return next(it)[0].clone().float()
    finally:
        it.close()


def test_jpeg_and_raw_images_both_decode(tmp_path):
    root = _smooth_folder(tmp_path / "ds")
    raw, jpg = tmp_path / "raw.beton", tmp_path / "jpg.beton"
    convert("image_folder", str(root), "train", raw, workers=1, options=WriteOptions(write_mode="raw"))
    convert("image_folder", str(root), "train", jpg, workers=1, options=WriteOptions(write_mode="jpg", jpeg_quality=95))
    from ffcv.reader import Reader

    modes = [set(Reader(str(f)).metadata["f0"]["mode"].tolist()) for f in (raw, jpg)]
    assert modes == [{1}, {0}]  # IMAGE_MODES: raw 1, jpg 0, as written by FFCV's own table
    a, b = _decode_all(raw, 8), _decode_all(jpg, 8)
    assert a.shape == b.shape == (8, 3, 32, 32)
    assert (a - b).abs().mean() < 3  # JPEG at quality 95 of smooth gradients


def test_two_decoders_in_one_process_print_no_traceback_but_other_unraisables_still_show(tmp_path):
    """The probe's pattern (crop decoder, then center decoder) made numba print a finalizer
    KeyError traceback at every successful run; only that one is dropped."""
    import subprocess
    import sys

    from barlow.convert import WriteOptions, convert
    from tests.conftest import REPO, write_odd_image_folder

    root = write_odd_image_folder(tmp_path / "img", per_class=2)
    for split in ("train", "val"):
        convert("image_folder", str(root), split, tmp_path / f"{split}.beton", workers=1,
                options=WriteOptions("proportion", 500, 90, 0.5))
    script = f"""
from barlow.loader import make_loader
for path, decode in (({str(tmp_path / 'train.beton')!r}, "rrc"), ({str(tmp_path / 'val.beton')!r}, "center")):
    for batch in make_loader(path, 2, train=False, workers=1, decode=decode, size=64, drop_last=False):
        pass
class Loud:
    def __del__(self):
        raise ValueError("a real problem")
Loud()
print("finished")
"""
    # FFCV's own compilation (no numba cache): the finalizer's KeyError is then raised for certain; with the cache a
    # dispatcher may be loaded instead of compiled and dropped, and the filter below would go untested
    import os

    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "BARLOW_FFCV_CACHE": "0"})
    assert r.returncode == 0 and "finished" in r.stdout, r.stderr[-2000:]
    assert "KeyError" not in r.stderr, r.stderr[-2000:]
    assert "ValueError: a real problem" in r.stderr  # everything else is still reported


def test_a_one_cpu_process_exits_after_writing_and_reading(tmp_path):
    """numba's TBB layer (Debian's oneTBB 2021.8) deadlocked at exit in a process limited to one CPU: the .beton
    was written, "wrote ..." printed, and the stage never returned (a 1-CPU SLURM task hung until its time limit)."""
    import os
    import shutil

    if shutil.which("taskset") is None:
        import pytest

        pytest.skip("needs taskset (util-linux)")
    root = _smooth_folder(tmp_path / "im")
    out = tmp_path / "t.beton"
    code = ("import sys; from barlow.convert import convert; from barlow.loader import make_loader;"
            "convert('image_folder', sys.argv[1], 'train', sys.argv[2], workers=1, image_size=32);"
            "print(sum(len(b[1]) for b in make_loader(sys.argv[2], 4, train=False, workers=1)))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code, str(root), str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and r.stdout.split()[-1] == "8", r.stderr[-2000:]


CACHED = """
import json, sys
from barlow.ffcv_import import import_ffcv
import_ffcv()
from ffcv.pipeline.compiler import Compiler
made = []
compile = Compiler.compile.__func__
def recording(cls, code, signature=None):
    made.append(compile(cls, code, signature))
    return made[-1]
Compiler.compile = classmethod(recording)
from barlow.loader import make_loader
it = iter(make_loader(sys.argv[1], 8, views=2, workers=1, decode=sys.argv[2], size=32, seed=0, train=False))
x, _, x2 = next(it)
stats = [d.stats for d in made if hasattr(d, "stats")]
print(json.dumps({"hits": sum(sum(s.cache_hits.values()) for s in stats),
                  "misses": sum(sum(s.cache_misses.values()) for s in stats), "sum": int(x.sum() + x2.sum())}))
it.close()
"""


def _cached_run(beton, cache_dir, decode="rrc", **env):
    import json
    import os

    r = subprocess.run([sys.executable, "-c", CACHED, str(beton), decode], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(cache_dir), **env})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NumbaWarning" not in r.stderr, r.stderr[-3000:]  # (the decoders numba will not cache: silenced)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_second_process_loads_ffcvs_compiled_code_from_numbas_cache(tmp_path):
    """The first process compiles and writes numba's cache, the next one loads it and decodes the same crops; with
    BARLOW_FFCV_CACHE=0 nothing is written (FFCV's own njit, no cache)."""
    root = _smooth_folder(tmp_path / "ds")
    beton = tmp_path / "train.beton"
    convert("image_folder", str(root), "train", beton, workers=1, options=WriteOptions(write_mode="jpg"))
    # the random-crop decoder (the pretraining views'); numba counts a miss for each function it will not cache
    first = _cached_run(beton, tmp_path / "cache")
    assert first["misses"] > 0 and list((tmp_path / "cache").rglob("*.nbi"))  # (its 2nd view may hit its 1st's)
    second = _cached_run(beton, tmp_path / "cache")
    assert second["hits"] > first["hits"] and second["hits"] + second["misses"] == first["hits"] + first["misses"]
    # the center-crop decoder (evaluation, deterministic), reading and decoding labels with the cached code: the
    # same pixels as FFCV's own compilation, which writes no cache
    plain = _cached_run(beton, tmp_path / "off", "center", BARLOW_FFCV_CACHE="0")
    warm = _cached_run(beton, tmp_path / "cache", "center")
    assert not (tmp_path / "off").exists() and plain["hits"] == 0 < warm["hits"]
    assert plain["sum"] == warm["sum"]


LAYER = ("import numba; from barlow.ffcv_import import import_ffcv; import_ffcv(); "
         "print(' '.join(numba.config.THREADING_LAYER_PRIORITY))")


def test_the_threading_layer_is_openmp_first_on_one_cpu_and_tbb_first_on_more():
    """TBB deadlocks at exit on one CPU (numba/numba#10556); OpenMP halves FFCV's decoding on two. A layer this
    module exported in a parent is chosen again for the child's CPUs; a user's own setting is kept."""
    import os
    import shutil

    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        import pytest

        pytest.skip("needs 2 CPUs and taskset")
    clean = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER_PRIORITY", "BARLOW_NUMBA_LAYER")}
    cpu, both = "0", "0,1"  # (taskset sets the mask whatever this pytest worker's own: make test pins it to one)

    def layer(*prefix, **env):
        r = subprocess.run([*prefix, sys.executable, "-c", LAYER], cwd=REPO, capture_output=True, text=True,
                           timeout=120, env={**clean, "PYTHONPATH": str(REPO), **env})
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()[0]

    assert layer("taskset", "-c", both) == "tbb" and layer("taskset", "-c", cpu) == "omp"
    exported = {"NUMBA_THREADING_LAYER_PRIORITY": "tbb omp workqueue", "BARLOW_NUMBA_LAYER": "tbb omp workqueue"}
    assert layer("taskset", "-c", cpu, **exported) == "omp"
    assert layer("taskset", "-c", cpu, NUMBA_THREADING_LAYER_PRIORITY="workqueue omp tbb") == "workqueue"


def _unraisable_from(source: str, filename: str, name: str):
    """An unraisable-hook argument for an exception raised in function ``name`` of ``source`` compiled as ``filename``,
    called through one more frame (numba's finalizer runs below a weakref callback)."""
    import types

    namespace: dict = {}
    exec(compile(source, filename, "exec"), namespace)
    try:
        (lambda: namespace[name]())()
    except BaseException as e:  # noqa: BLE001 - the point is to keep it
        return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__)


def test_the_filter_drops_only_a_keyerror_raised_in_numbas_dispatcher_finalizer():
    """By construction, independent of whether numba raises it in this process (it does not on one CPU)."""
    from barlow.ffcv_import import _numba_finalizer_keyerror

    numba_file = "/x/site-packages/numba/core/dispatcher.py"
    assert _numba_finalizer_keyerror(_unraisable_from("def finalizer():\n    raise KeyError(1)\n", numba_file,
                                                      "finalizer"))
    assert not _numba_finalizer_keyerror(_unraisable_from("def finalizer():\n    raise ValueError(1)\n", numba_file,
                                                          "finalizer"))
    assert not _numba_finalizer_keyerror(_unraisable_from("def other():\n    raise KeyError(1)\n", numba_file, "other"))
    assert not _numba_finalizer_keyerror(_unraisable_from("def finalizer():\n    raise KeyError(1)\n",
                                                          "/x/site-packages/ffcv/loader.py", "finalizer"))
