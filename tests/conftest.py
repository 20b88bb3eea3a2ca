"""Shared test helpers: the device list (CUDA skipped with a reason when absent), `slow_cases`, and `no_config`."""

from __future__ import annotations

import pytest
import torch

import attn_tune

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine"))]


def slow_cases(values: list, slow: set[str]) -> list:
    """`values` for parametrize with those named in `slow` marked `slow` (`make test` runs them, `make test-fast`
    does not). A value's name is itself (a str), its `.name` (a Variant), or its first item (a tuple of arguments)."""
    def name(value):
        return value if isinstance(value, str) else value[0] if isinstance(value, tuple) else value.name

    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow) if name(v) in slow else v
            for v in values]


@pytest.fixture
def no_config():
    """No tuned config in use for the test (an ATTN_TUNE_CONFIG in the environment included); restored after."""
    with attn_tune.use_config(None):
        yield
