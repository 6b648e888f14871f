"""CPU inference tuning, applied from outside to a built network (the networks themselves stay plain).

* ``prepare_for_inference(model)`` (``inference``): the one call that gives a ``UniSeg`` or ``UniSegBackbone`` its
  CPU inference fast path: a wrapper sharing the model's parameters that runs channels-last maps, the fused
  channels-last instance norm + LeakyReLU, transposed convolutions as one matrix product and, for several tasks,
  the decoder's skip terms once for all tasks; same results within float32 tolerance. Decided per call (gradients
  off, float32, CPU, no tracing or export), without global state. ``TaskPredictor`` applies it by default.
* ``retain_freed_memory`` / ``release_freed_memory`` (``memory``): process-wide glibc allocator settings for the
  sliding window's large, repeated blocks, and handing that memory back after the network phase
  (``ReleaseFreedMemory``: the same as an ignite handler for MONAI's evaluators).
* ``native_bf16`` (``precision``): whether the CPU has native bfloat16 (AMX or AVX512_BF16), for the opt-in
  ``--precision bf16``.
* ``fast_path``: the kernels themselves.

``benchmarks/NOTES.md`` records why each piece exists and what it gains.
"""

from .inference import CpuInferenceBackbone, CpuInferenceModel, prepare_for_inference
from .memory import ReleaseFreedMemory, release_freed_memory, retain_freed_memory
from .precision import native_bf16

__all__ = ["prepare_for_inference", "CpuInferenceModel", "CpuInferenceBackbone", "retain_freed_memory",
           "release_freed_memory", "ReleaseFreedMemory", "native_bf16"]
