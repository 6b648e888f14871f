"""``predict`` follows the data once: outputs named by the bundle's layout and taken from the run (``saved_to``),
each input opened once, nothing read back, typed errors unwrapped and bugs left as bugs, options checked once."""

import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from uniseg_hub.app import predict as predict_module
from uniseg_hub.app import report
from uniseg_hub.app.predict import predict, unwrap_error
from uniseg_hub.config import PredictOptions
from uniseg_hub.errors import ConfigError, InputError, UnisegHubError
from uniseg_hub.pipeline import NormalizeTaskd

from scans import crop, sample


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct_outputs")
    return crop(sample("ct_small"), folder / "abdomen.nii.gz", (slice(20, 60), slice(30, 70), slice(8, 24)))


def run(scan, out, model, **options):
    return predict(scan, out_dir=str(out), weights=str(model), tta=False, progress=False, **options)


def counted_loads(monkeypatch) -> list[str]:
    """Every ``nibabel.load`` (MONAI's reader and uniseg-hub's both call it), as absolute paths."""
    loads = []
    real = nib.load

    def load(filename, *args, **kwargs):
        loads.append(os.path.abspath(os.fspath(filename)))
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(nib, "load", load)
    return loads


def test_an_upper_case_suffix_names_every_output_after_the_case(converted_small, small_ct, tmp_path):
    scan = tmp_path / "in" / "SCAN.NII.GZ"
    scan.parent.mkdir()
    shutil.copy(small_ct, scan)
    result = run(scan, tmp_path / "out", converted_small, task="liver")
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["SCAN_liver.nii.gz", "SCAN_liver_colors.ctbl", "SCAN_liver_itksnap_labels.txt",
                                       "SCAN_liver_preview.png", "SCAN_liver_volumes.csv",
                                       "SCAN_liver_volumes.json"]  # nothing else: no .tmp, no SCAN.NII_liver...
    assert result.label_map == str(out / "SCAN_liver.nii.gz") and result.preview == str(out / "SCAN_liver_preview.png")
    assert (result.volumes_json, result.volumes_csv) == (str(out / "SCAN_liver_volumes.json"),
                                                         str(out / "SCAN_liver_volumes.csv"))
    assert result.probabilities is None
    labels = np.asanyarray(nib.load(result.label_map).dataobj)
    assert [r["voxels"] for r in result.volumes] == [int((labels == v).sum()) for v in (1, 2)]
    # a second run finds every output by the same names
    with pytest.raises(InputError, match="SCAN_liver.nii.gz already exists"):
        run(scan, out, converted_small, task="liver")


def test_each_input_is_opened_once_and_no_output_is_read_back(converted_small, small_ct, tmp_path, monkeypatch):
    ct, pet = tmp_path / "case_ct.nii.gz", tmp_path / "case_pet.nii.gz"  # AutoPET: two files, one grid
    shutil.copy(small_ct, ct)
    shutil.copy(small_ct, pet)
    drawn = {}
    real_preview = report.render_preview
    monkeypatch.setattr(report, "render_preview", lambda *a, **k: drawn.update(args=a) or real_preview(*a, **k))
    loads = counted_loads(monkeypatch)
    result = run([ct, pet], tmp_path / "out", converted_small, task="autopet", probabilities=True)
    assert sorted(loads) == sorted([str(ct), str(pet)]), loads  # once each; the label map never
    assert result.label_map == str(tmp_path / "out" / "case_ct_autopet.nii.gz")
    assert result.probabilities == str(tmp_path / "out" / "case_ct_autopet_probabilities.nii.gz")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"case_ct_autopet{s}" for s in (".nii.gz", "_probabilities.nii.gz", "_preview.png", "_volumes.json",
                                        "_volumes.csv", "_colors.ctbl", "_itksnap_labels.txt"))
    # the preview shows the scan as loaded (both channels, channel-first) and the label map as saved
    image, labels, affine = drawn["args"][:3]
    source = np.asanyarray(nib.load(ct).dataobj)
    np.testing.assert_array_equal(image, np.stack([source, source]))
    saved = nib.load(result.label_map)
    np.testing.assert_array_equal(labels, np.asanyarray(saved.dataobj))
    np.testing.assert_allclose(affine, saved.affine, atol=1e-4)


def test_a_dicom_series_preview_shows_the_scan(converted_small, small_ct, tmp_path, monkeypatch):
    pytest.importorskip("itk")
    from dicom_series import write_series

    series = write_series(small_ct, tmp_path / "series")
    drawn = {}
    monkeypatch.setattr(report, "render_preview", lambda *a, **k: drawn.update(args=a))
    result = run(series, tmp_path / "out", converted_small, task="spleen")
    assert result.label_map == str(tmp_path / "out" / "series_spleen.nii.gz")
    image, labels, affine = drawn["args"][:3]
    np.testing.assert_array_equal(image[0], np.asanyarray(nib.load(small_ct).dataobj))  # not the label map
    np.testing.assert_array_equal(labels, np.asanyarray(nib.load(result.label_map).dataobj))


@pytest.mark.parametrize("shape", [(6, 5, 1), (1, 1, 1)])
def test_a_single_slice_keeps_its_grid(converted_small, tmp_path, shape):
    scan = tmp_path / "slice.nii.gz"
    values = np.random.default_rng(0).normal(0, 300, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(values, np.diag([0.8, 0.8, 2.5, 1.0])), scan)
    result = run(scan, tmp_path / "out", converted_small, task="liver", preview=False)
    assert nib.load(result.label_map).shape == shape


def test_a_bug_inside_the_pipeline_stays_a_bug(converted_small, small_ct, tmp_path, monkeypatch):
    def broken(self, data):
        return 1 / 0

    monkeypatch.setattr(NormalizeTaskd, "__call__", broken)
    with pytest.raises(Exception) as info:
        run(small_ct, tmp_path / "out", converted_small, task="liver")
    assert not isinstance(info.value, UnisegHubError), info.value
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    assert isinstance(chain[-1], ZeroDivisionError), chain
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_uniseg_hub_error_in_a_transform_arrives_as_itself(converted_small, small_ct, tmp_path, monkeypatch):
    raised = InputError("this scan cannot be normalised; fix it")

    def refuse(self, data):
        raise raised

    monkeypatch.setattr(NormalizeTaskd, "__call__", refuse)
    with pytest.raises(InputError) as info:
        run(small_ct, tmp_path / "out", converted_small, task="liver")
    assert info.value is raised


def test_unwrapping_takes_only_monais_wrappers():
    def chain(*errors):
        for outer, inner in zip(errors, errors[1:]):
            outer.__cause__ = inner
        return errors[0]

    root = InputError("bad scan")
    assert unwrap_error(chain(RuntimeError("applying transform"), RuntimeError("applying transform"), root)) is root
    disk = OSError(28, "No space left on device")
    assert unwrap_error(chain(RuntimeError("applying transform"), disk)) is disk
    assert unwrap_error(chain(RuntimeError("applying transform"), ZeroDivisionError())) is None
    assert unwrap_error(chain(ValueError("a bug"), InputError("not the cause of record"))) is None
    assert unwrap_error(RuntimeError("no cause")) is None


@pytest.mark.parametrize("option, value", [("overlap", "abc"), ("overlap", 1.5), ("overlap", -0.1), ("tta", "maybe"),
                                           ("sw_batch_size", 0), ("sw_batch_size", "two"), ("device", "gpu"),
                                           ("modality", "PET"), ("preview", "sometimes"), ("out_dir", ""),
                                           ("window", "gaussian")])
def test_options_are_checked_once_and_name_the_option(option, value, tmp_path):
    with pytest.raises(ConfigError, match=option):
        PredictOptions(**{option: value})
    with pytest.raises(ConfigError, match=option):  # before anything is read or written
        predict(tmp_path / "missing.nii.gz", **{"out_dir": str(tmp_path / "out"), option: value})
    assert not (tmp_path / "out").exists()


def test_options_from_a_command_line_are_parsed():
    options = PredictOptions(tta="false", overlap="0.25", sw_batch_size="2", device="cpu", modality="mr", task=3)
    assert (options.tta, options.overlap, options.sw_batch_size, options.device, options.modality, options.task) == \
        (1, 0.25, 2, "cpu", "MR", "3")  # tta: the number of flips (issue 17); false is 1
    overrides = predict_module.bundle_overrides(options, ["a.nii.gz"])
    assert overrides["device"] == "$torch.device('cpu')" and overrides["keep_source"] is True
    assert overrides["input"] == "a.nii.gz" and predict_module.bundle_overrides(options, ["a", "b"])["input"] == \
        ["a", "b"]
