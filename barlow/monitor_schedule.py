"""When the pretraining monitor evaluates: one rule for the trainer (``barlow.monitor.Monitor.due``) and
the estimate (``barlow.estimate.monitor_evaluations``, which counts the evaluations without a loop).

Torch-free on purpose: ``python -m barlow estimate`` imports it, and must not need torch to count.
"""
from __future__ import annotations

import itertools
import math


def periods(every_steps: int, steps_per_epoch: int, at_epoch_end: bool) -> tuple[int, ...]:
    """The step periods of the evaluations besides the last step: every ``every_steps``, and with
    ``at_epoch_end`` every ``steps_per_epoch`` too."""
    return (every_steps, steps_per_epoch) if at_epoch_end else (every_steps,)


def due(step: int, total: int, every: tuple[int, ...]) -> bool:
    """Whether the monitor evaluates after optimizer step ``step`` of ``total``: a multiple of one of
    the ``periods``, or the last step."""
    return step == total or any(step % p == 0 for p in every)


def evaluations(total: int, every: tuple[int, ...]) -> int:
    """How many of the steps 1..total are ``due``, in closed form: the multiples of each period, less
    those counted twice (inclusion-exclusion over the lcm of each subset), plus the last step unless it
    is one of them."""
    if total < 1:
        return 0
    count = 0
    for k in range(1, len(every) + 1):
        for subset in itertools.combinations(every, k):
            count += (-1) ** (k + 1) * (total // math.lcm(*subset))
    return count + (0 if any(total % p == 0 for p in every) else 1)
