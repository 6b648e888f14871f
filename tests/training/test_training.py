"""Fine-tuning with the bundle's train.json: a real CPU run on the TotalSegmentator CT remapped to the 13 BTCV
organs, from weights converted through the normal path; checkpoints, evaluation, resume; the transfers; the parts."""

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.losses import DeepSupervisionLoss, DiceCELoss

from uniseg_hub import UniSegBackbone, load_model
from uniseg_hub.app.prepare import BTCV_LABELS, VS_LABELS, prepare_btcv
from uniseg_hub.app.sample_data import fetch_sample
from uniseg_hub.config import parse_bool
from uniseg_hub.errors import ConfigError, SampleDataError, TrainingError
from uniseg_hub.training import (
    CheckLabeld,
    FreezeEncoder,
    GradientClipping,
    ProgressBar,
    RandPatchd,
    build_network,
    ds_weights,
    intensity_transform,
    load_datalist,
)
from uniseg_hub.weights import official_key

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"
# TotalSegmentator 'total' ids of the 13 BTCV organs (shared/reference/real-data.md); oesophagus is absent here.
TOTALSEG_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}
# a few iterations on 6 mm voxels with 64x32x16 patches (the smallest whose bottleneck InstanceNorm sees more
# than one voxel): the CT is 61x50x15 there; one of the two training cases is carved off to validate and select best/
SMALL_RUN = dict(spacing=[6.0, 6.0, 6.0], patch_size=[64, 32, 16], epochs=2, iterations_per_epoch=3, val_interval=1,
                 validation_fraction=0.5, num_workers=0, progress=False, sw_batch_size=4)
PAPER_TRANSFERRED = 97


def write_btcv_tree(root: Path, cases: dict[int, bool]) -> Path:
    """A BTCV RawData tree from the real sample CT: case number -> mirrored left-right or not."""
    try:
        ct, seg = nib.load(fetch_sample("ct_small")), nib.load(fetch_sample("ct_small_seg"))
    except SampleDataError as e:
        pytest.skip(f"sample CT not available: {e}")
    totalseg = np.asarray(seg.dataobj)
    label = np.zeros(totalseg.shape, np.uint8)
    for source, target in TOTALSEG_TO_BTCV.items():
        label[totalseg == source] = target
    image = np.asarray(ct.dataobj)
    folder = root / "RawData" / "Training"
    (folder / "img").mkdir(parents=True)
    (folder / "label").mkdir()
    for number, mirrored in cases.items():
        flip = (lambda a: a[::-1].copy()) if mirrored else (lambda a: a)
        nib.save(nib.Nifti1Image(flip(image), ct.affine), folder / "img" / f"img{number:04d}.nii.gz")
        nib.save(nib.Nifti1Image(flip(label), ct.affine), folder / "label" / f"label{number:04d}.nii.gz")
    return root


@pytest.fixture(scope="module")
def btcv_small(tmp_path_factory):
    """Datalist (official split) of a BTCV tree holding the real CT: bcv_1 and bcv_2 (mirrored) train, bcv_32 val."""
    raw = write_btcv_tree(tmp_path_factory.mktemp("btcv_raw"), {1: False, 2: True, 32: False})
    out = tmp_path_factory.mktemp("btcv_prepared")
    prepare_btcv(raw, out)
    return out


def workflow(root: Path, dataset_dir: Path, pretrained, run_id: str = "run", configs=("train.json", "btcv.json"),
             config_defaults: tuple[str, ...] = (), **overrides) -> ConfigWorkflow:
    """The bundle's training workflow on the small run; ``config_defaults`` names SMALL_RUN settings left at the
    configs' own values."""
    small_run = {k: v for k, v in SMALL_RUN.items() if k not in config_defaults}
    settings = {**small_run, "bundle_root": str(root), "dataset_dir": str(dataset_dir), "pretrained": str(pretrained),
                **overrides}
    wf = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in configs], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, workflow_type="train", run_id=run_id, **settings)
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def finetuned(btcv_small, converted_small, tmp_path_factory):
    """An uninterrupted fine-tuning run: (bundle root, workflow)."""
    root = tmp_path_factory.mktemp("run")
    wf = workflow(root, btcv_small, converted_small)
    assert wf.check_properties() in (None, [])
    wf.run()
    wf.finalize()
    return root, wf


@pytest.mark.slow
def test_finetune_on_real_ct_loss_falls_and_checkpoints_load(finetuned):
    root, wf = finetuned
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 6 and trainer.state.epoch == 2
    history = json.loads((root / "logs" / "history.json").read_text())
    assert history["epoch"] == [1, 2]
    assert history["loss"][-1] < history["loss"][0], history["loss"]
    assert history["lr"] == pytest.approx([0.01, 0.01 * 0.5 ** 0.9])
    assert len(history["val_metric"]) == 2 and all(0 <= v <= 1 for v in history["val_metric"])
    assert (root / "logs" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((root / "logs").glob("events.out.tfevents.*")), "no TensorBoard log"

    ckpt = root / "models" / "finetuned"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "last"]  # nothing partial left behind
    for folder in ("best", "last"):
        model = load_model(ckpt / folder)
        assert isinstance(model, UniSegBackbone) and model.config.num_classes == len(BTCV_LABELS)
    state = torch.load(ckpt / "last" / "training_state.pt", weights_only=True)
    assert state["trainer"] == {"epoch": 2, "iteration": 6, "epoch_length": 3, "max_epochs": 2}
    assert state["best_metric"] == pytest.approx(max(history["val_metric"]))
    trained = load_model(ckpt / "last").state_dict()
    network = wf.parser.get_parsed_content("network").state_dict()
    assert all(torch.equal(trained[k], network[k].cpu()) for k in network)


@pytest.mark.slow
def test_evaluation_runs_on_the_fine_tuned_model(finetuned, btcv_small, converted_small):
    root, _ = finetuned
    wf = workflow(root, btcv_small, converted_small, run_id="evaluate", save_predictions=True)
    wf.run()
    summary = json.loads((root / "eval" / "finetuned" / "summary.json").read_text())
    assert summary["cases"] == 1 and set(summary["per_class"]) == set(BTCV_LABELS[1:])
    assert 0 <= summary["mean"] <= 1
    # absent from the reference: left out of the mean (None) if not predicted, else 0 (nnU-Net's evaluator)
    assert summary["per_class"]["esophagus"] in (None, 0.0)
    assert summary["evaluated_with"]["weights"].endswith("last") and summary["evaluated_with"]["tta"] is True
    raw = (root / "eval" / "finetuned" / "eval_mean_dice_raw.csv").read_text().splitlines()
    assert len(raw) == 2 and "img0032" in raw[1]
    prediction = nib.load(root / "eval" / "finetuned" / "predictions" / "img0032_seg.nii.gz")
    reference = nib.load(fetch_sample("ct_small"))  # back on the scan's own grid
    assert prediction.shape == reference.shape and np.allclose(prediction.affine, reference.affine)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= set(range(len(BTCV_LABELS)))


class Interrupted(Exception):
    pass


def causes(info) -> list[BaseException]:
    """The exception and everything it was raised from (MONAI wraps errors raised inside config expressions)."""
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def messages(info) -> str:
    return "\n".join(str(e) for e in causes(info))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_iteration_count(finetuned, btcv_small, converted_small, tmp_path):
    _, uninterrupted = finetuned
    wf = workflow(tmp_path, btcv_small, converted_small)
    trainer = wf.parser.get_parsed_content("train#trainer")

    @trainer.on(Events.ITERATION_STARTED(once=4))  # the first iteration after the epoch-1 checkpoint
    def crash(_):
        raise Interrupted()

    with pytest.raises(Exception) as info:
        wf.run()
    assert any(isinstance(e, Interrupted) for e in causes(info))
    ckpt = tmp_path / "models" / "finetuned"
    assert torch.load(ckpt / "last" / "training_state.pt", weights_only=True)["trainer"]["epoch"] == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "last"]

    with pytest.raises(Exception) as info:  # a new run never silently replaces the old one
        workflow(tmp_path, btcv_small, converted_small).run()
    assert "--resume true" in messages(info)

    resumed = workflow(tmp_path, btcv_small, converted_small, resume=True)
    resumed.run()
    done, reference = (w.parser.get_parsed_content("train#trainer").state for w in (resumed, uninterrupted))
    assert (done.epoch, done.iteration) == (reference.epoch, reference.iteration) == (2, 6)
    history = json.loads((tmp_path / "logs" / "history.json").read_text())
    expected = json.loads((finetuned[0] / "logs" / "history.json").read_text())
    assert history["epoch"] == expected["epoch"] and history["lr"] == pytest.approx(expected["lr"])
    assert len(history["val_metric"]) == len(expected["val_metric"])
    optimizer = resumed.parser.get_parsed_content("optimizer")
    assert optimizer.param_groups[0]["lr"] == 0.0 and optimizer.state  # momentum buffers came back

    with pytest.raises(Exception) as info:
        workflow(tmp_path, btcv_small, converted_small, resume=True).run()
    assert "already finished all 2 epochs" in messages(info)


def test_backbone_transfer_loads_exactly_the_papers_tensors(official_small, converted_small):
    _, official = official_small
    network = build_network(len(BTCV_LABELS), converted_small, "backbone")
    report = network.load_report
    expected = {official_key(k) for k in official
                if not k.startswith(("intermedia_prompt", "fusion_layer.", "seg_outputs."))}
    assert len(expected) == PAPER_TRANSFERRED and len(official) == 115
    assert set(report.loaded) == expected and len(report.loaded) == PAPER_TRANSFERRED
    assert sorted(report.initialised) == [f"decoder.heads.{u}.weight" for u in range(5)]
    assert set(report.adapted) == {"decoder.upsamples.0.weight"}
    state = network.state_dict()
    torch.testing.assert_close(state["decoder.upsamples.0.weight"],
                               official["tu.0.weight"][:-1].permute(0, 1, 4, 3, 2))
    torch.testing.assert_close(state["encoder.stages.0.0.convs.1.weight"],
                               official["conv_blocks_context.0.blocks.0.conv_1.weight"].permute(0, 1, 4, 3, 2))
    assert network.training and isinstance(network(torch.zeros(1, 1, 64, 32, 16)), list)


def test_encoder_and_scratch_transfers(converted_small):
    encoder = build_network(3, converted_small, "encoder").load_report
    assert encoder.loaded and all(k.startswith("encoder.") for k in encoder.loaded)
    assert encoder.initialised and all(k.startswith("decoder.") for k in encoder.initialised)
    scratch = build_network(3, converted_small, "none")
    assert not scratch.load_report.loaded and scratch.config.features == (4, 8, 16, 16, 16, 16)
    assert scratch.config.in_channels == (1,)
    three = build_network(3, converted_small, "backbone", in_channels=3)
    assert three.config.in_channels == (3,) and "encoder.stages.0.0.convs.3.weight" in three.load_report.adapted
    assert len(three.load_report.loaded) == PAPER_TRANSFERRED - 4  # the 1-, 2- and 4-channel stems became one
    with pytest.raises(TrainingError, match="--transfer none"):
        build_network(3, None, "backbone")
    with pytest.raises(TrainingError, match="backbone, encoder, none"):
        build_network(3, converted_small, "decoder")


def test_a_transfer_reads_the_checkpoint_once(converted_small, monkeypatch):
    """An adapted stem and the backbone come from one read of the checkpoint (uniseg_hub.transfer works on it)."""
    from uniseg_hub import weights

    reads = []
    real = weights.read_safetensors
    monkeypatch.setattr(weights, "read_safetensors", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    build_network(3, converted_small, "backbone", in_channels=3)
    assert len(reads) == 1


@pytest.mark.slow
def test_presets_match_the_datasets_and_resolve(btcv_small, converted_small, tmp_path):
    for preset, labels, modality in (("btcv.json", BTCV_LABELS, ["CT"]), ("vs.json", VS_LABELS, ["T1"])):
        content = json.loads((CONFIGS / preset).read_text())
        assert content["label_names"] == list(labels) and content["modality"] == modality
    wf = workflow(tmp_path, btcv_small, converted_small)
    assert wf.parser.get_parsed_content("num_classes") == 14
    assert wf.parser.get_parsed_content("normalization") == "ct_dataset"
    stats = json.loads((btcv_small / "datalist.json").read_text())["properties"]["intensity"]
    assert wf.parser.get_parsed_content("intensity_stats") == stats
    assert wf.parser.get_parsed_content("loss").weights == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0])
    with pytest.raises(Exception) as info:
        workflow(tmp_path, btcv_small, converted_small, configs=("train.json", "vs.json")).parser.get_parsed_content(
            "train#data")
    assert "differ from the configured label_names" in messages(info)


def test_deep_supervision_loss_downsamples_targets_nearest():
    assert ds_weights(5) == pytest.approx([0.5333333, 0.2666667, 0.1333333, 0.0666667, 0.0])
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 16, 16, 8)).float()
    logits = [torch.randn(2, 3, 16 // 2**i, 16 // 2**i, max(8 // 2**i, 1)) for i in range(3)]
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    loss = DeepSupervisionLoss(dice_ce, weights=ds_weights(3))(logits, target)
    manual = sum(w * dice_ce(x, torch.nn.functional.interpolate(target, size=x.shape[2:], mode="nearest-exact"))
                 for w, x in zip(ds_weights(3), logits))
    torch.testing.assert_close(loss, manual)


def test_rand_patch_samples_foreground_and_matches_a_plain_crop():
    image = torch.arange(20 * 18 * 10, dtype=torch.float32).reshape(1, 20, 18, 10)
    label = torch.zeros(1, 20, 18, 10)
    label[0, 17:19, 1:3, 8] = 2
    indices = [np.flatnonzero(label[0].numpy() == c) for c in range(3)]
    patch = RandPatchd(["image", "label"], "label", (8, 6, 4), indices_key="idx", foreground_prob=1.0,
                       prob_rotate=0.0, prob_scale=0.0)
    patch.set_random_state(0)
    for _ in range(5):
        out = patch({"image": image, "label": label, "idx": indices})
        assert out["image"].shape == (1, 8, 6, 4) and "idx" not in out
        assert (out["label"] == 2).any()  # the organ is always in the patch, even at the border
        start = [int(c) - s // 2 for c, s in zip(patch.center, (8, 6, 4))]
        assert start[0] + 8 <= 20 and start[1] >= 0 and start[2] + 4 <= 10  # clamped inside the image
    resampled = patch._affine(image.shape[1:])  # identity rotation and scale: the same voxels, resampled
    from monai.transforms import Affine
    same = Affine(affine=resampled, spatial_size=(8, 6, 4), padding_mode="zeros", image_only=True)(image)
    torch.testing.assert_close(torch.as_tensor(same).as_subclass(torch.Tensor), out["image"], atol=1e-3, rtol=0)
    small = RandPatchd(["image", "label"], "label", (32, 32, 16), prob_rotate=1.0, prob_scale=1.0)
    out = small({"image": image, "label": label})
    assert out["image"].shape == (1, 32, 32, 16) and set(out["label"].unique().tolist()) <= {0.0, 2.0}
    assert (out["image"] == 0).any()  # a 20x18x10 image inside a 32x32x16 patch: zero padding


def test_label_check_names_the_file_and_the_fix():
    image = torch.zeros(1, 4, 4, 4)
    with pytest.raises(TrainingError, match=r"values in \[15, 15\].*num_classes=14"):
        CheckLabeld("label", 14)({"image": image, "label": torch.full((1, 4, 4, 4), 15.0)})
    with pytest.raises(TrainingError, match="share one voxel grid"):
        CheckLabeld("label", 14)({"image": image, "label": torch.zeros(1, 4, 4, 3)})
    CheckLabeld("label", 14)({"image": image, "label": torch.full((1, 4, 4, 4), 13.0)})


def test_datalist_errors_say_what_to_do(tmp_path, btcv_small):
    with pytest.raises(TrainingError, match="uniseg-hub prepare btcv"):
        load_datalist(tmp_path / "missing.json", "training")
    content = json.loads((btcv_small / "datalist.json").read_text())
    content["validation"][0]["image"] = "nowhere.nii.gz"
    (tmp_path / "datalist.json").write_text(json.dumps(content))
    with pytest.raises(TrainingError, match="nowhere.nii.gz"):
        load_datalist(tmp_path / "datalist.json", "validation")
    with pytest.raises(TrainingError, match="no 'test' cases"):
        load_datalist(tmp_path / "datalist.json", "test")


def test_ct_dataset_normalisation_is_nnunets_clip_and_zscore():
    stats = {"percentile_00_5": -100.0, "percentile_99_5": 300.0, "mean": 100.0, "std": 50.0}
    out = intensity_transform("ct_dataset", stats)({"image": torch.tensor([[[[-500.0, 100.0, 200.0, 900.0]]]])})
    torch.testing.assert_close(out["image"].as_tensor(), torch.tensor([[[[-4.0, 0.0, 2.0, 4.0]]]]))
    with pytest.raises(TrainingError, match="uniseg-hub prepare"):
        intensity_transform("ct_dataset", None)


def test_gradient_clipping_and_frozen_encoder():
    network = UniSegBackbone(2, features=[4, 8, 16, 16, 16, 16])
    for p in network.parameters():
        p.grad = torch.full_like(p, 10.0)
    GradientClipping(12.0)(SimpleNamespace(amp=False, scaler=None, network=network))
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in network.parameters()]))
    assert total == pytest.approx(12.0, rel=1e-4)

    network.zero_grad(set_to_none=True)
    freeze = FreezeEncoder(network, epochs=1)
    freeze(SimpleNamespace(state=SimpleNamespace(epoch=1)))
    before = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.99, nesterov=True, weight_decay=3e-5)
    sum(o.mean() for o in network(torch.randn(1, 1, 64, 32, 16))).backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in network.encoder.state_dict().items())
    freeze(SimpleNamespace(state=SimpleNamespace(epoch=2)))
    assert all(p.requires_grad for p in network.encoder.parameters())


def test_boolean_flags_from_the_command_line():
    assert parse_bool("false") is False and parse_bool("True") is True and parse_bool(True) is True
    assert parse_bool(0) is False and parse_bool("off") is False and parse_bool(" Yes ") is True
    with pytest.raises(ConfigError, match="takes true or false"):
        parse_bool("maybe")


def test_progress_bar_shows_the_loss(capsys):
    engine = Engine(lambda _, batch: {"loss": torch.tensor(0.5 * batch, requires_grad=True)})
    ProgressBar(persist=True).attach(engine)
    engine.run([1, 2, 3], max_epochs=1)
    assert "loss=1.5" in capsys.readouterr().err
