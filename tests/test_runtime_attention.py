"""`attn_tune.attention` has SDPA's meaning for every argument, with or without a tuned config."""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import attn_tune
from attn_tune import InvalidProblem
from attn_tune.measurement.inputs import relative_error
from tests.oracle import oracle, rel_error
from tests.runtime_helpers import config, entry
from tests.jobs import job

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


pytestmark = pytest.mark.usefixtures("no_config")


def _inputs(batch=2, heads=4, kv_heads=4, q_len=24, kv_len=24, dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype)
    return q, k, v


def _mask(kind, batch, q_len, kv_len, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    keep = torch.rand(batch, 1, q_len, kv_len, generator=gen) < 0.7
    keep[..., 0] = True
    if kind == "bool":
        return keep
    if kind == "float":  # an additive (q_len, kv_len) mask, broadcast over batch and heads
        return torch.zeros(q_len, kv_len).masked_fill(~keep[0, 0], float("-inf")) + torch.randn(q_len, kv_len, generator=gen)
    raise ValueError(kind)


def _reference(q, k, v, mask, **kwargs):
    """SDPA in float64 on the same numbers."""
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask64, **kwargs)


COMBOS = list(itertools.product([False, True], [None, "bool", "float"], [None, 0.3], [1, 4], [24, 40],
                                [torch.float32, torch.bfloat16]))


@pytest.mark.parametrize("with_config", [False, True], ids=["no-config", "config-chunked"])
@pytest.mark.parametrize("causal,mask_kind,scale,kv_heads,kv_len,dtype", COMBOS)
def test_attention_equals_sdpa(causal, mask_kind, scale, kv_heads, kv_len, dtype, with_config) -> None:
    q, k, v = _inputs(kv_heads=kv_heads, kv_len=kv_len, dtype=dtype)
    mask = _mask(mask_kind, 2, 24, kv_len)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    call = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=kv_heads != 4)
    if with_config:
        problem = attn_tune.explain(q, k, v, **call).problem
        attn_tune.use_config(config([entry(problem, "chunked", {"chunk": 16})]))
        assert attn_tune.explain(q, k, v, **call).variant == "chunked"
    out = attn_tune.attention(q, k, v, **call)
    assert out.shape == q.shape and out.dtype == dtype
    reference = _reference(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=kv_heads != 4)
    assert relative_error(out, reference) <= TOL[dtype]


EXACT = [v.name for v in attn_tune.variants() if v.exact]


@pytest.mark.parametrize("variant", EXACT)
def test_rows_without_keys_are_zero_as_in_sdpa(variant) -> None:
    """A query whose mask hides every key gets zeros (SDPA's answer), not NaN, whichever exact variant runs;
    with a window for the window variants. Its gradient is finite too where the variant trains here."""
    q, k, v = _inputs(batch=1, heads=2, kv_heads=2)
    mask = torch.ones(1, 1, 24, 24, dtype=torch.bool)
    mask[..., 3, :] = False
    chosen = attn_tune.get_variant(variant)
    refusals = []
    for window in (None, 12):
        problem = attn_tune.explain(q, k, v, attn_mask=mask, window=window).problem
        refusal = attn_tune.availability(chosen) or chosen.supports(problem)
        if refusal is None:
            break
        refusals.append(refusal)
    else:
        pytest.skip(f"{variant} cannot run a masked problem here: {'; '.join(dict.fromkeys(refusals))}")
    params = {"chunk": 8} if variant == "chunked" else {"block": 8} if variant == "window-chunked" else {}
    training = chosen.supports(dataclasses.replace(problem, training=True)) is None
    with attn_tune.use_config(config([entry(dataclasses.replace(problem, training=training), variant, params)])):
        qg = q.clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            assert attn_tune.explain(qg, k, v, attn_mask=mask, window=window).variant == variant
            out = attn_tune.attention(qg, k, v, attn_mask=mask, window=window)
        if training:
            out.sum().backward()
            assert torch.isfinite(qg.grad).all()
    assert torch.equal(out[..., 3, :], torch.zeros_like(out[..., 3, :]))
    ref, rows = oracle(q, k, v, window=window, mask=mask[0, 0]), torch.arange(24) != 3  # the oracle's row 3 is NaN
    assert rel_error(out[..., rows, :], ref[..., rows, :]) <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_window_matches_an_sdpa_band_mask(causal) -> None:
    q, k, v = _inputs(kv_len=30)
    i, j = torch.arange(24)[:, None], torch.arange(30)[None, :]
    band = ((i - j).abs() < 5) & ((i >= j) if causal else True)
    out = attn_tune.attention(q, k, v, is_causal=causal, window=5)
    assert relative_error(out, _reference(q, k, v, band)) <= 1e-5


def test_three_dimensional_inputs_as_sdpa() -> None:
    """(batch, len, dim) inputs, as SDPA takes them, with a (batch, q_len, kv_len) mask."""
    q, k, v = (t[:, 0] for t in _inputs(kv_len=20))
    mask = _mask("bool", 2, 24, 20)[:, 0]
    out = attn_tune.attention(q, k, v, attn_mask=mask, is_causal=False)
    assert out.shape == q.shape
    assert relative_error(out, _reference(q, k, v, mask)) <= 1e-5
    assert attn_tune.explain(q, k, v, attn_mask=mask).problem.heads == 1


def test_calls_no_problem_describes_go_to_sdpa_as_is() -> None:
    q, k, v = (t.double() for t in _inputs())
    out = attn_tune.attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    decision = attn_tune.explain(q, k, v, is_causal=True)
    assert decision.rule == "sdpa-as-is" and "float64" in decision.reason


@pytest.mark.parametrize("shape", ["5-D", "value-head-dim"])
def test_calls_sdpa_takes_but_no_problem_describes_reach_sdpa_unchanged(shape) -> None:
    """5-D inputs and a value head_dim unlike the query's: SDPA's answer, bit for bit, via the as-is rule."""
    gen = torch.Generator().manual_seed(4)
    if shape == "5-D":
        q, k, v = (torch.randn(2, 3, 2, 10, 8, generator=gen) for _ in range(3))
    else:
        q, k, v = torch.randn(2, 2, 10, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen), \
            torch.randn(2, 2, 12, 24, generator=gen)
    with attn_tune.use_config(config([entry(attn_tune.Problem(batch=2, heads=2, q_len=10, head_dim=8), "dense")])):
        decision = attn_tune.explain(q, k, v, is_causal=True)
        out = attn_tune.attention(q, k, v, is_causal=True)
    assert decision.rule == "sdpa-as-is" and decision.problem is None
    assert ("not 3-D or 4-D" if shape == "5-D" else "head_dim differs") in decision.reason
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_dropout_runs_sdpa_with_dropout() -> None:
    q, k, v = _inputs()
    torch.manual_seed(3)
    out = attn_tune.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v))
    assert "dropout" in attn_tune.explain(q, k, v, dropout_p=0.5).reason


def test_positional_arguments_in_sdpas_order() -> None:
    q, k, v = _inputs()
    mask = _mask("bool", 2, 24, 24)
    torch.testing.assert_close(attn_tune.attention(q, k, v, mask, 0.0, True, scale=0.5),
                               F.scaled_dot_product_attention(q, k, v, mask, 0.0, True, scale=0.5))
    with pytest.raises(TypeError):
        attn_tune.attention(q, k, v, mask, 0.0, True, 0.5)  # scale is keyword-only, as in SDPA


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (*_inputs(kv_heads=2)[:1], *_inputs(kv_heads=2)[1:]), "pass enable_gqa=True"),
        (lambda: (_inputs()[0], _inputs()[1].double(), _inputs()[2]), "share a dtype"),
        (lambda: (_inputs(heads=6, kv_heads=4)), "multiple of kv_heads"),
    ],
    ids=["gqa-without-flag", "mixed-dtypes", "heads-not-divisible"],
)
def test_bad_calls_raise_one_line(make, message) -> None:
    q, k, v = make()
    with pytest.raises(InvalidProblem, match=message) as info:
        attn_tune.attention(q, k, v, enable_gqa="heads-not" in message or "multiple" in message)
    assert "\n" not in str(info.value)


def test_window_that_leaves_queries_without_keys_is_invalid() -> None:
    q, k, v = _inputs(q_len=24, kv_len=8)
    with pytest.raises(InvalidProblem, match="would see no key"):
        attn_tune.attention(q, k, v, window=4)


def test_training_calls_are_training_problems_and_backprop() -> None:
    q, k, v = (t.requires_grad_() for t in _inputs())
    assert attn_tune.explain(q, k, v).problem.training
    with torch.no_grad():
        assert not attn_tune.explain(q, k, v).problem.training
    attn_tune.attention(q, k, v, is_causal=True).square().sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q2, k2, v2, is_causal=True).square().sum().backward()
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert relative_error(got, want) <= 1e-5


@pytest.mark.slow
def test_a_tuned_approximate_choice_stays_within_its_tolerance(tmp_path) -> None:
    """A real tune with --max-error lets `local` win at q_len 512; the runtime then answers within that tolerance."""
    problem = attn_tune.Problem(batch=1, heads=2, q_len=512, head_dim=32)
    tuned = attn_tune.tune([problem], job(trials=4, max_error=1.5, storage=f"sqlite:///{tmp_path}/t.db", seed=0, variants=[attn_tune.get_variant("sdpa"), attn_tune.get_variant("local")]))
    chosen = tuned.entries[0]
    attn_tune.use_config(tuned)
    q, k, v = _inputs(batch=1, heads=2, kv_heads=2, q_len=512, kv_len=512, dim=32, seed=7)  # fresh numbers
    decision = attn_tune.explain(q, k, v)
    assert decision.variant == chosen.choice["variant"] and decision.rule == "own-entry"
    error = relative_error(attn_tune.attention(q, k, v), _reference(q, k, v, None))
    assert error <= chosen.max_error == 1.5
    if chosen.choice["variant"] == "local":
        assert error > 1e-3  # it is an approximation, and the runtime really ran it
    # At a length it was not measured at, the approximate choice is not transferred: an exact variant runs.
    q, k, v = _inputs(batch=1, heads=2, kv_heads=2, q_len=600, kv_len=600, dim=32)
    assert attn_tune.explain(q, k, v).variant == "sdpa"
    assert relative_error(attn_tune.attention(q, k, v), _reference(q, k, v, None)) <= 1e-5


def test_the_runtime_with_a_config_imports_nothing_from_the_tuner(tmp_path) -> None:
    """A config read at import (ATTN_TUNE_CONFIG), a tuned call, explain: no attn_tune.tuner module is loaded."""
    path = tmp_path / "tuned.json"
    config([entry(attn_tune.Problem(batch=1, heads=2, q_len=8, head_dim=4, causal=True), "chunked", {"chunk": 4})]).save(path)
    code = (
        "import sys, torch, attn_tune\n"
        "q = torch.randn(1, 2, 8, 4)\n"
        "attn_tune.attention(q, q, q, is_causal=True)\n"
        "assert attn_tune.explain(q, q, q, is_causal=True).variant == 'chunked'\n"
        "print(sorted(m for m in sys.modules if m.startswith('attn_tune.tuner') or m == 'optuna'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATTN_TUNE_CONFIG": str(path)})
    assert out.stdout.strip() == "[]"


def test_runtime_path_imports_no_optuna_click_or_kernels() -> None:
    code = (
        "import sys, torch, attn_tune\n"
        "q = torch.randn(1, 2, 8, 4)\n"
        "attn_tune.attention(q, q, q, is_causal=True, window=3)\n"
        "layer = attn_tune.AutoAttention(8, 2, rope=True)\n"
        "layer(torch.randn(1, 5, 8))\n"
        "print(sorted(m for m in ('optuna', 'click', 'xformers', 'flash_attn', 'linformer_pytorch', 'transformers')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
