"""ONNX export of a converted model, checked against PyTorch with onnxruntime.

TorchScript is not offered: ``torch.jit.script`` cannot compile the task handling (names, tensors or ids) and
TorchScript is deprecated upstream (PyTorch 2.9+, MONAI issue 8632). The ONNX graph of a ``UniSeg`` takes
``image`` (B, C, x, y, z) float32 and ``task`` (B,) int64 and returns ``logits`` (B, 4, x, y, z); the input stem
is fixed at export time by ``in_channels``. A ``UniSegBackbone`` graph takes ``image`` only. The batch size is
dynamic, the spatial size is the model's patch (a backbone: ``spatial_size``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UnisegHubError
from ..files import atomic_path
from ..networks import UniSeg
from ..pretrained import load_model


class _UniSegGraph(nn.Module):
    """UniSeg with the task as a tensor input and no data-dependent checks, for tracing."""

    def __init__(self, model: UniSeg):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.model.decode_ids(self.model.encoder(image), task)


def export_onnx(src: str | os.PathLike, out: str | os.PathLike, *, in_channels: int = 1,
                spatial_size: tuple[int, int, int] | None = None, check: bool = True) -> Path:
    """Export the model at ``src`` (a converted folder) to ``out`` (.onnx), written atomically.

    With ``check`` the graph is run with onnxruntime on a random input and must agree with PyTorch (max abs
    difference below 1e-3), for two tasks at once when it is a ``UniSeg``.
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise UnisegHubError("ONNX export needs the onnx and onnxscript packages: pip install 'uniseg-hub[export]'") \
            from e
    model = load_model(src)
    universal = isinstance(model, UniSeg)
    if universal and len(model.added):
        raise UnisegHubError(f"{src} has {len(model.added)} task(s) added after training (ids from "
                             f"{model.prompted_tasks}), which the ONNX graph (a task id input, no data-dependent "
                             "branches) cannot hold; export the model they were added to, or run them in PyTorch")
    size = tuple(model.patch_size) if universal else tuple(spatial_size or (64, 64, 32))
    image = torch.randn(2, in_channels, *size)
    batch = torch.export.Dim("batch")
    if universal:
        graph, args = _UniSegGraph(model), (image, torch.tensor([0, model.num_tasks - 1]))
        names, shapes = ["image", "task"], ({0: batch}, {0: batch})
    else:
        graph, args, names, shapes = model, (image,), ["image"], ({0: batch},)
    with atomic_path(out, suffix=".onnx") as tmp, torch.no_grad():
        torch.onnx.export(graph.eval(), args, tmp, input_names=names, output_names=["logits"],
                          dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False)
        if check:
            _check(tmp, graph, args, names)
    return Path(out)


def _check(path: str, graph: nn.Module, args: tuple, names: list[str]) -> None:
    try:
        import onnxruntime
    except ImportError as e:
        raise UnisegHubError("checking the export needs onnxruntime: pip install 'uniseg-hub[export]', or pass "
                             "check=False") from e
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
    want = graph(*args).numpy()
    difference = float(abs(got - want).max())
    if difference > 1e-3:
        raise UnisegHubError(f"the ONNX graph disagrees with PyTorch (max difference {difference:.3g}); export failed")
