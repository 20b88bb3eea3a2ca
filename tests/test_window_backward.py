"""Gradients of the windowed variants and `chunked` (SDPA's own backward per piece, `blockwise_grad`) against float64
autograd through the independent oracle, for every knob in each variant's search space, on fresh random inputs."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import attn_tune
from attn_tune import Problem
from attn_tune.families import windowed
from tests.oracle import oracle, rel_error

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> bool:
    """Relative error under `tolerance`; a gradient that is exactly zero (window 1: dq) is measured against 1."""
    return (got.detach().to(torch.float64) - want).norm().item() <= tolerance * max(want.norm().item(), 1.0)


def _leaves(problem: Problem, dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(problem.batch, problem.heads, problem.q_len, problem.head_dim)] + 2 * [
        (problem.batch, problem.n_kv_heads, problem.n_kv_len, problem.head_dim)]
    leaves = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    return leaves, torch.randn(*shapes[0], generator=g, dtype=torch.float64).to(dtype)


def _knobs(variant: attn_tune.Variant, problem: Problem) -> list[dict]:
    """Every point of the variant's search space for `problem`."""
    space = variant.space(problem)
    return [dict(zip(space, values)) for values in itertools.product(*(d.choices for d in space.values()))]


def _check_gradients(name: str, problem: Problem, dtype: torch.dtype, reference_window: int | None,
                     knobs: dict, seed: int) -> None:
    leaves, grad_out = _leaves(problem, dtype, seed)
    kwargs = dict(is_causal=problem.causal, window=problem.window, attn_mask=None, scale=None)
    out = attn_tune.get_variant(name).fn(*leaves, **kwargs, **knobs)
    got = torch.autograd.grad(out, leaves, grad_out)
    exact = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    want_out = oracle(*exact, causal=problem.causal, window=reference_window)
    want = torch.autograd.grad(want_out, exact, grad_out.to(torch.float64))
    assert rel_error(out, want_out) < TOLERANCE[dtype]
    for which, a, b in zip("qkv", got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.isfinite(a).all(), which
        assert _close(a, b, TOLERANCE[dtype]), (which, rel_error(a, b))


WINDOW_PROBLEMS = {
    # 150 is no multiple of any block; GQA; a batch of two
    "causal": Problem(batch=2, heads=4, kv_heads=2, q_len=150, head_dim=8, causal=True, window=40),
    "both-sides": Problem(batch=2, heads=4, kv_heads=2, q_len=150, head_dim=8, window=40),
    "cross": Problem(batch=2, heads=2, q_len=120, kv_len=150, head_dim=8, window=40),
    "causal-cross": Problem(batch=1, heads=2, kv_heads=1, q_len=90, kv_len=150, head_dim=8, causal=True, window=40),
    "window-1": Problem(batch=1, heads=2, q_len=70, head_dim=8, causal=True, window=1),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(WINDOW_PROBLEMS))
def test_window_chunked_gradients_at_every_knob(case, dtype) -> None:
    problem = WINDOW_PROBLEMS[case]
    variant = attn_tune.get_variant("window-chunked")
    for i, knobs in enumerate(_knobs(variant, problem)):
        _check_gradients("window-chunked", problem, dtype, problem.window, knobs, seed=i)


def test_window_chunked_gradients_with_wide_blocks() -> None:
    """Blocks of 256 and 512 (the space's widest), unfolded and looped, past both ends of a long causal window."""
    problem = Problem(batch=1, heads=2, kv_heads=1, q_len=1100, head_dim=8, causal=True, window=300)
    for i, (block, unfolded) in enumerate(itertools.product((256, 512), (False, True))):
        _check_gradients("window-chunked", problem, torch.float32, 300, dict(block=block, unfolded=unfolded), i)


LOCAL_PROBLEMS = {  # local computes the window `local_window` (with the problem's causal cut): its own function
    "causal-full": Problem(batch=2, heads=4, kv_heads=2, q_len=150, head_dim=8, causal=True),
    "causal-window": Problem(batch=1, heads=2, q_len=150, head_dim=8, causal=True, window=100),
    "both-sides": Problem(batch=2, heads=2, q_len=100, head_dim=8),
    "cross": Problem(batch=1, heads=2, q_len=100, kv_len=130, head_dim=8),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(LOCAL_PROBLEMS))
def test_local_gradients_are_those_of_its_narrower_window(case, dtype) -> None:
    problem = LOCAL_PROBLEMS[case]
    variant = attn_tune.get_variant("local")
    for i, knobs in enumerate(_knobs(variant, problem)):
        _check_gradients("local", problem, dtype, knobs["local_window"], knobs, seed=i)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_gradients_with_masks_and_gqa(kind, causal) -> None:
    """An explicit mask (kept rows or an additive bias), kv_len != q_len, GQA, chunks that do not divide q_len."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 100, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 130, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keep = torch.rand(100, 130, generator=g) < 0.7
    keep[torch.arange(100), torch.arange(100)] = True  # every row keeps a key it may see
    bias = torch.randn(100, 130, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, 4, 100, 8, generator=g, dtype=torch.float64)
    chunked = attn_tune.get_variant("chunked").fn
    for chunk, scale in ((32, None), (64, 0.4), (100, None)):
        mask = dict(mask=keep) if kind == "bool" else dict(bias=bias)
        want = torch.autograd.grad(oracle(q, k, v, causal=causal, scale=scale, **mask), (q, k, v), grad_out)
        out = chunked(q, k, v, is_causal=causal, window=None, attn_mask=keep if kind == "bool" else bias,
                      scale=scale, chunk=chunk)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad_out), want):
            assert _close(a, b, 1e-10)


@pytest.mark.parametrize("name, knobs", [("window-chunked", dict(unfolded=True)),
                                         ("window-chunked", dict(unfolded=False))])
@pytest.mark.parametrize("wanted", ["q", "kv", "v"])
def test_only_the_wanted_gradients(name, knobs, wanted) -> None:
    """Inputs that need no gradient get none (and are not differentiated); the others are unchanged."""
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(1, 2, 80, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    leaves = [t.requires_grad_(n in wanted) for t, n in zip(tensors, "qkv")]
    out = attn_tune.get_variant(name).fn(*leaves, is_causal=True, window=20, attn_mask=None, scale=None,
                                         block=32, **knobs)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out)
    exact = [t.detach().requires_grad_() for t in tensors]
    want = torch.autograd.grad(oracle(*exact, causal=True, window=20), exact, grad_out)
    assert len(got) == len(wanted)
    for a, b in zip(got, [w for w, n in zip(want, "qkv") if n in wanted]):
        assert _close(a, b, 1e-10)


@pytest.mark.parametrize("unfolded", [False, True])
def test_a_retained_graph_backs_up_twice_and_a_freed_one_refuses(unfolded) -> None:
    g = torch.Generator().manual_seed(6)
    leaves = [torch.randn(2, 2, 70, 8, generator=g, requires_grad=True) for _ in range(3)]
    out = attn_tune.get_variant("window-chunked").fn(*leaves, is_causal=False, window=9, attn_mask=None, scale=None,
                                                     block=16, unfolded=unfolded)
    first = torch.autograd.grad(out.square().sum(), leaves, retain_graph=True)
    second = torch.autograd.grad(out.square().sum(), leaves)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out.square().sum(), leaves)


@pytest.mark.parametrize("unfolded", [False, True])
def test_the_training_forward_is_the_inference_forward(unfolded) -> None:
    """Same SDPA calls on the same views with or without a gradient wanted: the same output, bit for bit."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 4, 130, 16, generator=g) for _ in range(3))
    fn = attn_tune.get_variant("local").fn
    kwargs = dict(is_causal=True, window=None, attn_mask=None, scale=None, local_window=32, block=32,
                  unfolded=unfolded)
    with torch.no_grad():
        inference = fn(q, k, v, **kwargs)
    training = fn(q.requires_grad_(), k, v, **kwargs)
    assert training.requires_grad and torch.equal(training.detach(), inference)


def test_gradients_in_the_module_layout_come_back_in_it() -> None:
    """q, k, v as views of one (batch, length, heads) projection: the gradient reaches the projection."""
    g = torch.Generator().manual_seed(9)
    projected = torch.randn(2, 150, 4 + 2 + 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = (x.transpose(1, 2) for x in projected.split([4, 2, 2], dim=2))
    out = attn_tune.get_variant("window-chunked").fn(q, k, v, is_causal=True, window=50, attn_mask=None, scale=None,
                                                     block=32, unfolded=True)
    (got,) = torch.autograd.grad(out.transpose(1, 2).square().sum(), projected)
    leaf = projected.detach().requires_grad_()
    eq, ek, ev = (x.transpose(1, 2) for x in leaf.split([4, 2, 2], dim=2))
    (want,) = torch.autograd.grad(oracle(eq, ek, ev, causal=True, window=50).transpose(1, 2).square().sum(), leaf)
    assert _close(got, want, 1e-10)


@pytest.mark.parametrize("calls", ["one-block-per-call", "shared-interior-mask"])
def test_unfolded_gradients_over_many_calls(calls, monkeypatch) -> None:
    """With a backward the blocks go in calls of bounded gradient size, each fold starting where the next ends;
    long sequences' interior blocks share one mask. Both against float64, with a padded last block and GQA."""
    monkeypatch.setattr(windowed, "_BACKWARD_CALL_BYTES" if calls == "one-block-per-call" else "_CACHED_MASK_BYTES", 0)
    for i, (causal, block) in enumerate(itertools.product((True, False), (16, 32))):
        problem = Problem(batch=2, heads=4, kv_heads=2, q_len=150, head_dim=8, causal=causal, window=40)
        _check_gradients("window-chunked", problem, torch.float64, 40, dict(block=block, unfolded=True), seed=i)


@pytest.mark.parametrize("unfolded", [False, True])
def test_one_tensor_as_q_k_and_v(unfolded) -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 2, 90, 8, generator=g, dtype=torch.float64, requires_grad=True)
    out = attn_tune.get_variant("window-chunked").fn(x, x, x, is_causal=True, window=30, attn_mask=None, scale=None,
                                                     block=32, unfolded=unfolded)
    (got,) = torch.autograd.grad(out.square().sum(), x)
    leaf = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(oracle(leaf, leaf, leaf, causal=True, window=30).square().sum(), leaf)
    assert _close(got, want, 1e-10)


@pytest.mark.parametrize("unfolded", [False, True])
def test_under_activation_checkpointing(unfolded) -> None:
    """torch.utils.checkpoint (recomputing the forward in backward) gives the same gradients."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 120, 32, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(32, 3 * 32, generator=g, dtype=torch.float64) / 6

    def layer(x: torch.Tensor, attention) -> torch.Tensor:
        q, k, v = ((x @ weight).view(2, 120, 3, 4, 8)[:, :, i].transpose(1, 2) for i in range(3))
        return attention(q, k, v).transpose(1, 2).reshape(2, 120, 32).tanh()

    fn = attn_tune.get_variant("local").fn
    local = functools.partial(fn, is_causal=True, window=None, attn_mask=None, scale=None, local_window=25,
                              block=16, unfolded=unfolded)
    (got,) = torch.autograd.grad(checkpoint(layer, x, local, use_reentrant=False).sum(), x)
    (want,) = torch.autograd.grad(layer(x, lambda q, k, v: oracle(q, k, v, causal=True, window=25)).sum(), x)
    assert _close(got, want, 1e-10)
