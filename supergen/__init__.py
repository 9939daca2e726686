"""SuperGen: training-free ultra-high-resolution and streaming video on Diffusers backbones."""

from pathlib import Path as _Path

# In a source checkout the sub-packages (tiling/, cache/, parallel/, samplers/)
# sit beside supergen/; installs map them under it. Let a checkout work without
# an install (python -m pytest / python -m supergen from the repo root).
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "tiling").is_dir() and (_checkout / "tiling" / "plan.py").is_file():
    __path__.append(str(_checkout))

__version__ = "0.1.0"

# Imported on first use, so ``import supergen.tiling`` (or any lower layer) does not load the pipeline.
_EXPORTS = {
    "CacheConfig": "supergen.config",
    "CoherenceConfig": "supergen.config",
    "GenerationConfig": "supergen.config",
    "ParallelConfig": "supergen.config",
    "StreamConfig": "supergen.config",
    "TilingConfig": "supergen.config",
    "SuperGenOutput": "supergen.pipeline",
    "SuperGenPipeline": "supergen.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'supergen' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
