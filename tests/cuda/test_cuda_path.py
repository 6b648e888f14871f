"""The CUDA path (issue 17): skipped without a GPU; ``benchmarks/gpu.sh`` runs these on a GPU machine.

The default precision on CUDA is the official float16 autocast; bf16 and fp32 on request; the postprocessing
(merge, resampling back, argmax) runs on the GPU when the prediction is there.
"""

import pytest
import torch

from uniseg_hub.networks import UniSeg
from uniseg_hub.pipeline import TaskPredictor
from uniseg_hub.pipeline.resampling import resample_separable
from uniseg_hub.pipeline.transforms import ArgMaxd
from uniseg_hub.tasks import get_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (run benchmarks/gpu.sh)")

PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniSeg(features=(16,) * 6, patch_size=PATCH).eval().cuda()


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(1)).cuda()


@pytest.mark.parametrize("precision, amp", [("auto", True), ("fp16", False), ("bf16", False)])
def test_reduced_precision_on_cuda_agrees_with_float32(model, image, precision, amp):
    task = get_task("liver")
    seen = []
    hook = model.encoder.register_forward_hook(lambda m, i, o: seen.append(o[-1].dtype))
    try:
        with torch.no_grad():
            reference = TaskPredictor(model, [task], mirror=1, precision="fp32")(image)
            ours = TaskPredictor(model, [task], mirror=1, precision=precision, amp=amp)(image)
    finally:
        hook.remove()
    assert seen[0] == torch.float32 and seen[1] in (torch.float16, torch.bfloat16)
    assert ours.is_cuda and ours.dtype == torch.float32
    assert (ours.argmax(1) == reference.argmax(1)).float().mean() > 0.95


def test_postprocessing_stays_on_the_gpu(image):
    probs = torch.rand(3, 8, 9, 10, device="cuda")
    matrices = [torch.rand(12, 8, dtype=torch.float64), None, torch.rand(5, 10, dtype=torch.float64)]
    back = resample_separable(probs, matrices)
    assert back.is_cuda
    labels = ArgMaxd("pred")({"pred": back})["pred"]
    assert labels.is_cuda and torch.equal(labels.cpu().squeeze(0).long(), back.cpu().argmax(0))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_predictor_matches_eager_on_cuda(model, image, mode):
    task = get_task("liver")
    with torch.no_grad():
        eager = TaskPredictor(model, [task], mirror=2, precision="fp32")(image)
        compiled = TaskPredictor(model, [task], mirror=2, precision="fp32", compile=mode)(image)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)
