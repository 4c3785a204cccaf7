"""nestvit: nested vision transformers (ViT, TNT, RTNT, NesT) in PyTorch."""

from importlib.metadata import PackageNotFoundError, version

from .contract import (  # how images become a model's input (timm's data config)
    InputTransform,
    input_transform,
    load,  # a saved model and its input transform, from a run directory or a weights file
)
from .hub import from_pretrained, save_pretrained  # the Hugging Face Hub / timm layout
from .pretrained import list_pretrained  # published weights: create_model(name, pretrained=True)
from .registry import create_model, list_models, register_model

try:
    __version__ = version("nestvit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["InputTransform", "create_model", "from_pretrained", "input_transform", "list_models", "list_pretrained",
           "load", "register_model", "save_pretrained",
           "__version__"]
