"""A process's start-up objects, kept out of the garbage collector's full passes."""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("sandstream.heap")


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object alive now (`gc.freeze`): the
    collector's full passes no longer walk them. Call it once a process has
    made what it keeps for its life (imports, clients, the model SDKs).

    Why: a worker that has imported the model SDKs holds some hundreds of
    thousands of objects, and the first full pass over them held its event loop
    for about 100 ms: every turn streaming then lost that much, at once (bench
    6e, a worker's first turns). Unfrozen, every later full pass walks them
    again. Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("start-up heap frozen: %d objects out of the collector's full passes", frozen)
    return frozen


def freeze_new_objects() -> int:
    """Freeze what the process made since the last freeze, without a collection
    first: for what it makes later to keep for its life, such as a model SDK a
    turn needs first (a collection then, over a just-imported SDK, would hold
    the event loop as long as the one this spares). Garbage among them is kept
    too, once. Returns the number of objects frozen in all."""
    gc.freeze()
    return gc.get_freeze_count()
