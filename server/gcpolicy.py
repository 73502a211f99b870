"""The cyclic garbage collector's settings in the long-lived processes: the
server (``tillwire serve``) and its SQLite writer process.

Two measures, taken once the process has started:

* ``gc.freeze()``: what exists then (modules, configuration, the registry,
  the writer's inbox positions) lives as long as the process, and a full
  collection need not scan it again.
* Full collections at most every ``FULL_EVERY`` collections of the middle
  generation instead of 10.  CPython runs a full collection only when the
  objects promoted since the last one exceed a quarter of those it kept; after
  the freeze that base is nearly empty, so the quarter rule never held them
  back and every tenth middle collection became a full one.  Under the durable
  steady load that meant, in 8 s, 10-11 full collections in the server (pauses
  up to 25-38 ms) and 4-5 in the writer (up to 25-45 ms); with 100, at most
  one ran in the same runs.  Cyclic garbage that reaches the oldest
  generation waits longer to be freed, so the server keeps its per-connection
  objects out of cycles: a closed connection drops its timers (which held it)
  and is freed by reference counting at once (a test holds it to that with
  the collector off).
"""

from __future__ import annotations

import gc

FULL_EVERY = 100


def settle() -> int:
    """Freeze what is alive, space out full collections; returns the frozen count."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_EVERY)
    return gc.get_freeze_count()
