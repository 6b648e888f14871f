"""Process-wide allocator tuning for CPU inference (glibc malloc): keep the sliding window's freed blocks for reuse
(``retain_freed_memory``) and hand them back after the network phase (``release_freed_memory``, or the
``ReleaseFreedMemory`` handler for a MONAI evaluator). ``benchmarks/NOTES.md`` attempts 3 and 10 have the numbers.
"""

from __future__ import annotations

import ctypes
import sys

from ..config import parse_bool

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


_GLIBC_DEFAULT_MMAP_MAX = 65536


def retain_freed_memory(enabled: bool = True) -> bool:
    """Keep freed memory in this process for reuse instead of returning it to the system (glibc malloc only).

    By default glibc serves every block above 32 MB with a fresh ``mmap`` and unmaps it when freed, so each
    full-resolution tensor of each sliding window (300-600 MB for the (192, 192, 64) patch) is faulted in page by
    page from zeroed kernel pages again: on CPU that is a large share of a forward pass (``benchmarks/NOTES.md``).
    With ``enabled`` large blocks come from the heap and freed ones are kept, so later windows reuse warm pages.
    The process's resident memory then stays at its peak instead of shrinking after it. Process-wide: the bundle
    calls it once at start (``retain_freed_memory`` in ``inference.json``; ``false`` there changes nothing).
    Returns whether the setting took effect (False when not enabled, or off Linux/glibc).
    """
    global _RETAINING
    libc = _glibc()
    if not parse_bool(enabled) or libc is None:
        return False
    _RETAINING = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _RETAINING


_RETAINING = False


def release_freed_memory() -> None:
    """After the network phase: hand the memory ``retain_freed_memory`` kept back to the system (``malloc_trim``).

    The freed blocks of the sliding windows are of no use to the resampling back to the input grid, whose blocks
    have other sizes; without this they would add to the peak. A no-op unless ``retain_freed_memory`` is in effect.
    """
    if _RETAINING:
        _glibc().malloc_trim(0)


class ReleaseFreedMemory:
    """An ignite handler for MONAI's evaluators: ``release_freed_memory()`` after each iteration's network phase.

    Attached to ``IterationEvents.FORWARD_COMPLETED``, which ``SupervisedEvaluator`` fires after the inferer (the
    sliding window) and before the postprocessing, so the resampling back to the input grid does not add its blocks
    to the retained ones. A no-op unless ``retain_freed_memory`` is in effect. In a bundle: an entry
    ``{"_target_": "uniseg_hub.cpu.ReleaseFreedMemory"}`` of the evaluator's handlers.
    """

    def attach(self, engine) -> None:
        from monai.engines.utils import (
            IterationEvents,  # imports MONAI (seconds): only when attached
        )

        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine=None) -> None:
        release_freed_memory()


def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, ...)
        return None


def _glibc_default_malloc() -> None:
    """Undo ``retain_freed_memory`` for blocks allocated from now on (for benchmarks and tests)."""
    global _RETAINING
    libc = _glibc()
    _RETAINING = False
    if libc is not None:
        libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)  # hand back what was retained, so it is not reused warm
