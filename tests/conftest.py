import os
import tempfile

import pytest

# Built-in models are cached per test session in a private folder, so the suite
# never depends on (or pollutes) the user's ~/.cache/supergen.
os.environ.setdefault("SUPERGEN_CACHE", tempfile.mkdtemp(prefix="supergen-test-cache-"))


@pytest.fixture(scope="session")
def tiny():
    from supergen import SuperGenPipeline

    return SuperGenPipeline.from_pretrained("tiny")
