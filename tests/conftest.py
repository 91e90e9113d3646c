"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest
import torch

# The end-to-end pass on the lowest admitted versions runs in its own venv (`make test-compat`), not in `make test`.
collect_ignore = [] if os.environ.get("ROADSEG_COMPAT") else ["compat"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run torch on one thread for a module: two intra-op threads spin against each other on a busy 2-core CPU
    (one tiny-model step goes from ~0.3 s to several seconds), and the tiny model gains nothing from them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
