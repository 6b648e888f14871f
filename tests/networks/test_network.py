"""The UniSeg network: official sizes, outputs, tasks, input checks, encoder and backbone."""

import pytest
import torch
from conftest import SMALL_PATCH

from uniseg_hub import (
    InputShapeError,
    UniSeg,
    UniSegBackbone,
    UniSegEncoder,
    UnknownTaskError,
)
from uniseg_hub.tasks import TASKS

SMALL_FEATURES = (4, 8, 16, 16, 16, 16)


def count(module):
    return sum(p.numel() for p in module.parameters())


def small(**kwargs):
    torch.manual_seed(0)
    return UniSeg(features=SMALL_FEATURES, patch_size=SMALL_PATCH, **kwargs)


def test_parameter_counts_equal_the_official_ones():
    # official numbers: shared/reference/uniseg-official.md §1.5 (biases kept, so no adjustment)
    model = UniSeg()
    assert count(model) == 32_114_381
    assert len(model.state_dict()) == 115
    assert count(model.prompt) == 1_584 + 939_261
    assert count(model.encoder) == 14_007_904
    assert count(UniSegBackbone(14)) == 31_178_976
    assert count(UniSegBackbone(2)) == 31_169_376
    assert model.prompt.universal.shape == (1, 11, 6, 6, 4)
    assert model.decoder.upsamples[0].weight.shape == (321, 320, 2, 2, 2)
    assert model.encoder.stages[0][0].convs["1"].weight.shape == (32, 1, 3, 3, 1)


def test_eval_returns_full_resolution_logits_and_training_returns_deep_supervision():
    model = small()
    x = torch.randn(1, 1, *SMALL_PATCH)
    model.eval()
    with torch.no_grad():
        out = model(x, "liver")
    assert out.shape == (1, 4, *SMALL_PATCH)
    model.train()
    levels = model(x, 0)
    assert [tuple(o.shape[2:]) for o in levels] == [(64, 64, 32), (32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)]
    assert all(o.shape[:2] == (1, 4) for o in levels)
    with torch.no_grad():
        torch.testing.assert_close(levels[0], model.eval()(x, 0), rtol=1e-4, atol=1e-4)  # eval: the CPU fast path


@pytest.mark.parametrize("channels, task", [(1, "liver"), (1, 8), (2, "autopet"), (4, "brats")])
def test_stems_are_chosen_by_channel_count(channels, task):
    model = small().eval()
    x = torch.randn(1, channels, *SMALL_PATCH)
    with torch.no_grad():
        out = model(x, task)
        assert out.shape == (1, 4, *SMALL_PATCH)
        # the other stems do not take part: changing them changes nothing
        for c, conv in model.encoder.stages[0][0].convs.items():
            if int(c) != channels:
                conv.weight.add_(1.0)
        torch.testing.assert_close(model(x, task), out)


def test_mixed_task_batch_equals_single_task_runs():
    model = small().eval()
    x = torch.randn(3, 1, *SMALL_PATCH)
    tasks = torch.tensor([0, 7, 3])
    with torch.no_grad():
        mixed = model(x, tasks)
        for i, t in enumerate(tasks.tolist()):
            torch.testing.assert_close(mixed[i : i + 1], model(x[i : i + 1], t), rtol=1e-4, atol=1e-4)
        # different tasks give different outputs: the prompt matters
        assert not torch.allclose(model(x[:1], 0), model(x[:1], 5))


def test_task_names_ids_and_tensors_agree():
    model = small().eval()
    x = torch.randn(2, 1, *SMALL_PATCH)
    with torch.no_grad():
        by_name = model(x, "kidney")
        torch.testing.assert_close(model(x, 1), by_name)
        torch.testing.assert_close(model(x, torch.tensor([1, 1])), by_name)
        torch.testing.assert_close(model(x, torch.tensor(1)), by_name)
        torch.testing.assert_close(model(x), model(x, 0))  # default task


@pytest.mark.parametrize("task, named", [("livr", ["'livr'", "liver (0)", "autopet (10)"]), (11, ["11", "0-10"]),
                                         (-1, ["-1", "0-10"]), (torch.tensor([0, 11]), ["[0, 11]", "0-10"])])
def test_unknown_tasks_are_rejected_with_the_task_list(task, named):
    """The error names what was given and what exists (the task names, or the id range)."""
    model = small()
    with pytest.raises(UnknownTaskError) as err:
        model(torch.randn(2, 1, *SMALL_PATCH), task)
    for fragment in named:
        assert fragment in str(err.value)


def test_gradients_reach_the_prompt_and_fusion():
    model = small().train()
    out = model(torch.randn(2, 1, *SMALL_PATCH), 4)
    sum(o.square().mean() for o in out).backward()
    assert model.prompt.universal.grad is not None and model.prompt.universal.grad[0, 4].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompt.fusion.parameters())


def test_only_the_training_patch_is_accepted_by_default():
    model = small()
    with pytest.raises(InputShapeError, match=r"\(64, 64, 32\)"):
        model(torch.randn(1, 1, 64, 64, 64), 0)
    with pytest.raises(InputShapeError, match="channels"):
        model(torch.randn(1, 3, *SMALL_PATCH), 0)
    with pytest.raises(InputShapeError, match="B, C, x, y, z"):
        model(torch.randn(1, *SMALL_PATCH), 0)


def test_resize_prompt_accepts_other_sizes_and_is_exact_at_the_patch():
    strict = small().eval()
    resizing = small(resize_prompt=True).eval()
    resizing.load_state_dict(strict.state_dict())
    x = torch.randn(1, 1, *SMALL_PATCH)
    with torch.no_grad():
        torch.testing.assert_close(resizing(x, 2), strict(x, 2))
        assert resizing(torch.randn(1, 1, 96, 64, 48), 2).shape == (1, 4, 96, 64, 48)
    with pytest.raises(InputShapeError, match="divisible"):
        resizing(torch.randn(1, 1, 64, 64, 40), 2)


def test_encoder_outputs_match_feature_info():
    encoder = UniSegEncoder(features=SMALL_FEATURES).eval()
    x = torch.randn(1, 2, 64, 96, 32)
    feats = encoder(x)
    assert len(feats) == 6
    for f, ch, red in zip(feats, encoder.feature_info.channels(), encoder.feature_info.reduction()):
        assert f.shape[1] == ch
        assert tuple(f.shape[2:]) == tuple(n // r for n, r in zip(x.shape[2:], red))
    assert UniSegEncoder().feature_info.reduction()[-1] == (32, 32, 16)
    picked = UniSegEncoder(features=SMALL_FEATURES, out_indices=(1, -1))
    picked.load_state_dict(encoder.state_dict())
    out = picked.eval()(x)
    assert [o.shape[1] for o in out] == picked.feature_info.channels() == [8, 16]
    torch.testing.assert_close(out[1], feats[5])
    with pytest.raises(ValueError, match="out_indices"):
        UniSegEncoder(out_indices=(6,))


def test_backbone_has_no_prompt_and_takes_any_divisible_size():
    net = UniSegBackbone(14, features=SMALL_FEATURES).eval()
    assert net.decoder.upsamples[0].weight.shape[0] == 16  # no prompt channel
    assert not any("prompt" in k for k in net.state_dict())
    with torch.no_grad():
        assert net(torch.randn(1, 1, 96, 64, 32)).shape == (1, 14, 96, 64, 32)
    net.train()
    assert len(net(torch.randn(1, 1, 64, 64, 32))) == 5
    with pytest.raises(InputShapeError, match="divisible"):
        net(torch.randn(1, 1, 60, 64, 32))


def test_task_table_is_consistent_with_the_official_head():
    assert [t.num_classes for t in TASKS] == [3, 3, 3, 3, 2, 2, 2, 2, 2, 4, 2]  # UniSeg_Trainer.task_class
    assert [t.num_channels for t in TASKS] == [1] * 9 + [4, 2]
    merged = [v for t in TASKS for v in t.merged_labels]
    assert merged == list(range(1, 18))


@pytest.mark.parametrize("kernel, stride", [((3, 3, 1), (1, 1, 1)), ((3, 3, 3), (2, 2, 1)), ((3, 3, 3), (2, 2, 2))])
def test_conv_block_equals_monais_convolution_block(kernel, stride):
    """The block is built from torch.nn (no MONAI import), with MONAI ``Convolution``'s modules, keys and outputs."""
    from monai.networks.blocks.dynunet_block import get_conv_layer

    from uniseg_hub.networks import ConvBlock

    ours = ConvBlock(3, 5, kernel, stride)
    monai_block = get_conv_layer(3, 3, 5, kernel, stride, act=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
                                 norm=("instance", {"affine": True}), bias=True, conv_only=False)
    assert list(ours.state_dict()) == list(monai_block.state_dict())
    assert str(ours.conv) == str(monai_block.conv)
    assert [str(m) for m in ours.adn] == [str(m) for m in monai_block.adn]
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-1, 1)
    monai_block.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 12, 10, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), monai_block(x), rtol=0, atol=0)


def test_importing_the_network_and_loaders_does_not_import_monai():
    import subprocess
    import sys

    code = ("import sys, uniseg_hub; uniseg_hub.UniSeg, uniseg_hub.load_encoder, uniseg_hub.load_model; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('monai', 'ignite', 'nibabel')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("grad", [False, True])
def test_public_outputs_are_contiguous_in_the_standard_layout(grad):
    """The network is plain in every mode: encoder maps and logits can be ``.view``-ed by a user's code."""
    model = small().eval()
    x = torch.randn(1, 1, *SMALL_PATCH)
    with torch.set_grad_enabled(grad):
        maps = model.encoder(x)
        logits = model(x, "liver")
    for tensor in [*maps, logits]:
        assert tensor.is_contiguous() and tensor.view(-1).numel() == tensor.numel()
