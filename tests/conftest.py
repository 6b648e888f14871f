"""Shared fixtures: small official-format checkpoints, converted through the normal path."""

import pytest
import torch

from uniseg_hub.weights import convert_checkpoint

from official_format import official_shapes, save_official_checkpoint, seeded_state_dict

pytest_plugins = ["fakehub"]  # the fake Hugging Face Hub: fake_hub, hf_isolated, small_release

# The small configuration used across the suite (official axis order for the official format):
# 6 stages with 4-8-16-16-16-16 features, patch (z, y, x) = (32, 64, 64), i.e. (64, 64, 32) in MONAI order.
SMALL = dict(base_features=4, max_features=16, patch_zyx=(32, 64, 64))
SMALL_PATCH = (64, 64, 32)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def official_small(tmp_path_factory):
    """(path of an official-format .model file, its official state dict) for the small universal model."""
    path = tmp_path_factory.mktemp("official") / "model_final_checkpoint.model"
    state = seeded_state_dict(official_shapes(**SMALL), seed=1)
    save_official_checkpoint(path, state)
    return path, state


@pytest.fixture(scope="session")
def converted_small(official_small, tmp_path_factory):
    """Folder written by convert_checkpoint from ``official_small``."""
    return convert_checkpoint(official_small[0], tmp_path_factory.mktemp("converted") / "uniseg-small")
