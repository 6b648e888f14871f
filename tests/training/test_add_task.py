"""Adding a task to the universal model (issue 19): the grown network starts as its source task, the bundle's
train.json + add_task.json train it on the real CT (liver as a new task), the original tasks stay bit-identical in
the default mode, and the command line, resume and the finetune mode's Dice movement work."""

import contextlib
import io
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from test_distributed import torchrun
from test_training import CONFIGS, Interrupted, causes, messages

from uniseg_hub import cli, load_model
from uniseg_hub.errors import ConfigError, TrainingError
from uniseg_hub.networks import UniSeg
from uniseg_hub.training import check_cases, grow_network, task_dice
from uniseg_hub.weights import load_checked, save_folder

from scans import sample

# wide enough that the frozen mode's capacity (prompt channel, adapters, heads) can learn the liver on random
# features, with a patch whose bottleneck (2x1x1) is smallest: (64, 32, 16) at 6 mm covers the CT (61x50x15)
FEATURES = (8, 16, 32, 32, 32, 32)
PATCH = (64, 32, 16)
SPACING = [6.0, 6.0, 6.0]
LIVER = 5  # TotalSegmentator 'total' id
RUN = dict(spacing=SPACING, num_workers=0, progress=False, sw_batch_size=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small universal model (random weights, the official eleven tasks) as a folder."""
    torch.manual_seed(0)
    net = UniSeg(features=FEATURES, patch_size=PATCH)
    return save_folder(tmp_path_factory.mktemp("base") / "uniseg", net.state_dict(), net.config)


@pytest.fixture(scope="module")
def liver_cases(tmp_path_factory):
    """A datalist of the real CT (plain and mirrored) with its liver as the one label; the same two cases
    validate, and a second datalist gives them to the official liver task (label 1 is its liver)."""
    ct, seg = nib.load(sample("ct_small")), nib.load(sample("ct_small_seg"))
    image, label = np.asarray(ct.dataobj), (np.asarray(seg.dataobj) == LIVER).astype(np.uint8)
    folder = tmp_path_factory.mktemp("liver_cases")
    entries = []
    for i, flip in enumerate((False, True)):
        turn = (lambda a: a[::-1].copy()) if flip else (lambda a: a)
        nib.save(nib.Nifti1Image(turn(image), ct.affine), folder / f"ct{i}.nii.gz")
        nib.save(nib.Nifti1Image(turn(label), ct.affine), folder / f"liver{i}.nii.gz")
        entries.append({"image": f"ct{i}.nii.gz", "label": f"liver{i}.nii.gz"})
    datalist = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"}, "training": entries,
                "validation": entries}
    (folder / "datalist.json").write_text(json.dumps(datalist))
    old = {"validation": [{**e, "task": "liver"} for e in entries]}
    (folder / "old_tasks.json").write_text(json.dumps(old))
    return folder


def bundle_run(base, cases: Path, out: Path, **overrides) -> ConfigWorkflow:
    """The bundle's add-task workflow (train.json + add_task.json) adding the liver as task 'abdomen_liver'."""
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "add_task.json")],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, workflow_type="train",
                        bundle_root=str(out), dataset_dir=str(cases), datalist_file=str(cases / "datalist.json"),
                        pretrained=str(base), task_name="abdomen_liver", model_dir=str(out / "model"),
                        **{**RUN, **overrides})
    wf.initialize()
    return wf


def same_original_tasks(old, new, x) -> bool:
    """The eleven tasks' logits of ``new`` equal ``old``'s bit for bit, and so do all their tensors."""
    with torch.no_grad():
        logits = all(torch.equal(old(x, t), new(x, t)) for t in range(11))
    state = new.state_dict()
    return logits and all(torch.equal(v, state[k]) for k, v in old.state_dict().items())


# the grown network


def test_the_new_task_starts_as_its_source_task_and_only_its_modules_train(base):
    model = grow_network(base, "knee", ["background", "femur", "tibia"], ["T2"], [1, 1, 2]).eval()
    assert model.source_task.name == "prostate" and model.default_task == 11  # the one 1-channel MR task
    assert model.tasks[11].labels == ("femur", "tibia") and model.tasks[11].group == "MR"
    assert {k for k in model.load_report.initialised} == {k for k in model.state_dict() if k.startswith("added.0.")}
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, "prostate")[:, :3], rtol=0, atol=1e-5)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith("added.0.")}

    wide = grow_network(base, "ribs", [f"rib {i}" for i in range(5)], ["CT"], [1, 1, 2], init_from="spleen",
                        mode="finetune").eval()
    assert wide.source_task.name == "spleen" and wide.output_channels("ribs") == 6
    with torch.no_grad():  # more classes than the shared head: its four rows, then fresh ones
        torch.testing.assert_close(wide(x)[:, :4], wide(x, "spleen"), rtol=0, atol=1e-5)
    trained = {n for n, p in wide.named_parameters() if p.requires_grad}
    assert any(n.startswith("decoder.blocks.") for n in trained) and any("upsamples" in n for n in trained)
    assert not any(n.startswith(("encoder.", "prompt.", "decoder.heads.")) for n in trained)


def test_growing_refuses_what_cannot_work(base, tmp_path):
    with pytest.raises(ConfigError, match="already has a task named 'liver'"):
        grow_network(base, "liver", ["liver"], ["CT"], [1, 1, 1])
    with pytest.raises(TrainingError, match="stems for"):
        grow_network(base, "rgb", ["x"], ["R", "G", "B"], [1, 1, 1])
    with pytest.raises(TrainingError, match="unknown add-task mode"):
        grow_network(base, "knee", ["x"], ["T2"], [1, 1, 1], mode="everything")
    backbone = load_model(base, num_classes=3)
    save_folder(tmp_path / "backbone", backbone.state_dict(), backbone.config)
    with pytest.raises(TrainingError, match="not a universal UniSeg"):
        grow_network(tmp_path / "backbone", "knee", ["x"], ["T2"], [1, 1, 1])


# the command line (frozen mode, the default)


@pytest.fixture(scope="module")
def cli_run(base, liver_cases, tmp_path_factory):
    """``uniseg-hub add-task ... --json``: (report printed, output folder)."""
    out = tmp_path_factory.mktemp("cli") / "grown"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli.main(["add-task", str(base), "--name", "abdomen_liver", "--labels", "liver", "--modality", "CT",
                  "--spacing", "6,6,6", "--datalist", str(liver_cases / "datalist.json"), "--out", str(out),
                  "--epochs", "1", "--iterations", "2", "--workers", "0", "--noprogress", "--json"])
    return json.loads(stdout.getvalue()), out


def test_the_command_adds_the_task_and_leaves_the_original_tasks_bit_identical(cli_run, base):
    report, out = cli_run
    assert report["task"] == {"name": "abdomen_liver", "id": 11, "labels": ["liver"], "channels": ["CT"],
                              "spacing": SPACING, "normalization": ["ct_window"], "group": "CT"}
    assert report["mode"] == "frozen" and report["iterations"] == 2 and report["init_from"] == "liver"
    assert set(report["dice"]) == {"abdomen_liver"} and report["dice"]["abdomen_liver"]["cases"] == 2
    grown, original = load_model(out), load_model(base)
    assert grown.tasks.names() == [*original.tasks.names(), "abdomen_liver"] and grown.task_index("abdomen_liver")
    assert grown.output_channels("abdomen_liver") == 2
    assert report["trained_parameters"] == sum(p.numel() for p in grown.added.parameters())
    assert same_original_tasks(original, grown, torch.randn(2, 1, *PATCH))
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["base_model"] == str(base) and config["source"]["mode"] == "frozen"
    assert config["source"]["added_task"] == "abdomen_liver" and config["source"]["iterations"] == 2
    last = load_model(out / "training" / "last")  # the resumable checkpoint carries the table too
    assert last.tasks == grown.tasks and (out / "training" / "last" / "training_state.pt").is_file()


def test_the_command_refuses_bad_requests_in_one_line(cli_run, base, liver_cases, capsys, tmp_path):
    _, existing = cli_run
    datalist = str(liver_cases / "datalist.json")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["add-task", str(base), "--datalist", datalist, "--out", str(existing)])
    assert exit_info.value.code == 2 and "needs --name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["add-task", str(base), "--name", "x", "--datalist", datalist, "--out", str(existing),
                  "--mode", "all"])
    assert exit_info.value.code == 2 and "--mode must be one of frozen, finetune" in capsys.readouterr().err
    out = str(tmp_path / "new")
    for args, expected in ((["--name", "abdomen_liver", "--spacing", "6,6,6", "--out", str(existing)],
                            "already exists"),
                           (["--name", "kidney", "--spacing", "6,6,6", "--out", out],
                            "already has a task named 'kidney'"),
                           (["--name", "organ", "--out", out], "--spacing"),
                           (["--name", "organ", "--spacing", "6,6", "--out", out], "three voxel sizes"),
                           (["--name", "organ", "--spacing", "6,6,6", "--modality", "US", "--out", out], "CT, MR")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["add-task", str(base), "--datalist", datalist, "--workers", "0", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and expected in err and err.count("\n") == 1, err


def test_the_grown_model_predicts_its_new_task_by_name_and_with_all(cli_run, liver_cases, tmp_path, capsys):
    _, grown = cli_run
    scan = liver_cases / "ct0.nii.gz"
    cli.main(["predict", str(scan), "--model", str(grown), "--task", "abdomen_liver", "--out", str(tmp_path / "one"),
              "--tta", "False", "--progress", "False", "--preview", "False", "--json"])
    result = json.loads(capsys.readouterr().out)
    label_map = nib.load(result["label_map"])
    assert Path(result["label_map"]).name == "ct0_abdomen_liver.nii.gz"
    assert label_map.shape == nib.load(scan).shape and set(np.unique(label_map.get_fdata())) <= {0, 1}
    cli.main(["predict", str(scan), "--model", str(grown), "--task", "all", "--out", str(tmp_path / "all"),
              "--tta", "False", "--progress", "False", "--preview", "False", "--json"])
    merged = json.loads(capsys.readouterr().out)
    names = {row["name"] for row in merged["volumes"]}
    assert "abdomen_liver: liver" in names and "liver: liver" in names, names


# the bundle: learning on the real CT, the finetune mode, resume, torchrun


@pytest.mark.slow
def test_a_frozen_run_on_real_ct_learns_the_task_and_keeps_the_eleven(base, liver_cases, tmp_path):
    start = time.perf_counter()
    bundle_run(base, liver_cases, tmp_path, epochs=4, iterations_per_epoch=20).run()
    seconds = time.perf_counter() - start
    out = tmp_path / "model"
    report = json.loads((out / "add_task_report.json").read_text())
    history = json.loads((out / "training" / "logs" / "history.json").read_text())
    grown, original = load_model(out), load_model(base)
    assert history["loss"][-1] < history["loss"][0] - 0.2, history["loss"]
    # an untrained slot: the same added task freshly initialised (random prompt and heads, zero adapters)
    fresh = UniSeg(grown.config, tasks=grown.tasks)
    load_checked(fresh, original.state_dict(), may_initialise=["added.0.*"])
    cases = check_cases(liver_cases / "datalist.json", task="abdomen_liver")
    untrained = task_dice(fresh, cases, PATCH)["abdomen_liver"]["dice"]
    dice = report["dice"]["abdomen_liver"]
    assert dice["after"] > max(dice["before"], untrained) + 0.15, (dice, untrained)
    assert same_original_tasks(original, grown, torch.randn(2, 1, *PATCH))
    print(f"\nadd-task smoke run (frozen, 4 x 20 iterations of 2 {PATCH} patches, 2 real CT cases at 6 mm): "
          f"{seconds:.0f} s on CPU with {torch.get_num_threads()} threads; loss {history['loss'][0]:.3f} -> "
          f"{history['loss'][-1]:.3f}; Dice step 0 {dice['before']:.3f}, untrained slot {untrained:.3f}, after "
          f"{dice['after']:.3f}")


@pytest.mark.slow
def test_the_finetune_mode_reports_how_far_each_old_task_moved(base, liver_cases, tmp_path):
    bundle_run(base, liver_cases, tmp_path, epochs=1, iterations_per_epoch=3, mode="finetune",
               check_datalist=str(liver_cases / "old_tasks.json")).run()
    out = tmp_path / "model"
    report = json.loads((out / "add_task_report.json").read_text())
    grown, original = load_model(out), load_model(base)
    assert set(report["dice"]) == {"abdomen_liver", "liver"} and report["dice"]["liver"]["cases"] == 2
    cases = check_cases(liver_cases / "old_tasks.json")
    liver = report["dice"]["liver"]
    assert liver["before"] == pytest.approx(task_dice(original, cases, PATCH)["liver"]["dice"])
    assert liver["after"] == pytest.approx(task_dice(grown, cases, PATCH)["liver"]["dice"])
    assert liver["change"] == pytest.approx(liver["after"] - liver["before"])
    state, old = grown.state_dict(), original.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in old.items() if k.startswith(("encoder.", "prompt.")))
    assert not torch.equal(state["decoder.blocks.0.0.conv.weight"], old["decoder.blocks.0.0.conv.weight"])
    assert not same_original_tasks(original, grown, torch.randn(1, 1, *PATCH))


@pytest.mark.slow
def test_an_interrupted_run_resumes_and_writes_the_grown_model(base, liver_cases, tmp_path):
    run = dict(epochs=2, iterations_per_epoch=1)
    wf = bundle_run(base, liver_cases, tmp_path, **run)

    @wf.parser.get_parsed_content("train#trainer").on(Events.ITERATION_STARTED(once=2))
    def crash(_):
        raise Interrupted()

    with pytest.raises(Exception) as info:
        wf.run()
    assert any(isinstance(e, Interrupted) for e in causes(info))
    out = tmp_path / "model"
    assert not (out / "model.safetensors").exists() and (out / "training" / "last").is_dir()
    with pytest.raises(Exception) as info:  # a new run never silently replaces the old one
        bundle_run(base, liver_cases, tmp_path, **run).run()
    assert "--resume true" in messages(info)
    resumed = bundle_run(base, liver_cases, tmp_path, resume=True, **run)
    resumed.run()
    state = resumed.parser.get_parsed_content("train#trainer").state
    assert (state.epoch, state.iteration) == (2, 2)
    grown = load_model(out)
    assert grown.tasks[11].name == "abdomen_liver" and json.loads((out / "config.json").read_text())["source"][
        "iterations"] == 2
    assert same_original_tasks(load_model(base), grown, torch.randn(1, 1, *PATCH))


@pytest.mark.slow
def test_two_gloo_ranks_add_the_task_in_step(base, liver_cases, tmp_path):
    settings = {**RUN, "epochs": 1, "iterations_per_epoch": 2, "bundle_root": str(tmp_path), "pretrained": str(base),
                "dataset_dir": str(liver_cases), "datalist_file": str(liver_cases / "datalist.json"),
                "task_name": "abdomen_liver", "model_dir": str(tmp_path / "model")}
    torchrun(__file__, json.dumps(settings), str(tmp_path), cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["identical"] and r["changed"] for r in ranks) and ranks[0]["digest"] == ranks[1]["digest"]
    grown = load_model(tmp_path / "model")
    assert grown.tasks[11].name == "abdomen_liver"
    assert same_original_tasks(load_model(base), grown, torch.randn(1, 1, *PATCH))


def main(settings: str, out_dir: str) -> None:
    """One torchrun rank: add the task with the multi-GPU configuration, then compare the trained parameters."""
    import torch.distributed as dist

    wf = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in ("train.json", "add_task.json",
                                                                "multi_gpu_train.json")],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, workflow_type="train",
                        **json.loads(settings))
    wf.initialize()
    network = wf.parser.get_parsed_content("network")
    assert isinstance(network, torch.nn.parallel.DistributedDataParallel)
    before = torch.cat([p.detach().reshape(-1).clone() for p in network.module.added.parameters()])
    wf.run()
    after = torch.cat([p.detach().reshape(-1) for p in network.module.added.parameters()])
    gathered = [torch.zeros_like(after) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, after)
    result = {"identical": all(torch.equal(gathered[0], g) for g in gathered),
              "changed": not torch.equal(before, after), "digest": float(after.double().sum())}
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    wf.finalize()


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:])
