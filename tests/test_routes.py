"""Routes found once per span of lengths: the spans agree with the lookup at every length, a decode loop resolves a
handful of routes (not one per length), and under torch.compile the choice costs no recompile per length."""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import attn_tune
from attn_tune import Problem, UnsupportedProblem, Variant
from attn_tune.runtime import route_cache
from attn_tune.runtime.lookup import MAX_LEN, ConfigIndex
from tests.oracle import oracle, rel_error
from tests.runtime_helpers import config, entry, registered

pytestmark = pytest.mark.usefixtures("no_config")

raw_sdpa = torch._C._nn.scaled_dot_product_attention


def _p(q_len: int, kv_len: int | None = None, batch: int = 1, **kw) -> Problem:
    return Problem(batch=batch, heads=4, q_len=q_len, kv_len=kv_len, head_dim=16, **kw)


@pytest.mark.parametrize("seed", range(6))
def test_spans_give_the_lookups_own_answer_at_every_length(seed: int) -> None:
    rng = random.Random(seed)
    entries = [entry(_p(rng.choice([1, 16, 128, 1000, 2048]), rng.choice([None, 1, 64, 300, 2048, 5000]),
                        batch=rng.choice([1, 2, 8])), "sdpa") for _ in range(rng.randint(1, 10))]
    index = ConfigIndex(config(entries), {})
    for diagonal in (False, True):
        batch, q_len = rng.choice([1, 2, 4, 8]), rng.choice([1, 16, 700, 2048])
        spans = index.spans(_p(q_len, batch=batch), diagonal)
        assert spans[0][0] == 1 and spans[-1][1] == MAX_LEN
        assert all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:]))
        lengths = list(range(1, 2500)) + [rng.randint(2500, 10**6) for _ in range(100)]
        j = 0
        for n in sorted(lengths):
            while spans[j][1] < n:
                j += 1
            found = index.find(_p(n, batch=batch) if diagonal else _p(q_len, n, batch=batch))
            assert spans[j][2].entry is found.entry and spans[j][2].rule == found.rule, (diagonal, n)


def test_a_masked_call_without_masked_entries_spans_its_unmasked_twin() -> None:
    index = ConfigIndex(config([entry(_p(1, 100), "dense"), entry(_p(1, 1000), "chunked", {"chunk": 1})]), {})
    spans = index.spans(_p(1, 50, mask=True), diagonal=False)
    assert {m.note for _, _, m in spans} == {"tuned without an explicit mask"}
    assert index.spans(_p(1, 50, causal=True), False) == [(1, MAX_LEN, None)]  # no entry of its class


def _decode_config() -> attn_tune.TunedConfig:
    """Decode entries at kv 100 (sdpa) and 1000 (chunked): the choice changes between them (at kv 316)."""
    return config([entry(_p(1, 100), "sdpa"), entry(_p(1, 1000), "chunked", {"chunk": 1}),
                   entry(_p(64), "dense")])


def test_a_decode_loop_resolves_a_few_routes_and_each_agrees_with_decide() -> None:
    attn_tune.use_config(_decode_config())
    q, cache = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1200, 16)
    with torch.no_grad():
        for n in range(2, 1200, 7):
            k = cache[:, :, :n]
            got = attn_tune.attention(q, k, k)
            torch.testing.assert_close(got, raw_sdpa(q, k, k), atol=1e-5, rtol=1e-5)
            decision = attn_tune.explain(q, k, k)
            want = attn_tune.runtime.dispatch.decide(_p(1, n))
            assert (decision.variant, decision.params, decision.rule, decision.entry) == \
                (want.variant, want.params, want.rule, want.entry), n
            assert decision.problem == _p(1, n)  # explain names the call's own problem, not the span's first
    (line,) = route_cache._lines.values()
    resolved = [s for s in line.spans if s.route is not None]
    # 1-99, 100 (own entry), 101-316, 317-999, 1000, 1001 on: 171 lengths, at most 6 routes
    assert [(s.lo, s.hi) for s in line.spans][:5] == [(1, 99), (100, 100), (101, 316), (317, 999), (1000, 1000)]
    assert len(resolved) <= 6 and not any(s.by_length for s in line.spans)
    assert {s.route.decision.variant for s in resolved} == {"sdpa", "chunked"}


def test_self_attention_at_any_length_is_one_line_and_a_3d_call_never_takes_a_4d_ones() -> None:
    for n in (8, 9, 30):
        x = torch.randn(2, n, 16)  # 3-D: batch 2, no heads axis
        y = torch.randn(2, 2, n, 16)  # 4-D: batch 2, heads 2 (its shape[-3] is the 3-D call's batch)
        torch.testing.assert_close(attn_tune.attention(x, x, x, is_causal=True), raw_sdpa(x, x, x, is_causal=True))
        torch.testing.assert_close(attn_tune.attention(y, y, y, is_causal=True), raw_sdpa(y, y, y, is_causal=True))
        assert attn_tune.explain(x, x, x, is_causal=True).problem == Problem(batch=2, heads=1, q_len=n, head_dim=16,
                                                                          causal=True)
    assert len(route_cache._lines) == 2


def test_a_supports_that_reads_the_length_is_asked_at_every_length() -> None:
    asked: list[int] = []

    def supports(problem: Problem) -> str | None:
        asked.append(problem.n_kv_len)
        return None if problem.n_kv_len % 2 == 0 else "odd key lengths only elsewhere"

    even = Variant(name="even-only", family="dense", fn=attn_tune.get_variant("sdpa").fn, exact=True,
                   supports=supports)
    with registered(even):
        attn_tune.use_config(config([entry(_p(1, 100), "even-only")]))
        q, cache = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 200, 16)
        for n in (90, 91, 92, 93, 90):
            decision = attn_tune.explain(q, cache[:, :, :n], cache[:, :, :n])
            assert decision.variant == ("even-only" if n % 2 == 0 else "sdpa"), n
        assert sorted(set(asked)) == [90, 91, 92, 93]  # each length once, the repeat cached


def test_a_supports_that_ignores_the_length_is_asked_once_per_span() -> None:
    asked: list[Problem] = []

    def supports(problem: Problem) -> str | None:
        asked.append(problem)
        return None if problem.head_dim == 16 else "head_dim 16 only"

    plain = Variant(name="plain-sdpa", family="dense", fn=attn_tune.get_variant("sdpa").fn, exact=True,
                    supports=supports)
    with registered(plain):
        attn_tune.use_config(config([entry(_p(1, 100), "plain-sdpa")]))
        q, cache = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 300, 16)
        for n in range(50, 300):
            assert attn_tune.explain(q, cache[:, :, :n], cache[:, :, :n]).variant == "plain-sdpa"
        assert [p.kv_len for p in asked] == [50, 100, 101]  # once per span: below, at and above the entry's length


def test_a_variant_refusing_at_run_time_falls_back_once_for_its_span() -> None:
    calls = {"n": 0}

    def refusing(q, k, v, **kwargs):
        calls["n"] += 1
        raise UnsupportedProblem("not today")

    odd = Variant(name="refuses-at-run-time", family="dense", fn=refusing, exact=True)
    with registered(odd):
        attn_tune.use_config(config([entry(_p(1, 100), "refuses-at-run-time")]))
        q, cache = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 300, 16)
        with pytest.warns(RuntimeWarning, match="refused the call: not today; using sdpa") as caught:
            attn_tune.attention(q, cache[:, :, :120], cache[:, :, :120])
        assert caught[0].filename == __file__
        out = attn_tune.attention(q, cache[:, :, :150], cache[:, :, :150])
        torch.testing.assert_close(out, raw_sdpa(q, cache[:, :, :150], cache[:, :, :150]))
        assert calls["n"] == 1 and attn_tune.explain(q, cache[:, :, :150], cache[:, :, :150]).rule == "fallback"


def test_a_later_call_with_mismatched_key_dtype_is_refused_by_pytorch() -> None:
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 40, 16)
    attn_tune.attention(q, k, k)
    with pytest.raises(RuntimeError, match="dtype"):
        attn_tune.attention(q, k.double(), k.double())


def _compiled_frames(config, lengths, q_len: int = 1, **kwargs) -> tuple[int, int, float]:
    """(frames, graph breaks, worst |difference| from SDPA) of a compiled step run over `lengths`."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    q, cache = torch.randn(1, 4, q_len, 16), torch.randn(1, 4, max(lengths) + 1, 16)  # slices never the whole
    worst = 0.0
    with attn_tune.use_config(config), torch.no_grad():
        step = torch.compile(lambda q, k, v: attn_tune.attention(q, k, v, **kwargs) + 1, backend=counter)
        for n in lengths:
            k = cache[:, :, :n]
            qn = q if q_len != 0 else cache[:, :, :n]
            worst = max(worst, (step(qn, k, k) - 1 - raw_sdpa(qn, k, k, **kwargs)).abs().max().item())
    return counter.frame_count, sum(torch._dynamo.utils.counters["graph_break"].values()), worst


def _raw_frames(lengths) -> int:
    torch._dynamo.reset()
    counter = CompileCounter()
    q, cache = torch.randn(1, 4, 1, 16), torch.randn(1, 4, max(lengths) + 1, 16)  # slices never the whole
    step = torch.compile(lambda q, k, v: raw_sdpa(q, k, v) + 1, backend=counter)
    for n in lengths:
        step(q, cache[:, :, :n], cache[:, :, :n])
    return counter.frame_count


def test_a_compiled_decode_loop_compiles_no_more_than_sdpa_with_or_without_a_config() -> None:
    lengths = range(40, 72)
    raw = _raw_frames(lengths)
    assert raw == 2  # static, then dynamic: what the comparison is against
    for config_in_use in (None, config([entry(_p(1, 50), "sdpa")])):
        frames, breaks, worst = _compiled_frames(config_in_use, lengths)
        assert (frames, breaks) == (raw, 0) and worst < 1e-6


def test_a_compiled_decode_loop_recompiles_once_where_the_choice_changes() -> None:
    lengths = range(280, 360)  # the choice changes from sdpa to chunked at kv 317
    frames, breaks, worst = _compiled_frames(_decode_config(), lengths)
    assert (frames, breaks) == (3, 0) and worst < 1e-5


def test_compiled_self_attention_over_growing_lengths_and_a_new_config_recompiles() -> None:
    diagonal = [(n, None) for n in range(48, 80)]
    frames, breaks, worst = _compiled_frames(None, [n for n, _ in diagonal], q_len=0, is_causal=True)
    assert (frames, breaks) == (2, 0) and worst < 1e-5
    # A config in use changes what the graph calls: the graph is guarded on it.
    q = torch.randn(1, 4, 64, 16)
    step = torch.compile(lambda q: attn_tune.attention(q, q, q, is_causal=True), backend="eager")
    exact = step(q)
    with attn_tune.use_config(config([entry(_p(64, causal=True), "local", {"local_window": 4}, max_error=1.0)])):
        local = step(q)
    assert (local - exact).abs().max() > 1e-3  # the approximate local window ran
    torch.testing.assert_close(step(q), exact)  # and the config's end took it back


def test_compiling_attention_itself_before_and_after_eager_calls() -> None:
    q, cache = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 100, 16)
    for warm in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        if warm:
            attn_tune.attention(q, cache[:, :, :50], cache[:, :, :50])
        counter = CompileCounter()
        compiled = torch.compile(attn_tune.attention, backend=counter)
        for n in range(40, 80):
            k = cache[:, :, :n]
            torch.testing.assert_close(compiled(q, k, k), raw_sdpa(q, k, k))
        assert counter.frame_count == 2 and not torch._dynamo.utils.counters["graph_break"]


def test_the_sdpa_choice_calls_pytorch_with_the_calls_own_arguments_and_a_window_still_folds() -> None:
    q, k = torch.randn(2, 4, 24, 16), torch.randn(2, 2, 24, 16)
    mask = torch.rand(2, 1, 24, 24) > 0.3
    mask[..., 0] = True
    for kwargs in (dict(is_causal=True), dict(attn_mask=mask), dict(attn_mask=mask.float(), scale=0.3)):
        torch.testing.assert_close(attn_tune.attention(q, k, k, enable_gqa=True, **kwargs),
                                   raw_sdpa(q, k, k, enable_gqa=True, **kwargs))
    windowed = attn_tune.attention(q, k, k, enable_gqa=True, is_causal=True, window=4)
    assert rel_error(windowed, oracle(q, k, k, causal=True, window=4)) < 1e-5
