"""Our network, loaded through ``convert``, against numbers produced by the official UniSeg classes.

``tests/networks/data/official_golden.json`` was produced by running the official ``UniSeg_model`` and
``UniSeg_Backbone`` on seeded weights and inputs (``tests/golden/README.md``). Here the same seeded weights are
written as an official-format checkpoint, converted with ``convert_checkpoint`` and run in MONAI axis order; the
outputs, permuted back to (z, y, x), must match with a relative error below 1e-4 in float32.
"""

import json
from pathlib import Path

import pytest
import torch

from uniseg_hub import convert_checkpoint, load_model

from official_format import (
    official_shapes,
    sample_indices,
    save_official_checkpoint,
    seeded_input,
    seeded_state_dict,
)

GOLDEN = json.loads((Path(__file__).parent / "data" / "official_golden.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}
WEIGHT_KEYS = {"SMALL": "SMALL@2000", "FULL": "FULL@1000", "DOWN_SMALL": "DOWN_SMALL@3000"}
MAX_RELATIVE_ERROR = 1e-4


def to_monai(x):
    return x.permute(0, 1, 4, 3, 2)


def to_official(y):
    return y.permute(0, 1, 4, 3, 2).contiguous()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converted folders per golden configuration, built on first use."""
    folders = {}

    def get(case):
        key = case["config"]
        if key not in folders:
            state = seeded_state_dict(official_shapes(**case["shape_kwargs"]), case["weight_seed"])
            fingerprint = GOLDEN["weights"][WEIGHT_KEYS[key]]
            total = sum(float(t.double().sum()) for t in state.values())
            assert total == pytest.approx(fingerprint["sum"], rel=1e-9), \
                "seeded weights differ from the golden run: torch's random stream changed, regenerate the goldens"
            root = tmp_path_factory.mktemp(key)
            save_official_checkpoint(root / "official.model", state)
            folders[key] = convert_checkpoint(root / "official.model", root / "converted")
        return load_model(folders[key])

    return get


def assert_matches(ours: torch.Tensor, golden: dict):
    ours = to_official(ours).double()
    assert list(ours.shape) == golden["shape"]
    index = sample_indices(ours.numel(), len(golden["sample_indices"]), golden["sample_seed"])
    assert index.tolist() == golden["sample_indices"]
    got = ours.flatten()[index]
    want = torch.tensor(golden["sample_values"], dtype=torch.float64)
    relative = float((got - want).norm() / want.norm())
    assert relative < MAX_RELATIVE_ERROR, f"sampled outputs differ: relative error {relative:.2e}"
    sums = ours.transpose(0, 1).flatten(1).sum(1)
    sum_error = float((sums - torch.tensor(golden["channel_sums"])).abs().max()) / golden["abs_sum"]
    assert sum_error < MAX_RELATIVE_ERROR, f"channel sums differ: {sum_error:.2e} of the absolute sum"
    assert float(ours.abs().max()) == pytest.approx(golden["max_abs"], rel=MAX_RELATIVE_ERROR)


def run(model, case, task=None):
    x = to_monai(seeded_input(case["input_shape"], case["input_seed"]))
    if task is None and case.get("task_id") is not None:
        task = torch.tensor(case["task_id"])
    forward = (lambda inp: model(inp)) if task is None else (lambda inp: model(inp, task))
    with torch.no_grad():
        model.eval()
        eval_out = forward(x)
        model.train()
        ds_out = forward(x) if "ds" in case else None
        model.eval()
    return eval_out, ds_out


SMALL_CASES = ["up_small_c1_t0", "up_small_c1_t7", "up_small_c2_t10", "up_small_c4_t9", "down_small_c1_k14"]


@pytest.mark.parametrize("name", SMALL_CASES)
def test_small_configuration_matches_official(converted, name):
    case = CASES[name]
    eval_out, ds_out = run(converted(case), case)
    assert_matches(eval_out, case["eval"])
    assert len(ds_out) == len(case["ds"]) == 5
    for ours, golden in zip(ds_out, case["ds"]):
        assert_matches(ours, golden)


def test_single_task_batch_is_the_official_result_and_mixed_batches_are_per_sample(converted):
    # the official model applies task_id[0] to the whole batch: its [7, 0] batch equals a [7, 7] batch
    case = CASES["up_small_c1_t7_mixed"]
    model = converted(case)
    official_style, _ = run(model, case, task=7)
    assert_matches(official_style, case["eval"])
    # ours selects per sample: the first sample is the task-7 result, the second the task-0 result
    mixed, _ = run(model, case, task=torch.tensor([7, 0]))
    task0, _ = run(model, CASES["up_small_c1_t0"], task=0)
    torch.testing.assert_close(mixed[:1], official_style[:1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1:], task0[1:], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["up_full_c1_t0", "up_full_c4_t9", "up_full_c2_t10"])
def test_full_size_official_model_matches(converted, name):
    case = CASES[name]
    model = converted(case)
    assert sum(p.numel() for p in model.parameters()) == GOLDEN["param_counts"]["upstream_full"]
    x = to_monai(seeded_input(case["input_shape"], case["input_seed"]))
    with torch.inference_mode():
        out = model(x, case["task_id"][0])
    assert_matches(out, case["eval"])
