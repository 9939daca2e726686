"""The import direction of the lower layers, read from their source.

``tiling`` < ``cache`` < ``parallel`` < ``samplers`` < the top package
(``supergen.config``, ``supergen.backbones``, ``supergen.pipeline``...): a
layer imports only itself and the layers below it, lazily inside a function
or not. And importing a lower layer does not load the pipeline.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ["tiling", "cache", "parallel", "samplers"]


def _supergen_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "supergen"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, f"relative import (level {node.level}) of {node.module!r}"))
            elif node.module and node.module.split(".")[0] == "supergen":
                found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_a_lower_layer_imports_only_itself_and_the_layers_below(layer):
    allowed = {f"supergen.{name}" for name in LAYERS[: LAYERS.index(layer) + 1]}
    files = sorted((REPO / layer).glob("*.py"))
    assert files
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in files
        for line, module in _supergen_imports(path)
        if ".".join(module.split(".")[:2]) not in allowed
    ]
    assert wrong == [], "\n".join(wrong)


def test_the_checker_sees_upward_and_lazy_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import torch\nfrom supergen.tiling.plan import Tile\n\ndef f():\n    from supergen.config import X\n")
    assert _supergen_imports(source) == [(2, "supergen.tiling.plan"), (5, "supergen.config")]


def test_importing_a_lower_layer_does_not_load_the_pipeline():
    code = (
        "import sys, supergen.tiling, supergen.cache, supergen.parallel, supergen.samplers.tiled, "
        "supergen.samplers.distributed, supergen.samplers.coherence, supergen.samplers.stream\n"
        "top = sorted(m for m in sys.modules if m.startswith('supergen.') and m.split('.')[1] not in "
        f"{LAYERS!r})\n"
        "print(top, 'diffusers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"], out.stdout
