"""One file per paper; importing this package registers every model."""

from . import nest, rtnt, tnt, vit  # noqa: F401
from .nest import Nest, NestConfig



__all__ = ["Nest", "NestConfig", "RTNT", "RTNTConfig", "ViT", "ViTConfig"]
