import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def toy_data_root(tmp_path_factory):
    """One toy-domain cache for the whole session (generated once, ~10 s), unless one is given."""
    if not os.environ.get("PWDA_FAST_DATA"):
        os.environ["PWDA_FAST_DATA"] = str(tmp_path_factory.mktemp("pwda_data"))
    return os.environ["PWDA_FAST_DATA"]


@pytest.fixture(scope="module")
def batches(request):
    """Two (source, target) toy batches of 2 at the test module's BATCH_CROP (H, W), built once a module."""
    from helpers import toy_batches

    return toy_batches(request.module.BATCH_CROP)


@pytest.fixture
def one_thread():
    """One intra-op thread: on the 2 shared cores a second one only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
