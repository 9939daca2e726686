"""SuperGen: training-free ultra-high-resolution and streaming video on Diffusers backbones."""

from pathlib import Path as _Path

# In a source checkout the sub-packages (tiling/, cache/, parallel/, samplers/)
# sit beside supergen/; installs map them under it. Let a checkout work without
# an install (python -m pytest / python -m supergen from the repo root).
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "tiling").is_dir() and (_checkout / "tiling" / "plan.py").is_file():
    __path__.append(str(_checkout))

from supergen.config import CacheConfig, CoherenceConfig, GenerationConfig, ParallelConfig, StreamConfig, TilingConfig
from supergen.pipeline import SuperGenOutput, SuperGenPipeline

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "CoherenceConfig",
    "GenerationConfig",
    "ParallelConfig",
    "StreamConfig",
    "SuperGenOutput",
    "SuperGenPipeline",
    "TilingConfig",
]
