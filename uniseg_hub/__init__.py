"""uniseg-hub: the UniSeg universal 3D segmentation model (arXiv 2304.03493) for MONAI and the Hugging Face Hub.

    from uniseg_hub import load_encoder
    encoder = load_encoder("path/to/converted", in_channels=1)
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    IncompatibleCheckpointError,
    InputShapeError,
    UnisegHubError,
    UnknownTaskError,
    UnsafeCheckpointError,
    UnsupportedChannelsError,
)
from .network import UniSeg, UniSegBackbone, UniSegEncoder  # noqa: E402
from .pretrained import load_encoder, load_model  # noqa: E402
from .weights import convert_checkpoint  # noqa: E402

__all__ = [
    "__version__", "UniSeg", "UniSegBackbone", "UniSegEncoder", "load_encoder", "load_model", "convert_checkpoint",
    "UnisegHubError", "UnknownTaskError", "InputShapeError", "UnsupportedChannelsError", "UnsafeCheckpointError",
    "IncompatibleCheckpointError",
]
