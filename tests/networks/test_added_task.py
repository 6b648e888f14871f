"""Tasks added to a trained universal model: own prompt channel, adapters and heads; the original tasks untouched."""

import pytest
import torch
from conftest import SMALL_PATCH

from uniseg_hub import UniSeg, UnknownTaskError
from uniseg_hub.config import UniSegConfig
from uniseg_hub.cpu import prepare_for_inference
from uniseg_hub.errors import ConfigError
from uniseg_hub.tasks import OFFICIAL_TASKS, TaskTable

SMALL_FEATURES = (4, 8, 16, 16, 16, 16)


def grown(classes=3):
    """A small trained-looking model and the same model with one added task, the original weights copied."""
    torch.manual_seed(0)
    base = UniSeg(features=SMALL_FEATURES, patch_size=SMALL_PATCH).eval()
    bigger = UniSeg(base.config.with_added_task(classes)).eval()
    report = bigger.load_state_dict(base.state_dict(), strict=False)
    assert not report.unexpected_keys and all(k.startswith("added.0.") for k in report.missing_keys)
    return base, bigger


def test_the_original_tasks_give_bit_identical_logits_after_a_task_is_added():
    base, bigger = grown()
    with torch.no_grad():
        for p in bigger.added.parameters():  # whatever the added task learnt
            p.add_(torch.randn_like(p))
    x = torch.randn(2, 1, *SMALL_PATCH)
    with torch.no_grad():
        for task in range(11):
            assert torch.equal(base(x, task), bigger(x, task))
        mixed = torch.tensor([3, 7])
        assert torch.equal(base(x, mixed), bigger(x, mixed))


def test_an_added_task_has_its_own_width_and_starts_as_the_decoder_it_extends():
    _, bigger = grown(classes=6)
    x = torch.randn(1, 1, *SMALL_PATCH)
    assert bigger.num_tasks == 12 and bigger.prompted_tasks == 11
    assert bigger.output_channels(11) == 6 and bigger.output_channels(0) == 4
    with torch.no_grad():
        out = bigger(x, 11)
    assert out.shape == (1, 6, *SMALL_PATCH)
    added = bigger.added[0]
    assert all(float(a.weight.abs().max()) == 0 and float(a.bias.abs().max()) == 0 for a in added.adapters)
    levels = bigger.train()(x, 11)
    assert [t.shape[1] for t in levels] == [6] * 5


def test_only_the_added_modules_get_gradients_from_the_added_task():
    _, bigger = grown()
    bigger.train()
    out = bigger(torch.randn(1, 1, *SMALL_PATCH), 11)
    sum(o.sum() for o in out).backward()
    touched = {n for n, p in bigger.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("added.0.heads") for n in touched)
    assert any(n.startswith("added.0.prompt") for n in touched)
    # the shared parts lie upstream of the added task, so they get gradients too unless frozen; the fusion's last
    # block and the shared heads belong to the prompted tasks only
    assert not any(n.startswith("prompt.fusion.2") or n.startswith("decoder.heads") for n in touched)


def test_a_batch_mixing_an_added_task_with_others_is_refused():
    _, bigger = grown()
    with pytest.raises(UnknownTaskError, match="one task only"):
        bigger(torch.randn(2, 1, *SMALL_PATCH), torch.tensor([0, 11]))


def test_the_cpu_fast_path_runs_added_tasks_like_the_plain_model():
    _, bigger = grown()
    with torch.no_grad():
        for p in bigger.added.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast = prepare_for_inference(bigger)
    x = torch.randn(1, 1, *SMALL_PATCH)
    with torch.no_grad():
        skips = fast.encode(x)
        outs = fast.decode_tasks(skips, [2, 11])
        torch.testing.assert_close(outs[1], bigger(x, 11), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outs[0], bigger(x, 2), rtol=1e-4, atol=1e-4)


def test_names_come_from_the_task_table():
    table = OFFICIAL_TASKS.with_task("knee", labels=["femur", "tibia", "patella"], channels=["T2"],
                                     normalization=["zscore"], spacing=[0.5, 0.5, 1.0], group="MR")
    config = UniSegConfig(features=SMALL_FEATURES, patch_size=SMALL_PATCH, added_tasks=(4,))
    model = UniSeg(config, tasks=table)
    assert model.task_index("knee") == 11 and model.task_index("liver") == 0
    assert UniSeg(config).tasks is None
    with pytest.raises(UnknownTaskError, match="no task table"):
        UniSeg(config).task_index("knee")
    with pytest.raises(ConfigError, match="12"):
        UniSeg(UniSegConfig(features=SMALL_FEATURES, patch_size=SMALL_PATCH), tasks=table)


def test_the_configuration_round_trips_and_the_official_one_is_unchanged():
    config = UniSegConfig().with_added_task(3).with_added_task(2)
    assert UniSegConfig.from_dict(config.to_dict()) == config
    assert config.total_tasks == 13
    assert "added_tasks" not in UniSegConfig().to_dict()["config"]
    with pytest.raises(ConfigError, match="added_tasks"):
        UniSegConfig(added_tasks=(1,))
    with pytest.raises(ConfigError, match="backbone"):
        UniSegConfig().backbone(3).with_added_task(2)


def test_the_task_table_round_trips_and_refuses_damaged_entries():
    table = OFFICIAL_TASKS.with_task("knee", labels=["femur"], channels=["T2"], normalization=["zscore"],
                                     spacing=[1, 1, 2], group="MR")
    assert TaskTable.from_json(table.to_json()) == table
    assert table[11].merged_labels == (18,) and table.merged_classes == 19
    assert TaskTable.from_json(OFFICIAL_TASKS.to_json()).official
    with pytest.raises(ConfigError, match="already has a task named"):
        table.with_task("knee", labels=["x"], channels=["CT"], normalization=["ct_window"], spacing=[1, 1, 1])
    with pytest.raises(ConfigError, match="name"):
        OFFICIAL_TASKS.with_task("Knee Joint!", labels=["x"], channels=["CT"], normalization=["ct_window"],
                                 spacing=[1, 1, 1])
    with pytest.raises(ConfigError, match="uint8"):  # label maps are uint8: values up to 255 in the all-tasks map
        table.with_task("many", labels=[f"part {i}" for i in range(240)], channels=["CT"],
                        normalization=["ct_window"], spacing=[1, 1, 1])
    assert table.with_task("many", labels=[f"part {i}" for i in range(237)], channels=["CT"],
                           normalization=["ct_window"], spacing=[1, 1, 1]).merged_classes == 256
    broken = table.to_json()
    broken[11]["spacing"] = [1, 1]
    with pytest.raises(ConfigError, match=r"tasks\[11\]\.spacing"):
        TaskTable.from_json(broken)
    broken = table.to_json()
    broken[11]["merged_labels"] = [3]
    with pytest.raises(ConfigError, match="unique"):
        TaskTable.from_json(broken)


def test_the_task_table_travels_with_the_weights(tmp_path):
    import json

    from uniseg_hub import load_model
    from uniseg_hub.weights import save_folder

    _, bigger = grown(classes=3)
    table = OFFICIAL_TASKS.with_task("knee", labels=["femur", "tibia"], channels=["T2"], normalization=["zscore"],
                                     spacing=[1, 1, 2], group="MR")
    save_folder(tmp_path / "m", bigger.state_dict(), bigger.config, tasks=table)
    loaded = load_model(tmp_path / "m")
    assert loaded.tasks == table and loaded.task_index("knee") == 11
    loaded.save_pretrained(tmp_path / "again")
    assert load_model(tmp_path / "again").tasks == table
    assert load_model(tmp_path / "m" / "model.safetensors").tasks == table  # a lone file: from its metadata
    document = json.loads((tmp_path / "m" / "config.json").read_text())
    document["tasks"] = document["tasks"][:11]
    (tmp_path / "m" / "config.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="lists 11 tasks but its network has 12"):
        load_model(tmp_path / "m")
    with pytest.raises(ConfigError, match="lists 12 tasks, the network has 11"):
        save_folder(tmp_path / "x", {}, UniSegConfig(), tasks=table)


def test_onnx_export_refuses_a_model_with_added_tasks(tmp_path):
    pytest.importorskip("onnxscript")
    from uniseg_hub.app.export import export_onnx
    from uniseg_hub.errors import UnisegHubError
    from uniseg_hub.weights import save_folder

    _, bigger = grown()
    save_folder(tmp_path / "m", bigger.state_dict(), bigger.config)
    with pytest.raises(UnisegHubError, match="added after training"):
        export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
