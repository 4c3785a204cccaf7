"""One file per paper; importing this package registers every model."""

from . import nest, rtnt, tnt, vit  # noqa: F401
from .nest import Nest, NestConfig
from .rtnt import RTNT, RTNTConfig
from .tnt import TNT
from .vit import ViT, ViTConfig

__all__ = ["Nest", "NestConfig", "RTNT", "RTNTConfig", "TNT", "ViT", "ViTConfig"]
