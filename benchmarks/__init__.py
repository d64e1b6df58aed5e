"""Performance benchmarks of the Barlow Twins pipeline: ``python -m benchmarks.run [--quick] [--with-pipeline]``.

Each figure lives in its own module (``loader``, ``step``, ``probe``, ``pipeline``, ``memory``) and runs
in its own subprocess (``python -m benchmarks.<module> --json OUT``), so that one figure's threads,
FFCV workers or memory never leak into the next one's numbers. ``benchmarks/README.md`` and
``benchmarks/results.json`` are written by ``benchmarks.run``. ``benchmarks.gpu_smoke`` is the GPU check
(``make gpu-smoke``). One-off studies, outside the suite, are in ``benchmarks/studies/`` (its README.md).
"""
