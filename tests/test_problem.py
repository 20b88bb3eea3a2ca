"""Problem: validation with one-line reasons, round trip through JSON, device checks."""

from __future__ import annotations

import json

import pytest
import torch

from attn_tune import InvalidProblem, Problem, UnavailableDevice
from attn_tune.problem import check_device


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(batch=0), "batch must be positive"),
        (dict(q_len=-3), "q_len must be positive"),
        (dict(head_dim=2.5), "head_dim must be an integer"),
        (dict(heads=6, kv_heads=4), "multiple of kv_heads"),
        (dict(dtype="float8"), "unknown dtype"),
        (dict(device="tpu"), "unknown device"),
        (dict(causal="yes"), "causal must be true or false"),
        (dict(window=0), "window must be positive"),
        (dict(q_len=20, kv_len=10, window=10), "would see no key"),
    ],
)
def test_invalid_problems_say_why_in_one_line(kwargs, fragment) -> None:
    base = dict(batch=1, heads=4, q_len=16, head_dim=8)
    with pytest.raises(InvalidProblem) as info:
        Problem(**{**base, **kwargs})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_window_edge_is_valid_just_before_rows_go_empty() -> None:
    Problem(batch=1, heads=1, q_len=19, kv_len=10, head_dim=8, window=10)  # row 18 still sees key 9


def test_round_trip_through_json() -> None:
    p = Problem(batch=2, heads=8, kv_heads=2, q_len=100, kv_len=50, head_dim=64, dtype="bfloat16",
                causal=True, window=64, mask=True, training=True)
    back = Problem.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p and hash(back) == hash(p)
    assert (p.n_kv_len, p.n_kv_heads, p.torch_dtype) == (50, 2, torch.bfloat16)


def test_defaults_resolve_to_query_sizes() -> None:
    p = Problem(batch=1, heads=4, q_len=9, head_dim=8)
    assert p.n_kv_len == 9 and p.n_kv_heads == 4


@pytest.mark.parametrize("data,fragment", [({"batch": 1, "heads": 1, "q_len": 1, "head_dim": 8, "seq": 3}, "unknown problem field"),
                                           ({"batch": 1}, "incomplete problem"), ([1, 2], "JSON object")])
def test_from_dict_rejects_foreign_data(data, fragment) -> None:
    with pytest.raises(InvalidProblem, match=fragment):
        Problem.from_dict(data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the no-CUDA message cannot be shown")
def test_cuda_device_on_machine_without_cuda_is_refused() -> None:
    with pytest.raises(UnavailableDevice, match="no usable CUDA device"):
        check_device("cuda")


def test_cpu_is_always_there() -> None:
    check_device("cpu")
