"""One-off studies: measured once to answer one question, not part of ``python -m benchmarks.run`` (README.md here)."""
