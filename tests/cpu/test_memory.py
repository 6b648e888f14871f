"""The allocator tuning of ``uniseg_hub.cpu.memory``: harmless to results, released after the network phase."""

import torch

from uniseg_hub.cpu import (
    ReleaseFreedMemory,
    memory,
    release_freed_memory,
    retain_freed_memory,
)


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
        memory._glibc_default_malloc()


def test_release_handler_runs_between_the_network_and_the_postprocessing(monkeypatch):
    """Attached to a MONAI evaluator, the handler releases after the inferer and before the postprocessing, once
    per iteration."""
    from monai.engines import SupervisedEvaluator

    order = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: order.append("release"))

    class Network(torch.nn.Module):
        def forward(self, x):
            order.append("network")
            return x

    def postprocessing(item):
        order.append("postprocessing")
        return item

    data = [{"image": torch.zeros(1, 1, 2, 2, 2)} for _ in range(2)]
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=Network(),
                                    postprocessing=postprocessing, val_handlers=[ReleaseFreedMemory()])
    evaluator.run()
    assert order == ["network", "release", "postprocessing"] * 2
