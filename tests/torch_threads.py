"""A fixture for tests that train in the pytest process itself."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The 2 CPU cores are shared with parallel jobs, where OpenMP spin-waiting makes two
    torch threads ~20x slower than one for the tiny BERT; one thread, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
