"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest
import torch

from roadseg_utils.labels import idd_label_set
from roadseg_utils.modeling import load_model

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


@pytest.fixture(scope="session")
def sharpened_tiny_model() -> torch.nn.Module:
    """A tiny level-3 model whose mask and class heads are sharpened, so its label maps vary over pixels and classes.

    An untrained tiny model predicts a single class everywhere, which would make scoring checks trivial.
    """
    torch.manual_seed(0)
    model = load_model("tiny", idd_label_set(3))
    with torch.no_grad():
        model.class_predictor.weight.mul_(40)
        for parameter in model.model.transformer_module.decoder.mask_predictor.mask_embedder.parameters():
            parameter.mul_(10)
    return model.eval()
