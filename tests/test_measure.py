"""measure(): honest latency, peak memory above baseline, error against float64; independent of order."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attn_tune
from attn_tune import Problem, UnsupportedProblem
from attn_tune.families.dense import dense_attention
from attn_tune.measurement import exact_attention, make_inputs, measure, peak_bytes, reference_output, relative_error
from tests.conftest import DEVICES
from tests.oracle import oracle

FAST = dict(warmup=1, min_repeats=3, max_repeats=5, min_time_s=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_measurement_fields_are_sane(device: str) -> None:
    problem = Problem(batch=1, heads=4, q_len=128, head_dim=32, causal=True, device=device)
    m = measure(attn_tune.get_variant("dense"), problem, **FAST)
    assert m.latency_ms > 0 and m.latency_iqr_ms >= 0 and m.repeats >= 3
    scores = 4 * 128 * 128 * 4  # one float32 score matrix
    assert scores <= m.peak_bytes < 8 * scores
    assert 0 < m.rel_error < 1e-5


def test_peak_memory_follows_the_work() -> None:
    """dense holds the q_len x kv_len scores (4x per doubling); chunked holds chunk x kv_len of them."""
    dense, chunked = attn_tune.get_variant("dense"), attn_tune.get_variant("chunked")
    p256, p512 = (Problem(batch=1, heads=4, q_len=n, head_dim=32) for n in (256, 512))
    d256, d512 = (measure(dense, p, **FAST).peak_bytes for p in (p256, p512))
    assert 3.5 < d512 / d256 < 4.5
    c512 = measure(chunked, p512, {"chunk": 32}, **FAST).peak_bytes
    assert c512 < d512 / 3


def test_peak_memory_is_above_the_baseline_only() -> None:
    held = torch.randn(1024, 1024)  # live before the call: must not count

    def allocate() -> None:
        a = torch.empty(256, 1024)  # 1 MiB
        b = torch.empty(512, 1024)  # 2 MiB while a is alive
        del a, b

    assert peak_bytes(allocate, "cpu") == 3 * 2**20
    assert held.numel() == 2**20


@pytest.mark.slow
def test_same_figures_in_either_order() -> None:
    problem = Problem(batch=1, heads=4, q_len=256, head_dim=32, causal=True)
    a, b = attn_tune.get_variant("dense"), attn_tune.get_variant("chunked")
    kwargs = dict(warmup=2, min_repeats=7, max_repeats=15, min_time_s=0.05)
    a1, b1 = measure(a, problem, **kwargs), measure(b, problem, {"chunk": 64}, **kwargs)
    b2, a2 = measure(b, problem, {"chunk": 64}, **kwargs), measure(a, problem, **kwargs)
    assert (a1.peak_bytes, b1.peak_bytes) == (a2.peak_bytes, b2.peak_bytes)
    assert (a1.rel_error, b1.rel_error) == (a2.rel_error, b2.rel_error)
    # Latency in either order is a timing question for a noisy shared machine: bench/measurement_order.py
    # measures it (figures in docs/benchmarks.md); here only that each run timed what it was asked to.
    for m in (a1, b1, a2, b2):
        assert 7 <= m.repeats <= 15 and m.latency_ms > 0 and m.latency_iqr_ms >= 0


def test_training_measures_backward_too() -> None:
    problem = Problem(batch=1, heads=4, q_len=128, head_dim=32)
    dense = attn_tune.get_variant("dense")
    calls = {"forward": 0, "backward": 0}

    def counted(q, k, v, **kwargs):
        calls["forward"] += 1
        out = dense_attention(q, k, v, **kwargs)
        if out.requires_grad:
            out.register_hook(lambda grad: calls.__setitem__("backward", calls["backward"] + 1))
        return out

    forward = measure(dense, problem, **FAST)
    training_problem = Problem(**{**problem.to_dict(), "training": True})
    training = measure(dataclasses.replace(dense, fn=counted), training_problem, **FAST)
    assert training.peak_bytes > forward.peak_bytes  # the saved probabilities and the gradients
    # every call ran backward too: timed, warm-up and memory calls, and the error call (for dq, dk, dv)
    assert calls["backward"] == calls["forward"] and calls["backward"] >= training.repeats
    # the error is the worst of the output's (the same as forward-only) and the gradients'
    assert training.rel_error >= forward.rel_error and training.error_of in ("out", "dq", "dk", "dv")
    assert forward.error_of is None


def test_low_precision_error_is_measured_not_assumed() -> None:
    problem = Problem(batch=1, heads=2, q_len=64, head_dim=16, dtype="bfloat16", mask=True)
    m = measure(attn_tune.get_variant("sdpa"), problem, **FAST)
    assert 1e-4 < m.rel_error < 1e-2


def test_unsupported_or_unavailable_is_refused_with_the_reason() -> None:
    problem = Problem(batch=1, heads=2, q_len=16, head_dim=16)
    with pytest.raises(UnsupportedProblem, match="CUDA only"):
        if torch.cuda.is_available():
            problem = Problem(**{**problem.to_dict(), "device": "cpu"})
        measure(attn_tune.get_variant("sdpa-efficient"), problem, **FAST)
    with pytest.raises(UnsupportedProblem, match="flash_attn"):
        variant = attn_tune.get_variant("flash-attn")
        if attn_tune.availability(variant) is None:
            pytest.skip("flash_attn is installed here")
        measure(variant, problem, **FAST)


def test_profiler_noise_stays_off_the_terminal(capfd) -> None:
    measure(attn_tune.get_variant("sdpa"), Problem(batch=1, heads=2, q_len=32, head_dim=16, training=True), **FAST)
    captured = capfd.readouterr()
    assert "USDT" not in captured.err and "profiler" not in captured.err
    assert captured.out == ""


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_flash_kernel_holds_no_score_matrix(device: str) -> None:
    """The allocator (CUDA) or profiler (CPU) sees dense's q_len x kv_len scores and not flash's."""
    dtype = "float32" if device == "cpu" else "float16"
    problem = Problem(batch=1, heads=8, q_len=2048, head_dim=64, dtype=dtype, device=device)
    dense = measure(attn_tune.get_variant("dense"), problem, **FAST)
    flash = measure(attn_tune.get_variant("sdpa-flash"), problem, **FAST)
    scores = 8 * 2048 * 2048 * 4  # dense's float32 scores (CUDA flash may add split-KV accumulators, far less)
    assert dense.peak_bytes >= scores
    assert flash.peak_bytes < scores / 4


REFERENCE_CASES = [
    dict(q_len=40),
    dict(q_len=40, causal=True, kv_heads=2),
    dict(q_len=33, kv_len=57, causal=True, window=9),
    dict(q_len=57, kv_len=33, window=30),
    dict(q_len=48, mask=True, kv_heads=1),
    dict(q_len=300, causal=True),  # longer than one 256-query chunk of the reference
]


@pytest.mark.parametrize("fields", REFERENCE_CASES, ids=lambda f: Problem(batch=2, heads=4, head_dim=16, **f).describe())
def test_the_float64_reference_is_the_independent_oracle(fields: dict) -> None:
    """measure, the conformance kit and validate all measure error against `exact_attention` (through
    `reference_output` for seeded inputs): it must be the oracle's attention, written without attn_tune's code."""
    problem = Problem(batch=2, heads=4, head_dim=16, **fields)
    inputs = make_inputs(problem, seed=7)
    want = oracle(inputs.q, inputs.k, inputs.v, causal=problem.causal, window=problem.window, mask=inputs.attn_mask)
    assert torch.allclose(reference_output(problem, 7), want, rtol=0, atol=1e-12)
    bias = torch.randn(problem.q_len, problem.n_kv_len, dtype=torch.float64)  # an additive float mask, and a scale
    got = exact_attention(inputs.q, inputs.k, inputs.v, is_causal=problem.causal, window=problem.window,
                          attn_mask=bias.float(), scale=0.3)
    want = oracle(inputs.q, inputs.k, inputs.v, causal=problem.causal, window=problem.window, bias=bias.float(),
                  scale=0.3)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_relative_error_divides_by_the_references_norm() -> None:
    ref = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    assert relative_error(3 * ref, ref) == pytest.approx(2.0, rel=1e-12)  # by the output's norm it would be 2/3
    assert relative_error(ref.float(), ref) < 1e-7
    assert relative_error(torch.full_like(ref, float("nan")), ref) == float("inf")


def test_measure_reports_the_error_against_the_oracle() -> None:
    """An approximate variant's measured error is ||out - oracle|| / ||oracle|| on the seeded inputs."""
    problem = Problem(batch=1, heads=2, q_len=96, head_dim=16, causal=True)
    local = attn_tune.get_variant("local")
    measured = measure(local, problem, {"local_window": 8}, **FAST)
    inputs = make_inputs(problem, seed=0)
    out = local.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), local_window=8)
    want = oracle(inputs.q, inputs.k, inputs.v, causal=True)
    assert measured.rel_error == pytest.approx(float((out.double() - want).norm() / want.norm()), rel=1e-6)
    assert measured.rel_error > 0.01
