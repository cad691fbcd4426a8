import pytest
import torch


@pytest.fixture()
def one_thread():
    """Run a test on one torch thread: tensors this small gain nothing from threads, and on a
    shared 2-core machine a second OpenMP thread spinning against other jobs makes each step
    many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
