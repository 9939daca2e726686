"""SuperGen: training-free ultra-high-resolution and streaming video on Diffusers backbones."""

from supergen.config import CacheConfig, GenerationConfig, ParallelConfig, StreamConfig, TilingConfig
from supergen.pipeline import SuperGenOutput, SuperGenPipeline

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "GenerationConfig",
    "ParallelConfig",
    "StreamConfig",
    "SuperGenOutput",
    "SuperGenPipeline",
    "TilingConfig",
]
