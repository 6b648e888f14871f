"""Whether this CPU computes bfloat16 natively (issue 17: ``--precision bf16`` is opt-in on CPU)."""

from __future__ import annotations

import functools
import platform

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""Linux ``/proc/cpuinfo`` flags of native bfloat16 arithmetic: Intel AMX (Sapphire Rapids and later) and
AVX512_BF16 (Cooper Lake, AMD Zen 4 and later). oneDNN's bfloat16 convolutions need one of them to be fast."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere or when unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512_BF16 (``NATIVE_BF16_FLAGS``); False when it has neither or when the
    flags cannot be read (not Linux: Apple silicon and others are reported as not native)."""
    if platform.system() != "Linux":
        return False
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def bf16_flags() -> list[str]:
    """Which of ``NATIVE_BF16_FLAGS`` this CPU has (for benchmark tables)."""
    flags = cpu_flags()
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
