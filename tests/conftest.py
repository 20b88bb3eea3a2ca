"""Shared test helpers: the device list (CUDA skipped with a reason when absent), and `no_config`."""

from __future__ import annotations

import pytest
import torch

import attn_tune

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine"))]


@pytest.fixture
def no_config():
    """No tuned config in use for the test (an ATTN_TUNE_CONFIG in the environment included); restored after."""
    with attn_tune.use_config(None):
        yield
