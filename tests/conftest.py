import os

import pytest

try:
    import torch

    HAS_GPU = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_GPU = False


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    seed = int(os.environ.get("RTXJIT_TEST_SEED", "0")) or None
    import numpy as np

    return np.random.default_rng(seed)
