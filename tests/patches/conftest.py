"""Patch tests run forwards of tiny models, where a second torch thread costs more than it gains (thread start-up
dominates: about 4x slower on 2 busy cores); each module here runs on one thread and restores the setting after."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
