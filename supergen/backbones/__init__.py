"""Backbone adapters, found through a registry keyed by the Diffusers transformer class."""

from __future__ import annotations

import json
import os
from pathlib import Path

from supergen.backbones.base import (
    BackboneAdapter,
    BackboneProfile,
    Conditioning,
    DecodeBand,
    LatentGeometry,
    ModelConfigs,
    ModelSpec,
    PipelineScheduler,
    TokenPositions,
    require_config,
)
from supergen.backbones.cogvideox import CogVideoXAdapter
from supergen.backbones.configs import component_class, read_folder_configs
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


def adapter_class_for(pipeline_class: str, transformer_class: str | None) -> type[BackboneAdapter]:
    """The adapter registered for a transformer class, if it serves this pipeline class."""
    adapter_cls = _REGISTRY.get(transformer_class)
    if adapter_cls is None or (adapter_cls.pipeline_classes and pipeline_class not in adapter_cls.pipeline_classes):
        raise ValueError(
            f"no SuperGen adapter for {pipeline_class} (transformer {transformer_class}); supported pipelines: "
            f"{', '.join(supported_pipelines())}"
        )
    return adapter_cls


def adapter_for(pipeline, native_size: tuple[int, int, int] | None = None) -> BackboneAdapter:
    """Wrap a loaded Diffusers pipeline in the adapter registered for its transformer class."""
    transformer = getattr(pipeline, "transformer", None)
    key = type(transformer).__name__ if transformer is not None else None
    adapter_cls = adapter_class_for(type(pipeline).__name__, key)
    return adapter_cls(pipeline, native_size=native_size)


def spec_from_folder(folder: str | os.PathLike, native_size: tuple[int, int, int] | None = None) -> ModelSpec:
    """A pipeline folder's :class:`ModelSpec` from its config files alone, without loading any model.

    Gives what :func:`adapter_for` on the loaded pipeline would (both go
    through the adapter's ``spec_from_configs``). ``native_size`` overrides
    the adapter's default, as it does when loading.
    """
    index_path = Path(folder) / "model_index.json"
    try:
        model_index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {index_path}: {err}") from None
    adapter_cls = adapter_class_for(str(model_index.get("_class_name")), component_class(model_index, "transformer"))
    return adapter_cls.spec_from_configs(read_folder_configs(folder), native_size)


__all__ = [
    "BackboneAdapter",
    "BackboneProfile",
    "Conditioning",
    "DecodeBand",
    "LatentGeometry",
    "ModelConfigs",
    "ModelSpec",
    "PipelineScheduler",
    "TokenPositions",
    "adapter_class_for",
    "adapter_for",
    "register_adapter",
    "read_folder_configs",
    "require_config",
    "spec_from_folder",
    "supported_pipelines",
]
