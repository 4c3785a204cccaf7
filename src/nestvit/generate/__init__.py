"""Image generation with NesT (paper Section 4.5): generators, discriminators, GAN training, metrics.

- :mod:`.models`: ``NestGenerator`` (block de-aggregation), ``TransGanGenerator``, ``ConvGenerator``,
  ``ResNetDiscriminator``, ``NestDiscriminator`` and named presets (``build_generator("nest_64")``).
- :mod:`.train`: ``GanConfig`` recipes, ``train_gan`` (logistic loss, lazy R1, EMA, exact resume).
- :mod:`.metrics`: FID / KID / IS over a pluggable ``FeatureExtractor``.
- :mod:`.bench`: ``bench_generators`` throughput comparison.
- :mod:`.cli`: ``nestvit generate train|sample|eval|report``.
"""

from .models import (
    DISCRIMINATORS,
    GENERATORS,
    BlockDeaggregation,
    ConvGenerator,
    NestDiscriminator,
    NestGenerator,
    NestGeneratorConfig,
    ResNetDiscriminator,
    TransGanGenerator,
    build_discriminator,
    build_generator,
)

__all__ = [
    "DISCRIMINATORS",
    "GENERATORS",
    "BlockDeaggregation",
    "ConvGenerator",
    "NestDiscriminator",
    "NestGenerator",
    "NestGeneratorConfig",
    "ResNetDiscriminator",
    "TransGanGenerator",
    "build_discriminator",
    "build_generator",
]
