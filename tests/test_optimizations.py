"""The inference optimisations (benchmarks/NOTES.md) change speed and memory, never results.

Each optimised path is compared with the plain path it replaces, on small configurations, within float32
tolerance, and with a float64 run of the same weights, so the fast path is shown to be as accurate as the plain one
(not only close to it). No timing here: speed is the benchmark's job.
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import uniseg_hub.cpu.fast_path as fast_path
from uniseg_hub.cpu.fast_path import fast_inference, instance_norm_act_, upsample_concat
from uniseg_hub.pipeline import (
    ArgMaxd,
    MergeTasksd,
    TaskPredictor,
    _glibc_default_malloc,
    release_freed_memory,
    retain_freed_memory,
)
from uniseg_hub.networks import UniSeg, UniSegBackbone
from uniseg_hub.tasks import HEAD_CHANNELS, get_task, tasks_in_group

FEATURES = (8, 16, 32, 32, 32, 32)
PATCH = (64, 64, 32)
TOL = dict(rtol=1e-4, atol=1e-4)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial biases and norm affines (fresh ones are 0 and 1), so that every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.2)
    return model.eval()


@pytest.fixture(autouse=True)
def small_maps_channels_last(monkeypatch):
    """The small test maps take both layouts of the fast path, as the full-size ones do: channels-last for the
    levels of at least 4096 voxels (64x64x32 .. 16x16x16), the default layout below."""
    monkeypatch.setattr(fast_path, "CHANNELS_LAST_MIN_VOXELS", 4096)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise(UniSeg(features=FEATURES, patch_size=PATCH))


def plain(fn, *args):
    with torch.no_grad(), fast_inference(False):
        return fn(*args)


def fast(fn, *args):
    with torch.no_grad():
        return fn(*args)


def test_fast_path_is_taken_only_for_cpu_inference(model, monkeypatch):
    calls = []
    monkeypatch.setattr(fast_path, "upsample_concat", lambda *a: calls.append(1) or upsample_concat(*a))
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        skips = model.encode(x)
        logits = model.decode(skips, 0)
    assert len(calls) == 5  # every decoder level
    assert fast_path.is_channels_last(skips[0])  # the fast path's layout (PyTorch may pick another for tiny maps)
    assert logits.is_contiguous()  # and PyTorch's default layout for the caller
    with torch.inference_mode():
        model(x, 0)
    assert len(calls) == 10
    with torch.no_grad(), fast_inference(False):
        model(x, 0)
    model(x, 0)  # gradients on: the plain path
    assert len(calls) == 10
    with torch.no_grad():
        assert not fast_path.is_channels_last(copy.deepcopy(model).double().encode(x.double())[0])  # float64: plain
        assert fast_path._ENABLED


def test_universal_model_matches_the_plain_path_and_float64(model):
    x = torch.randn(2, 1, *PATCH) * 0.3 + 0.4
    tasks = torch.tensor([3, 7])  # a mixed-task batch
    reference = plain(model, x, tasks)
    out = fast(model, x, tasks)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, **TOL)
    # as accurate as the plain path: both against a float64 run of the same weights
    exact = plain(copy.deepcopy(model).double(), x.double(), tasks)
    error_plain = (reference.double() - exact).abs().max().item()
    error_fast = (out.double() - exact).abs().max().item()
    assert error_fast <= 4 * error_plain + 1e-6, (error_fast, error_plain)
    # deterministic
    assert torch.equal(out, fast(model, x, tasks))


def test_encode_decode_for_several_tasks_matches(model):
    x = torch.randn(1, 1, *PATCH)
    skips_plain, skips_fast = plain(model.encode, x), fast(model.encode, x)
    for a, b in zip(skips_fast, skips_plain):
        torch.testing.assert_close(a, b, **TOL)
    for task in ("liver", "vertebrae", 10):
        torch.testing.assert_close(fast(model.decode, skips_fast, task), plain(model.decode, skips_plain, task), **TOL)


def test_decoding_several_tasks_shares_the_skip_terms_and_matches(model, monkeypatch):
    x = torch.randn(2, 1, *PATCH)
    tasks = ["liver", 3, "vertebrae"]
    shared = []
    monkeypatch.setattr(model.decoder, "skip_terms",
                        lambda skips, f=model.decoder.skip_terms: shared.append(1) or f(skips))
    with torch.no_grad():
        skips = model.encode(x)
        together = model.decode_tasks(skips, tasks)
    assert shared == [1]  # once for all tasks
    for task, out in zip(tasks, together):
        assert out.is_contiguous()
        torch.testing.assert_close(out, plain(model.decode, plain(model.encode, x), task), **TOL)
    with torch.no_grad(), fast_inference(False):
        model.decode_tasks(plain(model.encode, x), tasks)
    assert shared == [1]  # the plain path decodes task by task


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_backbone_matches_the_plain_path(channels):
    torch.manual_seed(1)
    backbone = randomise(UniSegBackbone(5, features=FEATURES))
    x = torch.randn(1, channels, 64, 32, 32)  # any size divisible by the total stride
    torch.testing.assert_close(fast(backbone, x), plain(backbone, x), **TOL)


def test_training_is_unchanged(model):
    train = copy.deepcopy(model).train()
    x = torch.randn(1, 1, *PATCH)
    torch.manual_seed(0)
    outputs = train(x, 0)
    with fast_inference(False):
        reference = train(x, 0)
    assert len(outputs) == 5 and all(torch.equal(a, b) for a, b in zip(outputs, reference))
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None for p in train.decoder.parameters())


@pytest.mark.parametrize("stride", [(2, 2, 1), (2, 2, 2), (1, 2, 2)])
@pytest.mark.parametrize("input_layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("output_channels_last", [False, True])
def test_transposed_convolution_as_one_matrix_product(stride, input_layout, output_channels_last, monkeypatch):
    monkeypatch.setattr(fast_path, "CHANNELS_LAST_MIN_VOXELS", 1 if output_channels_last else 10**9)
    torch.manual_seed(3)
    up = torch.nn.ConvTranspose3d(12, 6, stride, stride=stride, bias=False)
    x = torch.randn(2, 12, 5, 6, 7).contiguous(memory_format=input_layout)
    skip = torch.randn(2, 6, *(n * s for n, s in zip(x.shape[2:], stride)))
    with torch.no_grad():
        expected = torch.cat([up(x), skip], 1)
        out = upsample_concat(up, x, skip)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert fast_path.is_channels_last(out) == output_channels_last and out.is_contiguous() != output_channels_last


@pytest.mark.parametrize("mean", [0.0, 3.0, 300.0])
def test_channels_last_instance_norm_is_as_accurate_as_instance_norm(mean, monkeypatch):
    """Large |mean| / std is where a one-pass variance (PyTorch's channels-last group/batch norm) loses digits."""
    monkeypatch.setattr(fast_path, "CHUNK_ELEMENTS", 1000)  # many chunks and a short last one
    g = torch.Generator().manual_seed(6)
    norm = torch.nn.InstanceNorm3d(5, affine=True)
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


def test_retaining_freed_memory_is_harmless():
    try:
        retain_freed_memory()
        x = torch.randn(1 << 24)  # a 64 MB block (above glibc's mmap threshold): allocated, freed, reused
        for _ in range(3):
            y = x * 2
            del y
        assert retain_freed_memory(False) is False  # "false" in the config changes nothing
        release_freed_memory()
        z = torch.ones(1 << 24)
        assert float(z.sum()) == float(1 << 24)
    finally:
        _glibc_default_malloc()


@pytest.mark.parametrize("mirror", [False, True])
def test_predictor_matches_the_plain_path(model, mirror):
    x = torch.randn(1, 1, *PATCH)
    for tasks in ([get_task("liver")], tasks_in_group("CT")):
        predictor = TaskPredictor(model, tasks, mirror=mirror)
        out = fast(predictor, x)
        reference = plain(predictor, x)
        assert out.shape == reference.shape
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
        if not mirror:
            continue
        # the mirrored average is the official one: the mean of the flipped softmaxes, computed by hand
        flips = [a for n in range(4) for a in itertools.combinations((2, 3, 4), n)]
        with torch.no_grad(), fast_inference(False):
            by_hand = torch.cat([sum(torch.flip(model(torch.flip(x, a), t.id).softmax(1), a) for a in flips) / 8
                                 for t in tasks], 1)
        expected = by_hand[:, : tasks[0].num_classes] if len(tasks) == 1 else by_hand
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_compact_merged_one_hot_gives_the_same_labels_after_linear_resampling():
    g = torch.Generator().manual_seed(4)
    for tasks in ([get_task("liver"), get_task("kidney")], [get_task("kidney"), get_task("spleen")],
                  list(tasks_in_group("CT"))):
        probs = torch.rand(HEAD_CHANNELS * len(tasks), 12, 10, 6, generator=g).softmax(0)
        merge = MergeTasksd("pred", tasks)
        compact = merge({"pred": probs})["pred"]
        assert compact.shape[0] == 1 + max(v for t in tasks for v in t.merged_labels)
        full = F.one_hot(merge.merge(probs), 18).movedim(-1, 0).float()  # the former 18-channel map
        torch.testing.assert_close(compact, full[: compact.shape[0]])
        assert not full[compact.shape[0]:].any()
        # resampling back is linear: the dropped all-zero channels stay zero and never win the argmax; (this
        # interpolation kernel rounds differently for another channel count, so an exact 50/50 tie between two
        # labels may fall either way: those are the only differences)
        size = (23, 19, 11)
        small = F.interpolate(compact[None], size=size, mode="trilinear", align_corners=False)[0]
        large = F.interpolate(full[None], size=size, mode="trilinear", align_corners=False)[0]
        differ = small.argmax(0) != large.argmax(0)
        assert differ.float().mean() < 0.01
        top2 = large.topk(2, dim=0).values
        assert torch.all((top2[0] - top2[1])[differ] < 1e-6)


@pytest.fixture(scope="module")
def real_ct(tmp_path_factory):
    """A real CT crop (3 mm voxels, resampled to the tasks' 1.5 x 1.5 x 3 mm and back by the bundle)."""
    nib = pytest.importorskip("nibabel")
    import numpy as np

    from uniseg_hub.app.sample_data import SampleDataError, fetch_sample

    try:
        source = nib.load(fetch_sample("ct_small"))
    except SampleDataError as e:
        pytest.skip(f"real sample data unavailable (PyPI unreachable?): {e}")
    part = source.slicer[20:60, 30:70, 8:24]
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(part.dataobj), part.affine, part.header), path)
    return path


@pytest.mark.parametrize("task", ["kidney", "all"])
def test_bundle_label_maps_equal_the_unoptimised_pipeline(converted_small, real_ct, tmp_path, monkeypatch, task):
    """The whole bundle, optimised, against the unoptimised pipeline (plain network path, 18-channel merged map,
    MONAI's Invertd)."""
    nib = pytest.importorskip("nibabel")
    from pathlib import Path

    from monai.bundle import run

    import uniseg_hub.pipeline as inference
    import uniseg_hub.pipeline.resampling as resampling

    bundle = Path(__file__).resolve().parents[1] / "bundle"

    def predict(out):
        run(config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=str(bundle / "configs" / "logging.conf"), bundle_root=str(bundle),
            weights=str(converted_small), input=str(real_ct), output_dir=str(out), task=task, tta=False)
        return nib.load(next(Path(out).glob("*.nii.gz"))).get_fdata()

    optimised = predict(tmp_path / "optimised")
    init = inference.MergeTasksd.__init__

    def eighteen_channels(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.num_classes = 18

    monkeypatch.setattr(inference.MergeTasksd, "__init__", eighteen_channels)
    monkeypatch.setattr(fast_path, "_ENABLED", False)
    monkeypatch.setattr(resampling, "_separable_plan", lambda image: None)  # MONAI's Invertd
    reference = predict(tmp_path / "reference")
    assert optimised.shape == reference.shape
    assert (optimised != reference).mean() < 1e-3  # at most a rare exact tie decided by rounding


def test_argmax_transform_equals_monai_as_discrete():
    from monai.data import MetaTensor
    from monai.transforms import AsDiscreted

    g = torch.Generator().manual_seed(5)
    for channels in (2, 3, 13):
        probs = torch.rand(channels, 20, 16, 9, generator=g)
        probs[:, :4] = 0.25  # exact ties: the first maximal channel wins, as with argmax
        probs[1:, 4:6] = 0.9
        image = MetaTensor(probs, affine=torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0])))
        expected = AsDiscreted("pred", argmax=True)({"pred": image})["pred"]
        out = ArgMaxd("pred")({"pred": image})["pred"]
        assert isinstance(out, MetaTensor) and out.dtype == expected.dtype and out.shape == expected.shape
        assert torch.equal(out.as_tensor(), expected.as_tensor())
        torch.testing.assert_close(out.affine, expected.affine)
