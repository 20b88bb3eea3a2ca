"""Every exact variant against an independent float64 oracle, over causal x window x GQA x mask x lengths x dtypes."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import attn_tune
from attn_tune import InvalidProblem, Problem, UnsupportedProblem
from attn_tune.measurement import make_inputs
from tests.conftest import DEVICES, slow_cases
from tests.oracle import oracle, rel_error

EXACT = [v.name for v in attn_tune.variants() if v.exact]
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}
LENGTHS = [(1, 1), (1, 129), (7, 7), (129, 129), (7, 129), (129, 7)]


def _grid(device: str) -> list[Problem]:
    problems = []
    for causal, window, kv_heads, mask, (q_len, kv_len), dtype, head_dim in itertools.product(
        (False, True), (None, 3), (4, 2), (False, True, "padding"), LENGTHS, ("float32", "bfloat16"), (8, 80)
    ):
        if mask == "padding" and (dtype, head_dim) != ("float32", 8):
            continue  # padded batches (rows padded left and right) at one dtype and width: the rest is as above
        try:
            problems.append(
                Problem(
                    batch=2, heads=4, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                    dtype=dtype, device=device, causal=causal, window=window, mask=bool(mask),
                    key_padding=mask == "padding",
                )
            )
        except InvalidProblem:  # a window that leaves late queries with no key: tested in test_problem
            continue
    return problems


def _runnable(name: str, problem: Problem) -> attn_tune.Variant:
    """The variant, or a skip that says why it cannot run this problem here."""
    variant = attn_tune.get_variant(name)
    reason = attn_tune.availability(variant) or variant.supports(problem)
    if reason:
        pytest.skip(f"{name} cannot run {problem.describe()} here: {reason}")
    return variant


def _case_id(problem: Problem) -> str:
    return problem.describe().replace(" ", "-")


def _check(name: str, problem: Problem, seed: int, **params) -> str | None:
    """Compare the variant with the oracle on `problem`; None when it did, else why it was not (a refusal)."""
    variant = attn_tune.get_variant(name)
    unavailable = attn_tune.availability(variant)
    if unavailable:
        return f"unavailable here: {unavailable}"
    inputs = make_inputs(problem, seed)
    before = [t.clone() for t in (inputs.q, inputs.k, inputs.v)]
    reason = variant.supports(problem)
    try:
        out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)
    except UnsupportedProblem as exc:
        assert reason is not None, f"{name} raised UnsupportedProblem on a problem it claims to support: {exc}"
        return reason
    # Outside what it claims, a variant may still answer, but only correctly.
    for original, now in zip(before, (inputs.q, inputs.k, inputs.v)):
        assert torch.equal(original, now), f"{name} changed its inputs in place"
    assert out.shape == inputs.q.shape and out.dtype == inputs.q.dtype and out.device == inputs.q.device
    assert torch.isfinite(out).all()
    ref = oracle(inputs.q, inputs.k, inputs.v, causal=problem.causal, window=problem.window, mask=inputs.attn_mask)
    err = rel_error(out, ref)
    assert err < TOLERANCE[problem.dtype], f"{name}: rel error {err:.2e} on {problem.describe()}"
    return None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", slow_cases(EXACT, {"window-flex", "sdpa-flash"}))  # seconds to minutes on a CPU
def test_exact_variant_matches_float64_oracle(name: str, device: str) -> None:
    failures, refusals, checked = [], set(), 0
    grid = _grid(device)
    for i, problem in enumerate(grid):
        try:
            refusal = _check(name, problem, seed=i)
        except AssertionError as exc:
            failures.append(f"{_case_id(problem)}: {exc}")
            continue
        checked += refusal is None
        refusals.add(refusal)
    assert not failures, f"{len(failures)} failing problems:\n" + "\n".join(failures[:20])
    if not checked:
        pytest.skip(f"{name} computed none of the {len(grid)} {device} problems: {'; '.join(sorted(refusals - {None}))}")


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
@pytest.mark.parametrize("causal,window,mask", [(False, None, False), (True, None, True), (True, 4, False), (False, 6, True)])
def test_chunked_is_exact_for_any_chunk(chunk: int, causal: bool, window: int | None, mask: bool) -> None:
    problem = Problem(batch=1, heads=4, kv_heads=2, q_len=67, kv_len=70, head_dim=16, causal=causal, window=window, mask=mask)
    assert _check("chunked", problem, seed=chunk, chunk=chunk) is None, "chunked refused a problem it must compute"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize(
    "causal,window,kv_heads,mask,q_len,kv_len",
    [(False, None, 4, False, 33, 33), (True, None, 2, False, 33, 33), (True, 5, 2, True, 17, 40), (False, 4, 4, False, 20, 17),
     (True, None, 2, "padding", 33, 33)],
)
def test_exact_variant_gradients(name, device, causal, window, kv_heads, mask, q_len, kv_len) -> None:
    """training=True: backward runs, and gradients match the oracle's (a padded batch: rows left- and right-padded)."""
    problem = Problem(
        batch=2, heads=4, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=16, device=device,
        dtype="float32" if device == "cpu" else "bfloat16", causal=causal, window=window, mask=bool(mask),
        key_padding=mask == "padding", training=True,
    )
    variant = _runnable(name, problem)
    inputs = make_inputs(problem, seed=3)
    out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem))
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (inputs.q, inputs.k, inputs.v), grad_out)
    leaves = [t.detach().to("cpu", torch.float64).requires_grad_() for t in (inputs.q, inputs.k, inputs.v)]
    ref = oracle(*leaves, causal=causal, window=window, mask=inputs.attn_mask)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.to("cpu", torch.float64))
    tol = 1e-4 if problem.dtype == "float32" else 3e-2
    for label, got, want in zip("qkv", grads, ref_grads):
        assert got.shape == want.shape
        assert rel_error(got, want) < tol, f"d{label}: {rel_error(got, want):.2e}"


def test_every_exact_variant_is_checked_somewhere() -> None:
    """Each exact variant computes some problem of the grid: here, or (refusing only this device) on CUDA.

    A variant whose supports() refuses everything would otherwise be "tested" by a skip; one that refuses only
    because the CPU is not its device is checked where CUDA runs the suite (its cases skip here, saying so).
    """
    unchecked = []
    for name in EXACT:
        variant = attn_tune.get_variant(name)
        if any(variant.supports(p) is None for p in _grid("cpu")):
            continue
        if not any(variant.supports(dataclasses.replace(p, device="cuda")) is None for p in _grid("cpu")):
            unchecked.append(name)
    assert not unchecked, f"exact variants that support no problem of the grid on any device: {unchecked}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, 5)])
def test_explicit_masks_of_sdpa_shapes(name: str, device: str, causal: bool, window: int | None) -> None:
    """Masks as SDPA takes them: additive float (batch, 1, q, kv) and boolean (batch, heads, q, kv), with causal/window."""
    problem = Problem(batch=2, heads=4, kv_heads=2, q_len=37, kv_len=45, head_dim=16, device=device,
                      causal=causal, window=window, mask=True)
    variant = _runnable(name, problem)
    inputs = make_inputs(problem, seed=11)
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(2, 1, 37, 45, generator=gen).to(device)
    keep = torch.rand(2, 4, 37, 45, generator=gen) < 0.6
    keep[..., torch.arange(37), torch.arange(37)] = True  # every query keeps its diagonal key, visible under causal/window
    keep = keep.to(device)
    for float_mask, bool_mask in ((bias, None), (None, keep)):
        out = variant.fn(inputs.q, inputs.k, inputs.v, is_causal=causal, window=window, scale=0.3,
                         attn_mask=float_mask if float_mask is not None else bool_mask)
        ref = oracle(inputs.q, inputs.k, inputs.v, causal=causal, window=window, scale=0.3, bias=float_mask,
                     mask=None if bool_mask is None else bool_mask.cpu())
        assert rel_error(out, ref) < 1e-5, f"{'float' if float_mask is not None else 'bool'} mask: {rel_error(out, ref):.2e}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine these kernels run; the refusal is CPU-only")
@pytest.mark.parametrize("name,fragment", [("sdpa-cudnn", "CUDNN_ATTENTION cannot run this call"),
                                           ("sdpa-efficient", "EFFICIENT_ATTENTION cannot run this call"),
                                           ("xformers-mea", "xformers cannot run this call")])
def test_called_outside_support_raises_with_a_reason(name: str, fragment: str) -> None:
    """Called anyway on a problem it refuses, a variant raises UnsupportedProblem; it never returns garbage."""
    if name == "xformers-mea":
        pytest.importorskip("xformers", reason="xformers is not installed here")
    problem = Problem(batch=1, heads=2, q_len=16, head_dim=16, dtype="bfloat16")
    variant = attn_tune.get_variant(name)
    assert variant.supports(problem)  # it says so up front
    inputs = make_inputs(problem, seed=1)
    with pytest.raises(UnsupportedProblem, match=fragment) as info:
        variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem))
    assert "\n" not in str(info.value) and "Triggered internally" not in str(info.value)


def test_block_fully_visible_agrees_with_the_mask_it_skips() -> None:
    """A chunk is run without a mask only when every one of its keys is visible: the geometric test must agree with
    the mask it saves building, at every offset, causal or not, with and without a window."""
    from attn_tune.families.masks import block_fully_visible, visible_keys

    for rows, cols, shift, causal, window in itertools.product(
        (1, 3, 8), (1, 5, 8), range(-10, 11), (False, True), (None, 1, 4, 9)
    ):
        mask = visible_keys(rows, cols, causal=causal, window=window, device="cpu", q_offset=shift)
        expected = mask is None or bool(mask.all())
        got = block_fully_visible(rows, cols, causal=causal, window=window, shift=shift)
        assert got == expected, f"rows {rows} cols {cols} shift {shift} causal {causal} window {window}"
