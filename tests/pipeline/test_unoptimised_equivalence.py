"""The pipeline's optimisations (benchmarks/NOTES.md) change speed and memory, never results.

Each optimised step is compared with the plain step it replaces. The CPU fast path of the network and the allocator
tuning have their own tests in ``tests/cpu``. No timing here: speed is the benchmark's job.
"""

import pytest
import torch
import torch.nn.functional as F

from uniseg_hub.pipeline import ArgMaxd, MergeTasksd
from uniseg_hub.tasks import HEAD_CHANNELS, get_task, tasks_in_group


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


@pytest.mark.slow
@pytest.mark.parametrize("task", ["kidney", "all"])
def test_bundle_label_maps_equal_the_unoptimised_pipeline(converted_small, real_ct, tmp_path, monkeypatch, task):
    """The whole bundle, optimised, against the unoptimised pipeline (the plain network without
    ``prepare_for_inference``, 18-channel merged map, MONAI's Invertd)."""
    nib = pytest.importorskip("nibabel")
    from pathlib import Path

    from monai.bundle import run

    import uniseg_hub.pipeline as inference
    from uniseg_hub.pipeline import predictor, resampling

    bundle = Path(__file__).resolve().parents[2] / "bundle"

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
    monkeypatch.setattr(predictor, "prepare_for_inference", lambda model: model)  # the plain network
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
