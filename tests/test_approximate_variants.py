"""The approximate families: each equals its own pattern's exact attention, its error against the full problem is
measured (> 0, finite), memory grows with the work really done, and training works or is refused with a reason."""

from __future__ import annotations

import math

import pytest
import torch

import attn_tune
from attn_tune import Problem, UnsupportedProblem
from attn_tune.families.blocksparse import BlockPattern
from attn_tune.families.linformer import linformer_projections
from attn_tune.measurement import make_inputs, measure
from tests.conftest import slow_cases
from tests.oracle import oracle, rel_error
from tests.jobs import job

APPROXIMATE = [v.name for v in attn_tune.variants() if not v.exact]
BLOCK_PATTERN = ["blocksparse", "flex-blocksparse", "xformers-blocksparse"]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def _variant(name: str, problem: Problem | None = None) -> attn_tune.Variant:
    """The variant, or a skip saying why it cannot run here (only for kernels this install lacks). Every problem a
    test gives is one the variant claims: refusing it is a failure, never a skip."""
    variant = attn_tune.get_variant(name)
    reason = attn_tune.availability(variant)
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")
    refusal = problem is not None and variant.supports(problem)
    assert not refusal, f"{name} refuses {problem.describe()}, a problem of its family it is tested on: {refusal}"
    return variant


def _linformer_pytorch_projections(kv_len: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E and F drawn by linformer-pytorch itself (parameter-free, seed 0), in float64: not through attn-tune."""
    from linformer_pytorch.linformer_pytorch import get_EF

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_EF(kv_len, rank, method="no_params").double(), get_EF(kv_len, rank, method="no_params").double()


def pattern_reference(name: str, problem: Problem, q, k, v, params: dict) -> torch.Tensor:
    """The exact function an approximate variant claims to compute, written independently in float64."""
    if name == "local":
        return oracle(q, k, v, causal=problem.causal, window=params["local_window"])
    if name in BLOCK_PATTERN:
        keep = BlockPattern(**params).mask(problem.q_len, problem.n_kv_len, problem.causal)
        return oracle(q, k, v, mask=keep)  # the pattern's mask already holds the causal cut
    if name == "linformer":
        e, f = _linformer_pytorch_projections(problem.n_kv_len, params["rank"])
        q64, k64, v64 = (t.to("cpu", torch.float64) for t in (q, k, v))
        group = problem.heads // problem.n_kv_heads
        k64, v64 = k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1)
        scores = (q64 / math.sqrt(problem.head_dim)) @ (e.T @ k64).transpose(-1, -2)  # (b, h, q_len, rank)
        return torch.softmax(scores, dim=-1) @ (f.T @ v64)
    raise AssertionError(f"no pattern reference for {name}: add one here")


CASES = [
    # name, problem fields, params
    ("local", dict(q_len=150, causal=False), {"local_window": 16}),
    ("local", dict(q_len=150, causal=True, kv_heads=2), {"local_window": 40}),
    ("local", dict(q_len=90, kv_len=140, causal=True, window=64), {"local_window": 16}),
    ("local", dict(q_len=140, kv_len=90, causal=False), {"local_window": 64}),
    ("linformer", dict(q_len=100, kv_len=160), {"rank": 32}),
    ("linformer", dict(q_len=160, kv_len=100, kv_heads=2), {"rank": 64}),
]
for _name in BLOCK_PATTERN:
    CASES += [
        (_name, dict(q_len=200, causal=False), {"block": 32, "window_blocks": 1, "global_blocks": 1, "random_blocks": 2}),
        (_name, dict(q_len=200, causal=True, kv_heads=2), {"block": 16, "window_blocks": 0, "global_blocks": 2, "random_blocks": 1}),
        (_name, dict(q_len=130, kv_len=300, causal=True), {"block": 32, "window_blocks": 2, "global_blocks": 1, "random_blocks": 0}),
        (_name, dict(q_len=300, kv_len=130, causal=False), {"block": 64, "window_blocks": 0, "global_blocks": 1, "random_blocks": 3}),
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,fields,params", slow_cases(CASES, {"flex-blocksparse"}), ids=lambda x: x if isinstance(x, str) else None)
def test_approximate_variant_equals_its_own_pattern(name: str, fields: dict, params: dict, dtype: str) -> None:
    problem = Problem(batch=2, heads=4, head_dim=32, dtype=dtype, **fields)
    variant = _variant(name, problem)
    inputs = make_inputs(problem, seed=len(name) + problem.q_len)
    before = [t.clone() for t in (inputs.q, inputs.k, inputs.v)]
    out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)
    assert all(torch.equal(a, b) for a, b in zip(before, (inputs.q, inputs.k, inputs.v))), "inputs changed in place"
    assert out.shape == inputs.q.shape and out.dtype == inputs.q.dtype
    again = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)
    assert torch.equal(out, again), "two calls on the same inputs differ: the pattern is not fixed"
    err = rel_error(out, pattern_reference(name, problem, inputs.q, inputs.k, inputs.v, params))
    assert err < TOLERANCE[dtype], f"{name} {params}: {err:.2e} from its own pattern"


@pytest.mark.parametrize("name", APPROXIMATE)
def test_every_approximate_variant_has_pattern_cases(name: str) -> None:
    assert name in {case[0] for case in CASES}, f"{name} is approximate but has no pattern test case"


@pytest.mark.parametrize("name", slow_cases(APPROXIMATE, {"flex-blocksparse"}))
def test_error_against_full_attention_is_measured(name: str) -> None:
    problem = Problem(batch=1, heads=2, q_len=512, head_dim=32)  # longer than every default window or rank
    variant = _variant(name, problem)
    m = measure(variant, problem, min_repeats=2, min_time_s=0.0)
    assert math.isfinite(m.rel_error) and m.rel_error > 1e-3, f"{name}: rel_error {m.rel_error}"
    assert m.first_call_ms > 0 and m.latency_ms > 0


@pytest.mark.parametrize(
    "name,fields",
    [("window-chunked", {"window": 64}), ("blocksparse", {}), ("linformer", {}), ("xformers-blocksparse", {}),
     ("dense", {})],
)
def test_peak_memory_per_doubling(name: str, fields: dict) -> None:
    """From q_len N to 2N, the structured variants' peak grows about 2x; dense attention's about 4x."""
    peaks = []
    for q_len in (1024, 2048):
        problem = Problem(batch=1, heads=4, q_len=q_len, head_dim=32, **fields)
        peaks.append(measure(_variant(name, problem), problem, min_repeats=1, min_time_s=0.0).peak_bytes)
    growth = peaks[1] / peaks[0]
    if name == "dense":
        assert growth > 3.5, f"dense grew only {growth:.2f}x"
    else:
        assert growth <= 2.3, f"{name} grew {growth:.2f}x per doubling ({peaks[0]} -> {peaks[1]} bytes)"


@pytest.mark.parametrize("name", slow_cases(BLOCK_PATTERN, {"flex-blocksparse"}))
def test_sparse_path_is_really_sparse(name: str) -> None:
    """At ~10% block density the peak is under a third of dense attention's, and only the pattern's blocks are
    computed: `blocksparse` gathers exactly the kept key blocks of each query block (falling with the density) and
    holds at most one K's size beyond its output (its groups are sized by the keys they gather); FlexAttention's
    block mask visits exactly the pattern's blocks, and its fused kernel holds no scores at all."""
    problem = Problem(batch=1, heads=4, q_len=2048, head_dim=32)
    variant = _variant(name, problem)
    dense_peak = measure(attn_tune.get_variant("dense"), problem, min_repeats=1, min_time_s=0.0).peak_bytes
    output_bytes = k_bytes = 2048 * 4 * 32 * 4
    peaks, densities, gathered = [], [], []
    for random_blocks in (6, 2, 0):
        params = {"block": 32, "window_blocks": 1, "global_blocks": 1, "random_blocks": random_blocks}
        pattern = BlockPattern(**params)
        layout = pattern.layout(2048, 2048, causal=False)
        densities.append(layout.float().mean().item())
        peaks.append(measure(variant, problem, params, min_repeats=1, min_time_s=0.0).peak_bytes)
        if name == "blocksparse":
            from attn_tune.families.blocksparse import _gather_plan

            key_pos, keep = _gather_plan(pattern, 2048, 2048, False, torch.device("cpu"))
            assert keep.sum() == layout.sum() * 32 * 32, "the keep-mask is not exactly the kept blocks"
            assert key_pos.shape[1] == layout.sum(dim=1).max() * 32, "gathers more than the widest row's blocks"
            gathered.append(key_pos.numel())
        elif name == "flex-blocksparse":
            from attn_tune.families.flex import pattern_block_mask

            block_mask = pattern_block_mask(pattern, 2048, 2048, False, torch.device("cpu"))
            assert block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum() == layout.sum()
    assert 0.05 < densities[1] < 0.15, densities
    assert peaks[1] < dense_peak / 3, f"{name}: {peaks[1]} bytes at density {densities[1]:.2f} vs dense {dense_peak}"
    if name == "blocksparse":
        assert max(peaks) <= output_bytes + k_bytes, f"{name}: peaks {peaks} hold more than the output and one K"
        assert gathered[0] > gathered[1] > gathered[2], f"gathered keys {gathered} do not fall with {densities}"
    else:  # fused kernels: the peak is the output's and the kernel's own buffers, whatever the density
        assert peaks[0] >= peaks[1] >= peaks[2], f"{name}: peaks {peaks} grow as the density falls"


TRAINABLE = [
    ("local", dict(q_len=70, causal=True, kv_heads=2), {"local_window": 16}),
    ("blocksparse", dict(q_len=70, kv_len=90, causal=True, kv_heads=2), {"block": 16, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1}),
    ("xformers-blocksparse", dict(q_len=70, causal=False), {"block": 16, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1}),
    ("linformer", dict(q_len=70, kv_len=90, kv_heads=2), {"rank": 32}),
]


@pytest.mark.parametrize("name,fields,params", TRAINABLE, ids=[t[0] for t in TRAINABLE])
def test_gradients_match_own_pattern(name: str, fields: dict, params: dict) -> None:
    problem = Problem(batch=2, heads=4, head_dim=16, training=True, **fields)
    variant = _variant(name, problem)
    inputs = make_inputs(problem, seed=5)
    out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (inputs.q, inputs.k, inputs.v), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (inputs.q, inputs.k, inputs.v)]
    ref = pattern_reference(name, problem, *leaves, params)
    want = torch.autograd.grad(ref, leaves, grad_out.double())
    for label, got, expected in zip("qkv", grads, want):
        assert rel_error(got, expected) < 1e-4, f"d{label}: {rel_error(got, expected):.2e}"


def test_every_approximate_variant_trains_or_says_why_not() -> None:
    trained = {t[0] for t in TRAINABLE}
    problem = Problem(batch=1, heads=2, q_len=128, head_dim=16, training=True)
    for name in APPROXIMATE:
        if name not in trained:
            reason = attn_tune.get_variant(name).supports(problem)
            assert reason and "backward" in reason, f"{name} is neither gradient-tested nor refuses training"


def test_flex_refuses_cpu_backward_when_called_anyway() -> None:
    problem = Problem(batch=1, heads=2, q_len=64, head_dim=16, training=True)
    inputs = make_inputs(problem, seed=0)
    for name, window in (("flex-blocksparse", None), ("window-flex", 8)):
        with pytest.raises(UnsupportedProblem, match="no backward on CPU"):
            attn_tune.get_variant(name).fn(inputs.q, inputs.k, inputs.v, is_causal=False, window=window)


# Block layouts written out by hand (rows: query blocks, columns: key blocks), BigBird's rule read off the paper:
# a query block sees the key blocks within `window_blocks` of its own, the first `global_blocks`, and (random
# blocks aside) nothing else; causal drops key blocks after the query block.
HAND_LAYOUTS = [
    (dict(window_blocks=1, global_blocks=1), 6, 6, False,
     ["110000", "111000", "111100", "101110", "100111", "100011"]),
    (dict(window_blocks=1, global_blocks=1), 6, 6, True,
     ["100000", "110000", "111000", "101100", "100110", "100011"]),
    (dict(window_blocks=0, global_blocks=2), 5, 5, False,
     ["11000", "11000", "11100", "11010", "11001"]),
    (dict(window_blocks=1, global_blocks=1), 3, 5, False,
     ["11000", "11100", "11110"]),
    (dict(window_blocks=2, global_blocks=1), 5, 3, True,
     ["100", "110", "111", "111", "101"]),
]


@pytest.mark.parametrize("knobs,n_q,n_k,causal,rows", HAND_LAYOUTS)
def test_block_layout_is_bigbirds_rule_written_out_by_hand(knobs, n_q, n_k, causal, rows) -> None:
    block = 16
    pattern = BlockPattern(block=block, random_blocks=0, **knobs)
    expected = torch.tensor([[c == "1" for c in row] for row in rows])
    assert torch.equal(pattern.layout(n_q * block - 3, n_k * block - 5, causal), expected)


def test_block_mask_is_the_layout_cut_to_lengths_and_causality_by_hand() -> None:
    pattern = BlockPattern(block=2, window_blocks=0, global_blocks=1, random_blocks=0)
    rows = {False: ["11000", "11000", "11110", "11110", "11001"], True: ["10000", "11000", "11100", "11110", "11001"]}
    for causal, expected in rows.items():
        want = torch.tensor([[c == "1" for c in row] for row in expected])
        assert torch.equal(pattern.mask(5, 5, causal), want), causal


@pytest.mark.parametrize("causal", [False, True])
def test_random_blocks_add_exactly_that_many_allowed_blocks_per_row(causal: bool) -> None:
    n = 8
    plain = BlockPattern(block=4, window_blocks=0, global_blocks=1, random_blocks=0).layout(4 * n, 4 * n, causal)
    layouts = [BlockPattern(block=4, window_blocks=0, global_blocks=1, random_blocks=2, seed=s).layout(4 * n, 4 * n, causal)
               for s in (0, 0, 1)]
    assert torch.equal(layouts[0], layouts[1]) and not torch.equal(layouts[0], layouts[2])  # seeded, and by the seed
    for layout in layouts:
        extra = layout & ~plain
        if causal:
            assert not layout.triu(1).any(), "a random block after the query block"
        for i in range(n):
            free = (i + 1 if causal else n) - int(plain[i].sum())  # allowed blocks not already in the pattern
            assert int(extra[i].sum()) == min(2, free), (i, extra[i])


def test_linformer_projections_are_linformer_pytorchs() -> None:
    e, f = linformer_projections(300, 64, torch.float64, torch.device("cpu"))
    e_ref, f_ref = _linformer_pytorch_projections(300, 64)
    assert torch.equal(e, e_ref) and torch.equal(f, f_ref) and not torch.equal(e, f)


@pytest.mark.parametrize(
    "name,fields,fragment",
    [("linformer", {"causal": True}, "no causal"), ("linformer", {"window": 8}, "sliding window"),
     ("blocksparse", {"window": 8}, "sliding window"), ("local", {"mask": True}, "attn_mask"),
     ("window-chunked", {}, "needs a sliding window"), ("window-flex", {}, "needs a sliding window")],
)
def test_refusals_say_why_and_calls_raise(name: str, fields: dict, fragment: str) -> None:
    problem = Problem(batch=1, heads=2, q_len=64, head_dim=16, **fields)
    variant = attn_tune.get_variant(name)
    assert fragment in (variant.supports(problem) or "")
    inputs = make_inputs(problem, seed=0)
    with pytest.raises(UnsupportedProblem):
        variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem))


@pytest.mark.slow
def test_window_flex_builds_its_block_mask_once_per_shape() -> None:
    from attn_tune.families.flex import window_block_mask

    problem = Problem(batch=1, heads=2, q_len=96, head_dim=16, window=24)
    variant = _variant("window-flex", problem)
    inputs = make_inputs(problem, seed=0)
    window_block_mask.cache_clear()
    for _ in range(3):
        variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem))
    info = window_block_mask.cache_info()
    assert (info.misses, info.hits) == (1, 2)


# (q_len, kv_len) after a first call at 256 x 256: odd lengths, kv_len != q_len, and key lengths 8 past a multiple
# of 16 below the block (24, 40, 72, 120), which torch 2.13's CPU kernel got wrong before keys were padded.
FLEX_LENGTHS = [(17, 40), (40, 17), (33, 120), (1, 24), (100, 72), (130, 136)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_window_flex_compiled_at_one_shape_is_exact_at_others(dtype: str) -> None:
    """What the nearest-entry runtime does: one compiled window-flex serves lengths it was not first called with.
    Each call, causal or not, grouped heads or not, equals float64 attention, is finite and repeats bit for bit."""
    variant = _variant("window-flex", Problem(batch=1, heads=4, q_len=256, head_dim=16, window=5))
    shapes = [(256, 256)] + FLEX_LENGTHS
    for (q_len, kv_len), causal in zip(shapes, [False, True] * len(shapes)):
        problem = Problem(batch=2, heads=4, kv_heads=2 if causal else 4, q_len=q_len, kv_len=kv_len, head_dim=16,
                          dtype=dtype, causal=causal, window=5 if q_len <= kv_len + 4 else 64)
        inputs = make_inputs(problem, seed=q_len * kv_len)
        out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem))
        again = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem))
        assert torch.isfinite(out).all(), f"{problem.describe()}: non-finite output"
        assert torch.equal(out, again), f"{problem.describe()}: two calls on the same inputs differ"
        err = rel_error(out, oracle(inputs.q, inputs.k, inputs.v, causal=causal, window=problem.window))
        assert err < TOLERANCE[dtype], f"{problem.describe()}: {err:.2e} from float64 attention"


@pytest.mark.slow
def test_flex_blocksparse_is_exact_to_its_pattern_at_key_tails() -> None:
    """flex-blocksparse at key lengths that are not whole blocks, and its refusal of blocks the kernel gets wrong."""
    variant = _variant("flex-blocksparse", Problem(batch=1, heads=4, q_len=256, head_dim=16))
    for (q_len, kv_len), block in zip(FLEX_LENGTHS, [32, 64, 128, 32, 64, 128]):
        problem = Problem(batch=1, heads=4, q_len=q_len, kv_len=kv_len, head_dim=16)
        params = {"block": block, "window_blocks": 1, "global_blocks": 1, "random_blocks": 1}
        inputs = make_inputs(problem, seed=kv_len)
        out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)
        err = rel_error(out, pattern_reference("flex-blocksparse", problem, inputs.q, inputs.k, inputs.v, params))
        assert err < TOLERANCE["float32"], f"{problem.describe()} block {block}: {err:.2e} from its pattern"
    with pytest.raises(UnsupportedProblem, match="multiple of 16"):
        variant.fn(inputs.q, inputs.k, inputs.v, block=24)


@pytest.mark.parametrize("name", slow_cases(["local", "blocksparse", "linformer"], {"blocksparse"}))
def test_knob_space_samples_only_runnable_params(name: str) -> None:
    """Every point of the search space runs and yields a finite output (the tuner never draws a broken knob)."""
    from attn_tune.tuner.space import grid_points

    problem = Problem(batch=1, heads=2, q_len=200, kv_len=150, head_dim=16)
    variant = _variant(name, problem)
    inputs = make_inputs(problem, seed=0)
    for point in grid_points(problem, [variant]):
        params = {knob.split(":", 1)[1]: value for knob, value in point.items() if knob != "variant"}
        out = variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)
        assert torch.isfinite(out).all(), f"{name} {params} gave non-finite output"


@pytest.mark.slow
def test_tuner_searches_the_approximate_knobs_under_max_error(tmp_path) -> None:
    """A real tune: with a max_error every family takes part, its knobs come from its space, its error is measured
    (never assumed), and what breaks the bound is recorded as excluded, with the reason."""
    from attn_tune.tuner.tune import tune

    problem = Problem(batch=1, heads=2, q_len=512, head_dim=16)
    names = ["sdpa", "local", "blocksparse", "linformer"]
    config = tune([problem], job(trials=8, max_error=1.2, objective="memory", storage=f"sqlite:///{tmp_path / 's.db'}", seed=1, variants=[attn_tune.get_variant(n) for n in names], trial_measure={"min_repeats": 1, "min_time_s": 0.0}, final_measure={"min_repeats": 1, "min_time_s": 0.0}, rounds=1))
    (entry,) = config.entries
    approximate = [c for c in entry.candidates if c["variant"] in names[1:] and c.get("rel_error") is not None]
    assert approximate, entry.candidates
    for candidate in approximate:
        space = attn_tune.get_variant(candidate["variant"]).space(problem)
        assert set(candidate["params"]) == set(space)
        if candidate["rel_error"] > 1.2:
            assert candidate["status"] == "excluded" and "error" in candidate["reason"]
    # measured, never assumed: most knobs approximate (a pattern that happens to cover every block is exact)
    assert sum(c["rel_error"] > 1e-3 for c in approximate) > len(approximate) / 2, approximate
    assert entry.measured["rel_error"] <= 1.2
