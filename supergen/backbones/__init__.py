"""Backbone adapters, found through a registry keyed by the Diffusers transformer class."""

from __future__ import annotations

from supergen.backbones.base import (
    BackboneAdapter,
    Conditioning,
    LatentGeometry,
    PipelineScheduler,
    TokenPositions,
    require_config,
)
from supergen.backbones.cogvideox import CogVideoXAdapter
from supergen.backbones.hunyuan import HunyuanVideoAdapter
from supergen.backbones.ltx import LTXAdapter
from supergen.backbones.wan import WanAdapter

_REGISTRY: dict[str, type[BackboneAdapter]] = {}


def register_adapter(adapter_cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Register an adapter for every transformer class it names (usable as a decorator)."""
    for name in adapter_cls.transformer_classes:
        _REGISTRY[name] = adapter_cls
    return adapter_cls


for _adapter in (WanAdapter, CogVideoXAdapter, HunyuanVideoAdapter, LTXAdapter):
    register_adapter(_adapter)


def supported_pipelines() -> list[str]:
    return sorted({p for cls in _REGISTRY.values() for p in cls.pipeline_classes})


def adapter_for(pipeline, native_size: tuple[int, int, int] | None = None) -> BackboneAdapter:
    """Wrap a loaded Diffusers pipeline in the adapter registered for its transformer class."""
    pipe_name = type(pipeline).__name__
    transformer = getattr(pipeline, "transformer", None)
    key = type(transformer).__name__ if transformer is not None else None
    adapter_cls = _REGISTRY.get(key)
    if adapter_cls is None or (adapter_cls.pipeline_classes and pipe_name not in adapter_cls.pipeline_classes):
        raise ValueError(
            f"no SuperGen adapter for {pipe_name} (transformer {key}); supported pipelines: "
            f"{', '.join(supported_pipelines())}"
        )
    return adapter_cls(pipeline, native_size=native_size)


__all__ = [
    "BackboneAdapter",
    "Conditioning",
    "LatentGeometry",
    "PipelineScheduler",
    "TokenPositions",
    "adapter_for",
    "register_adapter",
    "require_config",
    "supported_pipelines",
]
