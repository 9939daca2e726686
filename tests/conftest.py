import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# The tiny models do microseconds of math per op: on a shared 2-core machine extra
# intra-op threads only spin and wait (measured 2.5 ms -> 900 ms per tiny forward
# under load). SUPERGEN_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("SUPERGEN_TEST_THREADS", "1")))

# Built-in models are cached per test session in a private folder, so the suite
# never depends on (or pollutes) the user's ~/.cache/supergen.
os.environ.setdefault("SUPERGEN_CACHE", tempfile.mkdtemp(prefix="supergen-test-cache-"))


@pytest.fixture(scope="session")
def tiny():
    from supergen import SuperGenPipeline

    return SuperGenPipeline.from_pretrained("tiny")


@pytest.fixture(scope="module")
def load_script():
    """``load_script("bench_tiling")`` imports scripts/bench_tiling.py (scripts/ is no package) for one test module."""
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    loaded = []

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        # dataclasses resolve their module through sys.modules while the class is built.
        sys.modules[name] = module
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
