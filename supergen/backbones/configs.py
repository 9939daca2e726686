"""A pipeline folder's configs, read from its JSON files without loading (or importing) any model."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from supergen.backbones.base import ModelConfigs


class FolderConfig(dict):
    """One ``config.json`` (or ``model_index.json``) as its Diffusers class would see it once loaded.

    A field the file leaves out takes the class's ``__init__`` default, as
    Diffusers' ``register_to_config`` fills it; the class is only imported
    when that happens, so complete configs (what ``save_pretrained`` writes)
    are read without importing Diffusers' model code. ``in`` still answers
    for the file alone: :func:`~supergen.backbones.require_config` must see a
    missing required field as missing.
    """

    def __init__(self, values: dict, class_name: str | None, where: str):
        super().__init__(values)
        self.class_name = class_name
        self.where = where

    def _default(self, key: str):
        """The class's ``__init__`` default for ``key``; ``inspect.Parameter.empty`` when it has none."""
        # Private keys (_name_or_path, _use_default_values...) are Diffusers' bookkeeping, not arguments.
        if key.startswith("_") or not self.class_name:
            return inspect.Parameter.empty
        import diffusers

        cls = getattr(diffusers, self.class_name, None)
        param = inspect.signature(cls.__init__).parameters.get(key) if cls is not None else None
        return inspect.Parameter.empty if param is None else param.default

    def __missing__(self, key: str):
        value = self._default(key)
        if value is inspect.Parameter.empty:
            raise ValueError(
                f"{self.where} has no {key!r} and {self.class_name} has no default for it; SuperGen needs it "
                "for this model: add it, or load a complete checkpoint"
            )
        return value

    def get(self, key: str, default=None):
        if key in self:
            return self[key]
        value = self._default(key)
        return default if value is inspect.Parameter.empty else value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the pipeline folder is incomplete") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def component_class(model_index: dict, component: str) -> str | None:
    """The class ``model_index.json`` names for a component (``["diffusers", "WanTransformer3DModel"]``)."""
    entry = model_index.get(component)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def read_folder_configs(folder: str | os.PathLike) -> ModelConfigs:
    """The pipeline, transformer and VAE configs of a ``save_pretrained`` folder, from its JSON files.

    Raises ``ValueError`` when a file the geometry needs is missing or unreadable.
    """
    folder = Path(folder)
    model_index = _read_json(folder / "model_index.json")
    pipeline_class = model_index.get("_class_name")
    configs = {}
    for component in ("transformer", "vae"):
        class_name = component_class(model_index, component)
        if class_name is None:
            raise ValueError(f"{folder / 'model_index.json'} names no {component}; SuperGen needs one")
        path = folder / component / "config.json"
        configs[component] = FolderConfig(_read_json(path), class_name, str(path))
    return ModelConfigs(
        pipeline_class=str(pipeline_class),
        pipeline=FolderConfig(model_index, pipeline_class, str(folder / "model_index.json")),
        transformer=configs["transformer"],
        vae=configs["vae"],
    )
