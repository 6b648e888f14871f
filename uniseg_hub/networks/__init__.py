"""UniSeg in MONAI form: the universal prompt-driven model, its encoder, and the downstream backbone.

Axis order is MONAI's: tensors are (B, C, x, y, z). The official nnU-Net v1 model works in (z, y, x); converted
weights have their spatial axes reversed (see ``uniseg_hub.weights``), so the official patch (64, 192, 192) is
(192, 192, 64) here and the first stage's kernel (1, 3, 3) is (3, 3, 1).

Layout (defaults = the official 11-task model, ``uniseg_hub.config.UniSegConfig``):

* encoder (``encoder.py``): six stages of two conv blocks (conv, InstanceNorm(affine), LeakyReLU(0.01)) with
  32-64-128-256-320-320 features; the first conv of stages 1-5 is strided (2,2,1), then (2,2,2) four times. Stage 0
  has three input stems (1, 2, 4 channels) chosen by the input's channel count, sharing one InstanceNorm;
* task prompt (``prompt.py``): a learnable universal prompt (1, T, 6, 6, 4) is concatenated with the bottleneck and
  fused by three conv blocks (widths (320+T)//4, (320+T)//4, T) into T task prompts; the selected task's map is
  appended to the bottleneck, so 321 channels enter the first transposed convolution;
* decoder (``decoder.py``): five levels of transposed conv (no bias, kernel = stride) + skip concatenation + two
  3x3x3 conv blocks (the full-resolution level uses 3x3x3 too, an nnU-Net v1 quirk); one shared bias-free 1x1x1 head
  per level;
* added tasks (``added_task.py``): a task added after training (``uniseg-hub add-task``) owns a prompt channel over
  the fusion's hidden features, a zero-initialised residual 1x1x1 adapter per decoder level and its own heads; the
  official tasks never run through them.

Conv biases: every convolution of the official model has a bias and feeds an InstanceNorm, which removes it, so the
biases have no effect on any output. They are kept, so that parameter counts and state dicts match the official
ones tensor for tensor (32,114,381 parameters, 115 tensors).

The networks are plain eager PyTorch: no I/O, no global state, no tuning, outputs in PyTorch's default memory
layout. The CPU inference fast path is applied from outside by ``uniseg_hub.cpu.prepare_for_inference``.
"""

from .added_task import AddedTask
from .blocks import ConvBlock, FeatureInfo, MultiChannelStem, init_he, same_padding
from .decoder import UNetDecoder
from .encoder import UniSegEncoder
from .prompt import TaskPrompt
from .uniseg import UniSeg, UniSegBackbone

__all__ = ["AddedTask", "UniSeg", "UniSegBackbone", "UniSegEncoder", "UNetDecoder", "TaskPrompt", "ConvBlock",
           "MultiChannelStem", "FeatureInfo", "init_he", "same_padding"]
