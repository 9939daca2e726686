import os
import tempfile

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
