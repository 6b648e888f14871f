"""The CPU inference fast path (``uniseg_hub.cpu.prepare_for_inference``) changes speed, never results.

Each prepared model is compared with the plain model it wraps, on small configurations, within float32 tolerance,
and with a float64 run of the same weights, so the fast path is shown to be as accurate as the plain one (not only
close to it). No timing here: speed is the benchmark's job.
"""

import copy
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from uniseg_hub.cpu import (
    CpuInferenceBackbone,
    CpuInferenceModel,
    fast_path,
    prepare_for_inference,
)
from uniseg_hub.cpu.fast_path import instance_norm_act_, upsample_concat
from uniseg_hub.errors import InputShapeError
from uniseg_hub.networks import ConvBlock, UniSeg, UniSegBackbone
from uniseg_hub.pipeline import TaskPredictor
from uniseg_hub.tasks import get_task

FEATURES = (32, 16, 16, 16, 16, 16)  # PyTorch may pick the default layout for fewer channels at level 0
PATCH = (32, 32, 32)  # bottleneck 1 x 1 x 2
TOL = dict(rtol=1e-4, atol=1e-4)
SMALL_MAPS = 4096
"""Channels-last threshold for the small test maps, so that they take both layouts of the fast path as the
full-size ones do: channels-last for the levels of at least 4096 voxels, the default layout below."""


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial biases and norm affines (fresh ones are 0 and 1), so that every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise(UniSeg(features=FEATURES, patch_size=PATCH))


@pytest.fixture(scope="module")
def prepared(model):
    return prepare_for_inference(model, channels_last_min_voxels=SMALL_MAPS)


def no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def counting(monkeypatch, name: str) -> list:
    """Record the calling thread of every call of the kernel ``fast_path.<name>``."""
    calls, kernel = [], getattr(fast_path, name)

    def wrapper(*args, **kwargs):
        calls.append(threading.get_ident())
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fast_path, name, wrapper)
    return calls


def test_universal_model_matches_the_plain_model_and_float64(model, prepared):
    x = torch.randn(2, 1, *PATCH) * 0.3 + 0.4
    tasks = torch.tensor([3, 7])  # a mixed-task batch
    reference = no_grad(model, x, tasks)
    out = no_grad(prepared, x, tasks)
    assert out.shape == reference.shape and out.is_contiguous()
    torch.testing.assert_close(out, reference, **TOL)
    # as accurate as the plain model: both against a float64 run of the same weights
    exact = no_grad(copy.deepcopy(model).double(), x.double(), tasks)
    error_plain = (reference.double() - exact).abs().max().item()
    error_fast = (out.double() - exact).abs().max().item()
    assert error_fast <= 4 * error_plain + 1e-6, (error_fast, error_plain)
    assert torch.equal(out, no_grad(prepared, x, tasks))  # deterministic


@pytest.mark.parametrize("config", [
    # four stages, other kernels and strides, three stems, three tasks of two channels
    dict(in_channels=(1, 3, 4), features=(32, 32, 48, 48), kernel_sizes=((3, 3, 3), (1, 3, 3), (3, 3, 3), (3, 1, 3)),
         strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 1)), num_tasks=3, head_channels=2, patch_size=(32, 32, 32)),
    # the official layout, wider, on a size other than the training patch (resized prompt)
    dict(features=(16, 32, 32, 48, 48, 64), num_tasks=3, patch_size=(32, 32, 32), resize_prompt=True),
])
def test_other_configurations_match_the_plain_model(config):
    torch.manual_seed(2)
    resize = config.pop("resize_prompt", False)
    model = randomise(UniSeg(resize_prompt=resize, **config))
    size = (64, 32, 32) if resize else model.patch_size
    channels = model.encoder.in_channels[-1]
    x = torch.randn(1, channels, *size)
    prepared = prepare_for_inference(model, channels_last_min_voxels=SMALL_MAPS)
    tasks = list(range(model.num_tasks))
    references = [no_grad(model, x, task) for task in tasks]
    out = no_grad(prepared, x, tasks[-1])
    assert out.is_contiguous()
    torch.testing.assert_close(out, references[-1], **TOL)
    together = no_grad(prepared.decode_tasks, no_grad(prepared.encode, x), tasks)
    for out, reference in zip(together, references):
        assert out.is_contiguous()
        torch.testing.assert_close(out, reference, **TOL)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_backbone_matches_the_plain_model(channels, monkeypatch):
    torch.manual_seed(1)
    backbone = randomise(UniSegBackbone(5, features=FEATURES))
    prepared = prepare_for_inference(backbone, channels_last_min_voxels=SMALL_MAPS)
    assert isinstance(prepared, CpuInferenceBackbone)
    fused = counting(monkeypatch, "instance_norm_act_")
    x = torch.randn(1, channels, 64, 32, 32)  # any size divisible by the total stride
    out = no_grad(prepared, x)
    assert fused  # the fast path ran
    assert out.shape == (1, 5, 64, 32, 32) and out.is_contiguous()
    torch.testing.assert_close(out, no_grad(backbone, x), **TOL)
    with pytest.raises(InputShapeError, match="divisible"):
        no_grad(prepared, torch.randn(1, channels, 60, 32, 32))


def test_encode_then_decode_for_several_tasks_matches(model, prepared):
    x = torch.randn(1, 1, *PATCH)
    skips_plain, skips_fast = no_grad(model.encode, x), no_grad(prepared.encode, x)
    assert fast_path.is_channels_last(skips_fast[0])  # the fast path's layout (PyTorch may pick another for tiny maps)
    for a, b in zip(skips_fast, skips_plain):
        torch.testing.assert_close(a, b, **TOL)
    for task in ("liver", "vertebrae", 10):
        out = no_grad(prepared.decode, skips_fast, task)
        assert out.is_contiguous()
        torch.testing.assert_close(out, no_grad(model.decode, skips_plain, task), **TOL)
        # the plain model's maps work too
        torch.testing.assert_close(no_grad(prepared.decode, skips_plain, task), out, **TOL)


def test_decoding_several_tasks_computes_the_skip_terms_once(model, prepared):
    x = torch.randn(2, 1, *PATCH)
    tasks = ["liver", 3, "vertebrae"]
    skips = no_grad(prepared.encode, x)

    def gflop(fn, *args):
        counter = FlopCounterMode(display=False)
        with counter:
            no_grad(fn, *args)
        return counter.get_total_flops() / 1e9

    # each level's skip term: the skip's channels through the first convolution after the concatenation
    skip_terms = sum(2 * skip.shape[0] * skip[0, 0].numel() * block[0].conv.out_channels * skip.shape[1]
                     * math.prod(block[0].conv.kernel_size) for skip, block in zip(skips[-2::-1], model.decoder.blocks))
    one, three = gflop(prepared.decode, skips, tasks[0]), gflop(prepared.decode_tasks, skips, tasks)
    assert 3 * one - three == pytest.approx(2 * skip_terms / 1e9, rel=1e-9)  # computed once instead of 3 times
    together = no_grad(prepared.decode_tasks, skips, tasks)
    for task, out in zip(tasks, together):
        assert out.is_contiguous()
        torch.testing.assert_close(out, no_grad(model.decode, no_grad(model.encode, x), task), **TOL)


@pytest.mark.parametrize("threshold", [1, SMALL_MAPS, 10**9])
def test_every_channels_last_threshold_gives_the_same_results(model, threshold):
    """All levels channels-last, the large ones only, none: the layouts meet at other levels, same results."""
    prepared = prepare_for_inference(model, channels_last_min_voxels=threshold)
    x = torch.randn(1, 1, *PATCH)
    skips = no_grad(prepared.encode, x)
    assert fast_path.is_channels_last(skips[0]) == (threshold <= SMALL_MAPS)
    reference = no_grad(model.encode, x)
    for a, b in zip(skips, reference):
        torch.testing.assert_close(a, b, **TOL)
    outputs = [no_grad(prepared.decode, skips, 0), *no_grad(prepared.decode_tasks, skips, [0, 5])]
    assert all(out.is_contiguous() for out in outputs)
    for out, task in zip(outputs, [0, 0, 5]):
        torch.testing.assert_close(out, no_grad(model.decode, reference, task), **TOL)


class ScaledConvBlock(ConvBlock):
    """A conv block whose forward differs from ``ConvBlock``'s: the wrapper must run it as it is."""

    def forward(self, x):
        return 0.5 * super().forward(x) + 1


class Shift(nn.Module):
    def forward(self, x):
        return x - 0.25


def test_modules_it_does_not_know_run_as_they_are(model):
    """The structure is read, not assumed: a changed block runs as is, a level whose first conv cannot be split
    off is decoded in full, the other levels still share their skip terms, whatever their upsampling."""
    changed = copy.deepcopy(model)
    first = changed.decoder.blocks[1]
    changed.decoder.blocks[1] = nn.Sequential(Shift(), *first)  # level 1: no conv first, not shareable
    second = changed.decoder.blocks[3][1]
    scaled = ScaledConvBlock(second.conv.in_channels, second.conv.out_channels, second.conv.kernel_size)
    scaled.load_state_dict(second.state_dict())
    changed.decoder.blocks[3][1] = scaled  # level 3: a block with its own forward after the shared conv
    changed.encoder.stages[2].append(Shift())  # an unknown module inside an encoder stage
    last = changed.decoder.upsamples[-1]  # full resolution: an upsampling that is not a transposed convolution
    changed.decoder.upsamples[-1] = nn.Sequential(nn.Upsample(scale_factor=last.stride),
                                                  nn.Conv3d(last.in_channels, last.out_channels, 1, bias=False))
    prepared = prepare_for_inference(changed, channels_last_min_voxels=SMALL_MAPS)
    x = torch.randn(1, 1, *PATCH)
    reference = [no_grad(changed, x, t) for t in (0, 4)]
    assert not torch.allclose(reference[0], no_grad(model, x, 0), **TOL)  # the changes change the result
    torch.testing.assert_close(no_grad(prepared, x, 0), reference[0], **TOL)
    together = no_grad(prepared.decode_tasks, no_grad(prepared.encode, x), [0, 4])
    for out, expected in zip(together, reference):
        torch.testing.assert_close(out, expected, **TOL)


def test_calls_that_cannot_take_the_fast_path_go_to_the_plain_model(model, prepared, monkeypatch):
    fused = counting(monkeypatch, "instance_norm_act_")
    x = torch.randn(1, 1, *PATCH)
    out = prepared(x, 0)  # gradients on
    assert out.requires_grad and torch.equal(out, model(x, 0))
    double = prepare_for_inference(copy.deepcopy(model).double())
    with torch.no_grad():
        torch.testing.assert_close(double(x.double(), 0), double.model(x.double(), 0), rtol=0, atol=0)
    assert not fused
    with torch.inference_mode():
        prepared(x, 0)
    assert fused  # inference mode is a no-gradient mode: fast


def test_training_through_the_wrapper_is_plain_training(model, monkeypatch):
    train = copy.deepcopy(model).train()
    prepared = prepare_for_inference(train)
    fused = counting(monkeypatch, "instance_norm_act_")
    x = torch.randn(1, 1, *PATCH)
    outputs = prepared(x, 0)
    reference = train(x, 0)
    assert len(outputs) == 5 and all(torch.equal(a, b) for a, b in zip(outputs, reference))
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None for p in train.decoder.parameters())
    assert not fused


def test_the_user_model_is_shared_not_changed(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_for_inference(model, channels_last_min_voxels=1)
    assert isinstance(prepared, CpuInferenceModel) and prepared.model is model
    assert all(a is b for a, b in zip(prepared.parameters(), model.parameters()))
    assert len(list(prepared.parameters())) == len(list(model.parameters()))
    assert prepare_for_inference(prepared) is prepared
    assert prepared.patch_size == model.patch_size and prepared.task_index("liver") == 0
    x = torch.randn(1, 1, *PATCH)
    no_grad(prepared, x, 0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model.training
    # the plain model stays plain: its maps in the default layout, no process-wide switch anywhere
    assert all(m.is_contiguous() for m in no_grad(model.encode, x))
    assert not hasattr(fast_path, "_ENABLED") and not hasattr(fast_path, "fast_inference")
    with pytest.raises(TypeError, match="UniSeg"):
        prepare_for_inference(nn.Conv3d(1, 1, 1))


def test_input_errors_are_the_models(prepared):
    with pytest.raises(InputShapeError, match="channels"):
        no_grad(prepared, torch.randn(1, 3, *PATCH), 0)
    with pytest.raises(InputShapeError, match="not accepted"):
        no_grad(prepared, torch.randn(1, 1, 64, 64, 32), 0)


def test_one_prepared_model_and_the_plain_one_in_two_threads(model, prepared, monkeypatch):
    """No global state: one thread infers through the wrapper (no gradients), the other trains the plain model's
    forward with gradients at the same time; each gets its own path and correct results."""
    fused = counting(monkeypatch, "instance_norm_act_")
    x = torch.randn(1, 1, *PATCH)
    expected = no_grad(model, x, 2)
    with torch.enable_grad():
        expected_grad = model(x, 2)

    together = threading.Barrier(2, timeout=60)  # both threads run at the same time

    def infer():
        together.wait()
        with torch.no_grad():
            return threading.get_ident(), [prepared(x, 2) for _ in range(3)]

    def plain_with_gradients():
        together.wait()
        return threading.get_ident(), [model(x, 2) for _ in range(3)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        running = [pool.submit(infer), pool.submit(plain_with_gradients)]
        (fast_thread, fast), (plain_thread, plain) = [r.result() for r in running]  # re-raises a thread's error
    assert fast_thread != plain_thread
    for out in fast:
        assert not out.requires_grad and out.is_contiguous()
        torch.testing.assert_close(out, expected, **TOL)
    for out in plain:
        assert out.requires_grad
        torch.testing.assert_close(out, expected_grad, rtol=1e-6, atol=1e-6)
    assert set(fused) == {fast_thread}  # the fast kernels ran in the inferring thread only


def test_predictor_runs_the_prepared_model_and_matches_the_plain_one(model):
    x = torch.randn(1, 1, *PATCH)
    for tasks in ([get_task("liver")], [get_task("kidney"), get_task("pancreas"), get_task("liver")]):
        predictor = TaskPredictor(model, tasks, mirror=False)
        plain = TaskPredictor(model, tasks, mirror=False, cpu_fast_path=False)
        assert isinstance(predictor.model, CpuInferenceModel) and predictor.model.model is model
        assert plain.model is model
        out, reference = predictor(x), plain(x)
        assert out.shape == reference.shape == (1, 3 if len(tasks) == 1 else 4 * len(tasks), *PATCH)
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_predictor_mirroring_matches_the_plain_models_by_hand(model):
    """The mirrored average is the official one: the mean of the flipped softmaxes of the plain model."""
    x = torch.randn(1, 1, *PATCH)
    task = get_task("kidney")
    out = TaskPredictor(model, [task])(x)
    flips = [a for n in range(4) for a in itertools.combinations((2, 3, 4), n)]
    with torch.no_grad():
        by_hand = sum(torch.flip(model(torch.flip(x, a), task.id).softmax(1), a) for a in flips) / 8
    torch.testing.assert_close(out, by_hand[:, : task.num_classes], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride", [(2, 2, 1), (2, 2, 2), (1, 2, 2)])
@pytest.mark.parametrize("input_layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("output_channels_last", [False, True])
def test_transposed_convolution_as_one_matrix_product(stride, input_layout, output_channels_last):
    torch.manual_seed(3)
    up = nn.ConvTranspose3d(12, 6, stride, stride=stride, bias=False)
    x = torch.randn(2, 12, 5, 6, 7).contiguous(memory_format=input_layout)
    skip = torch.randn(2, 6, *(n * s for n, s in zip(x.shape[2:], stride)))
    with torch.no_grad():
        expected = torch.cat([up(x), skip], 1)
        out = upsample_concat(up, x, skip, min_voxels=1 if output_channels_last else 10**9)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert fast_path.is_channels_last(out) == output_channels_last and out.is_contiguous() != output_channels_last


@pytest.mark.parametrize("mean", [0.0, 3.0, 300.0])
def test_channels_last_instance_norm_is_as_accurate_as_instance_norm(mean, monkeypatch):
    """Large |mean| / std is where a one-pass variance (PyTorch's channels-last group/batch norm) loses digits."""
    monkeypatch.setattr(fast_path, "CHUNK_ELEMENTS", 1000)  # many chunks and a short last one
    g = torch.Generator().manual_seed(6)
    norm = nn.InstanceNorm3d(5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5, generator=g))  # negative scales too
        norm.bias.copy_(torch.randn(5, generator=g))
    x = torch.randn(2, 5, 13, 11, 7, generator=g, dtype=torch.float64) * 0.5 + mean
    x[:, 2] *= 40  # channels of different scale
    exact = F.leaky_relu(F.instance_norm(x, weight=norm.weight.double(), bias=norm.bias.double()), 0.01)
    with torch.no_grad():
        reference = F.leaky_relu(norm(x.float()), 0.01)
        out = instance_norm_act_(x.float().contiguous(memory_format=torch.channels_last_3d), norm, 0.01)
    assert fast_path.is_channels_last(out)
    error_reference = (reference.double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    assert error <= 4 * error_reference + 1e-6, (error, error_reference)


def test_the_norm_runs_on_norm_threads_and_restores_the_callers_count(monkeypatch):
    """The fused norm's many small operations run on ``NORM_THREADS`` threads (one: a shared machine stalls every
    parallel region of two threads), and the caller's thread count is back afterwards, also after an error."""
    seen = []
    leaky_relu_ = F.leaky_relu_

    def spy(t, slope):
        seen.append(torch.get_num_threads())
        return leaky_relu_(t, slope)

    monkeypatch.setattr(F, "leaky_relu_", spy)
    norm = nn.InstanceNorm3d(4, affine=True)
    x = torch.randn(1, 4, 6, 5, 3).contiguous(memory_format=torch.channels_last_3d)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            expected = F.leaky_relu(norm(x.contiguous()), 0.01)
            torch.testing.assert_close(instance_norm_act_(x.clone(), norm, 0.01), expected, rtol=1e-5, atol=1e-6)
        assert seen and set(seen) == {fast_path.NORM_THREADS} and torch.get_num_threads() == 2
        monkeypatch.setattr(F, "leaky_relu_", lambda t, slope: 1 / 0)
        with pytest.raises(ZeroDivisionError), torch.no_grad():
            instance_norm_act_(x.clone(), norm, 0.01)
        assert torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(F, "leaky_relu_", spy)
        monkeypatch.setattr(fast_path, "NORM_THREADS", None)  # None: the caller's count
        with torch.no_grad():
            instance_norm_act_(x.clone(), norm, 0.01)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_conv_equals_the_1x1x1_convolution_in_the_default_layout(bias):
    """The heads as one matrix product per sample: the conv's values, written in the default layout."""
    torch.manual_seed(7)
    conv = nn.Conv3d(6, 3, 1, bias=bias)
    x = torch.randn(2, 6, 9, 8, 5).contiguous(memory_format=torch.channels_last_3d)
    assert fast_path.is_pointwise_conv(conv, x)
    assert not fast_path.is_pointwise_conv(conv, x.contiguous())  # the default layout keeps the conv
    assert not fast_path.is_pointwise_conv(nn.Conv3d(6, 3, 3, padding=1), x)
    with torch.no_grad():
        out = fast_path.pointwise_conv(conv, x)
        torch.testing.assert_close(out, conv(x.contiguous()), rtol=1e-5, atol=1e-6)
    assert out.is_contiguous()


def test_one_channel_maps_get_channels_last_strides():
    """A one-channel map is contiguous in both layouts; PyTorch then treats it as the default layout and the stem's
    convolution at 192x192x64 returns a default-layout map (copied again). ``to_layout`` gives it channels-last
    strides (which layout the convolution returns for a map this small is PyTorch's choice)."""
    x = torch.randn(1, 1, 16, 16, 8)
    y = fast_path.to_layout(x, min_voxels=1)
    assert y.stride(1) == 1 and torch.equal(y, x)
    conv = nn.Conv3d(1, 8, (3, 3, 1), padding=(1, 1, 0))
    with torch.no_grad():
        out = conv(y)
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-6)
    assert fast_path.to_layout(x, min_voxels=10**9) is x  # below the threshold: unchanged


def test_the_norm_of_a_bfloat16_map_computes_in_float32(monkeypatch):
    """Under bfloat16 autocast the convolutions return bfloat16 maps; the fused norm reads them into float32,
    computes there, and rounds once: the float32 norm of the same values, to bfloat16 rounding."""
    monkeypatch.setattr(fast_path, "CHUNK_ELEMENTS", 1000)  # many chunks and a short last one
    g = torch.Generator().manual_seed(8)
    norm = nn.InstanceNorm3d(5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5, generator=g))
        norm.bias.copy_(torch.randn(5, generator=g))
    x = (torch.randn(2, 5, 13, 11, 7, generator=g) * 0.5 + 30).bfloat16()  # |mean| >> std, as in float32
    with torch.no_grad():
        expected = F.leaky_relu(norm(x.float()), 0.01).bfloat16()
        out = instance_norm_act_(x.contiguous(memory_format=torch.channels_last_3d), norm, 0.01)
    assert out.dtype == torch.bfloat16 and fast_path.is_channels_last(out)
    assert (out.float() - expected.float()).abs().max() <= 2 ** -7 * expected.float().abs().max()


def test_bf16_autocast_takes_the_fast_path_and_agrees_with_the_plain_bf16_model(model, prepared):
    """``--precision bf16`` on CPU: the fast path under bfloat16 autocast against the plain model under the same
    autocast (both bfloat16 arithmetic: agreement to bfloat16 rounding, not float32 tolerance)."""
    x = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(x, 0).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(x, 0).float()
            fast = prepared(x, 0).float()
    scale = reference.abs().max()
    assert (fast - reference).abs().max() < 0.05 * scale and (plain - reference).abs().max() < 0.05 * scale
    assert (fast - plain).abs().max() < 0.05 * scale
    assert (fast.argmax(1) == reference.argmax(1)).float().mean() > 0.95


def test_bf16_autocast_runs_the_decoder_on_the_fast_path_too(prepared, monkeypatch):
    """Under bfloat16 autocast the encoder's maps are bfloat16: the decoder must still take the fast path (its
    upsampling into the concatenation buffer), not fall back to the plain model."""
    calls = []
    upsample_concat_ = fast_path.upsample_concat
    monkeypatch.setattr(fast_path, "upsample_concat", lambda *a, **k: calls.append(1) or upsample_concat_(*a, **k))
    x = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(10))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        prepared(x, 0)
    assert len(calls) == len(prepared.model.decoder.upsamples)
