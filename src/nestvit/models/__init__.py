"""One file per paper (``nest_variants``: NesT with other papers' options); importing this package registers
every model."""

from . import nest, nest_variants, rtnt, tnt, vit  # noqa: F401
from .nest import Nest, NestConfig
from .nest_variants import NestVariant, NestVariantConfig
from .rtnt import RTNT, RTNTConfig
from .tnt import TNT
from .vit import ViT, ViTConfig

__all__ = ["Nest", "NestConfig", "NestVariant", "NestVariantConfig", "RTNT", "RTNTConfig", "TNT", "ViT",
           "ViTConfig"]
