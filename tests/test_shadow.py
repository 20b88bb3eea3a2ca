"""Shadow checks: sampled approximate calls recomputed exactly, per-entry stats, one warning when inputs drift."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import attn_tune
from attn_tune import Problem
from attn_tune.runtime import route_cache, shadowing
from tests.oracle import oracle, rel_error
from tests.runtime_helpers import config, entry

pytestmark = pytest.mark.usefixtures("no_config")

PROBLEM = Problem(batch=1, heads=2, q_len=256, head_dim=16, causal=True)


@pytest.fixture(autouse=True)
def _no_shadow():
    with attn_tune.shadow(0):
        attn_tune.stats(reset=True)
        yield
    attn_tune.stats(reset=True)


def _local_config(recorded: float) -> attn_tune.TunedConfig:
    chosen = entry(PROBLEM, "local", {"local_window": 64}, max_error=1.0)
    chosen.measured["rel_error"] = recorded
    return config([chosen, entry(Problem(batch=1, heads=2, q_len=128, head_dim=16, causal=True), "chunked",
                                 {"chunk": 32})])


def _qkv(scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    return q * scale, k, v


def _local_looking(query_scale: float):
    """Queries and keys from sinusoidal positions: q.k peaks at i = j, sharper as the queries grow. At scale 6 most
    attention falls inside a window of 64 (local's error about 0.04); at scale 1 much of it does not (about 0.5)."""
    pos = torch.arange(256.0)[:, None]
    freqs = 1.0 / 10.0 ** (torch.arange(8.0) / 8)
    e = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], -1)[None, None].repeat(1, 2, 1, 1)
    return e * query_scale, e, torch.randn(1, 2, 256, 16, generator=torch.Generator().manual_seed(0))


def test_every_sampled_call_is_checked_against_exact_and_the_worst_error_kept() -> None:
    errors = []
    with attn_tune.use_config(_local_config(recorded=1.0)), attn_tune.shadow(1.0):
        for seed in range(3):
            q, k, v = _qkv(seed=seed)
            out = attn_tune.attention(q, k, v, is_causal=True)
            errors.append(rel_error(out, oracle(q, k, v, causal=True)))
    (local,) = attn_tune.stats()["entries"]
    assert (local["variant"], local["params"], local["calls"], local["checked"]) == ("local", {"local_window": 64}, 3, 3)
    assert local["worst_error"] == pytest.approx(max(errors), rel=1e-6) and max(errors) > 1e-3
    assert local["entry"] == PROBLEM.describe() and local["recorded_error"] == 1.0 and not local["warned"]


def test_inputs_unlike_the_tuned_ones_warn_once_for_their_entry() -> None:
    q, k, v = _local_looking(6.0)  # what the config was "tuned" on
    with attn_tune.use_config(_local_config(recorded=1.0)):
        tuned_error = rel_error(attn_tune.attention(q, k, v, is_causal=True), oracle(q, k, v, causal=True))
    with attn_tune.use_config(_local_config(recorded=tuned_error)), attn_tune.shadow(1.0, factor=2.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            attn_tune.attention(q, k, v, is_causal=True)  # the inputs it was "tuned" on: no warning
        drifted = _local_looking(1.0)  # queries scaled down: flatter attention, the keys local drops matter
        with pytest.warns(RuntimeWarning, match=r"attn-tune shadow: local \{'local_window': 64\} for b1 h2 q256 "
                                                r"d16 float32 cpu causal: a live call's error .* exceeds 2x") as seen:
            attn_tune.attention(*drifted, is_causal=True)
            attn_tune.attention(*drifted, is_causal=True)
        assert len([w for w in seen if "shadow" in str(w.message)]) == 1
        assert seen[0].filename == __file__
    (local,) = attn_tune.stats()["entries"]
    assert local["warned"] and local["worst_error"] > 2 * tuned_error


def test_exact_routes_are_never_wrapped_and_off_means_no_wrapper() -> None:
    q, small = _qkv()[0], torch.randn(1, 2, 128, 16)
    with attn_tune.use_config(_local_config(recorded=1.0)):
        assert not _shadowed(q)
        with attn_tune.shadow(0.5):
            assert _shadowed(q) and not _shadowed(small)  # local is wrapped; chunked, exact, never
        assert not _shadowed(q)  # off again: the routes were rebuilt unwrapped


def _shadowed(q: torch.Tensor) -> bool:
    return getattr(route_cache.eager_route(q, q, q, None, True, None, False).fn, "__name__", "") == "shadowed"


def test_the_rate_samples_about_that_fraction() -> None:
    q, k, v = _qkv()
    with attn_tune.use_config(_local_config(recorded=1.0)), attn_tune.shadow(0.25), torch.no_grad():
        for _ in range(400):
            attn_tune.attention(q, k, v, is_causal=True)
    (local,) = attn_tune.stats(reset=True)["entries"]
    assert local["calls"] == 400 and 60 <= local["checked"] <= 140
    assert attn_tune.stats()["entries"] == []


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True])
def test_a_bad_rate_or_factor_is_one_line(bad) -> None:
    with pytest.raises(attn_tune.AttnTuneError, match="shadow rate must be a number from 0 to 1"):
        attn_tune.shadow(bad)
    with pytest.raises(attn_tune.AttnTuneError, match="shadow factor must be a number of at least 1"):
        attn_tune.shadow(0.1, factor=0.5)


@pytest.mark.slow
def test_the_environment_variable_sets_the_rate(tmp_path) -> None:
    code = "import attn_tune; print(attn_tune.stats()['rate'])"
    def run(value: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "ATTN_TUNE_SHADOW": value})

    assert run("0.01").stdout.strip() == "0.01"
    bad = run("often")
    assert bad.returncode != 0 and "ATTN_TUNE_SHADOW='often': not a number" in bad.stderr.strip().splitlines()[-1]
    assert shadowing.ENV_VAR == "ATTN_TUNE_SHADOW"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_live_error_agrees_with_a_float64_oracle(dtype) -> None:
    """The reference is SDPA in float32 (float64 inputs: float64), cheaper than float64 yet the same error to
    well below any budget: checked against the independent float64 oracle, GQA and a window included."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 96, 16, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 96, 16, generator=g).to(dtype) for _ in range(2))
    out = attn_tune.get_variant("local").fn(q, k, v, is_causal=True, window=None, attn_mask=None, scale=None,
                                            local_window=16)
    live = shadowing._live_error(out, q, k, v, True, 40, None, None)  # local 16 standing in for window 40
    want = rel_error(out, oracle(q, k, v, causal=True, window=40))
    assert 0.05 < want and live == pytest.approx(want, rel=1e-4)
