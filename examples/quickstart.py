"""Smallest end-to-end use of uniseg-hub: convert a checkpoint, load it, segment one patch.

With the official checkpoint (``model_final_checkpoint.model`` from the UniSeg release, Google Drive link in
README.md) as the first argument, it is converted and run. Without one, it says so and runs the same path on
randomly initialised weights written in the converted-folder format, so the output shows the pipeline, not a
segmentation.
What it writes (the converted folder) goes to a temporary folder that is removed when it ends.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

from uniseg_hub import UniSeg, convert_checkpoint, load_encoder, load_model
from uniseg_hub.weights import save_folder


def main() -> None:
    # everything it writes goes into a temporary folder that is removed at the end, even after an error
    with tempfile.TemporaryDirectory(prefix="uniseg-quickstart-") as tmp:
        run(Path(tmp))


def run(work: Path) -> None:
    if len(sys.argv) > 1:
        folder = convert_checkpoint(sys.argv[1], work / "uniseg-11task")
        print(f"converted {sys.argv[1]} (into a temporary folder, removed at the end; `uniseg-hub convert "
              "SRC DIR` keeps one)")
    else:
        print("no official checkpoint given (python examples/quickstart.py model_final_checkpoint.model);\n"
              "running with RANDOM weights to show the pipeline")
        torch.manual_seed(0)
        net = UniSeg()
        folder = save_folder(work / "uniseg-random", net.state_dict(), net.config)
    model = load_model(folder)
    print(f"loaded {type(model).__name__}: {model.load_report.summary()}, patch (x, y, z) {model.patch_size}")
    x = torch.randn(1, 1, *model.patch_size)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(x, "liver")
    probs = logits.softmax(1)[:, :3]  # official: softmax over the 4 head channels, keep the task's C_t = 3
    print(f"liver logits {tuple(logits.shape)} in {time.perf_counter() - start:.1f} s; "
          f"label voxel counts {torch.bincount(probs.argmax(1).flatten(), minlength=3).tolist()}")
    encoder = load_encoder(folder, in_channels=1)
    print(f"encoder features {encoder.feature_info.channels()}, reductions {encoder.feature_info.reduction()}")


if __name__ == "__main__":
    main()
