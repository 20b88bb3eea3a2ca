"""How a call finds its choice: exact entry, nearest bucket, other device type, no config, and fallbacks."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

import attn_tune
from attn_tune import Problem
from attn_tune.tuned_config import ConfigError, device_info, merge_configs
from tests.runtime_helpers import config, entry, registered

pytestmark = pytest.mark.usefixtures("no_config")


def _qkv(batch=1, heads=2, q_len=64, kv_len=None, dim=16, requires_grad=False):
    kv_len = kv_len or q_len
    q = torch.randn(batch, heads, q_len, dim, requires_grad=requires_grad)
    k = torch.randn(batch, heads, kv_len, dim, requires_grad=requires_grad)
    return q, k, torch.randn_like(k)


def _problem(batch=1, q_len=64, **kw) -> Problem:
    return Problem(batch=batch, heads=2, q_len=q_len, head_dim=16, **kw)


def test_no_config_uses_the_default_policy() -> None:
    decision = attn_tune.explain(*_qkv())
    assert (decision.variant, decision.rule, decision.config) == ("sdpa", "default", None)
    assert "no tuned config" in decision.reason


def test_exact_entry() -> None:
    attn_tune.use_config(config([entry(_problem(q_len=64), "chunked", {"chunk": 32}),
                                 entry(_problem(q_len=128), "dense")]))
    decision = attn_tune.explain(*_qkv(q_len=64))
    assert (decision.variant, decision.params, decision.rule) == ("chunked", {"chunk": 32}, "own-entry")
    assert decision.entry == _problem(q_len=64)
    assert "b1 h2 q64 d16" in str(decision) and "chunked" in str(decision)


@pytest.mark.parametrize(
    "batch,q_len,expected_q,expected_batch",
    [(1, 90, 128, 1), (1, 40, 32, 1), (3, 100, 128, 4), (1, 4096, 1024, 1), (16, 32, 32, 4)],
)
def test_nearest_tuned_lengths_and_batch_in_log_scale(batch, q_len, expected_q, expected_batch) -> None:
    entries = [entry(_problem(batch=b, q_len=n), "chunked", {"chunk": n // 2}) for b in (1, 4) for n in (32, 128, 1024)]
    attn_tune.use_config(config(entries))
    decision = attn_tune.explain(*_qkv(batch=batch, q_len=q_len))
    assert decision.rule == "nearest-entry" and decision.variant == "chunked"
    assert (decision.entry.q_len, decision.entry.batch) == (expected_q, expected_batch)
    assert decision.params == {"chunk": expected_q // 2}


def test_only_entries_equal_in_every_other_field_are_used() -> None:
    attn_tune.use_config(config([entry(_problem(causal=True), "chunked", {"chunk": 16}),
                                 entry(Problem(batch=1, heads=2, q_len=64, head_dim=32), "dense")]))
    decision = attn_tune.explain(*_qkv())  # not causal, head_dim 16: neither entry
    assert (decision.variant, decision.rule) == ("sdpa", "default")
    assert attn_tune.explain(*_qkv(), is_causal=True).variant == "chunked"
    q, k, v = _qkv(requires_grad=True)  # a training call does not use an inference entry, and explain says why
    decision = attn_tune.explain(q, k, v, is_causal=True)
    assert decision.rule == "default" and "tuned for inference; this call runs training" in decision.reason
    assert "no entry in the config has" in attn_tune.explain(*_qkv()).reason  # no entry in either mode


def test_an_inference_call_against_a_training_entry_is_told_so() -> None:
    attn_tune.use_config(config([entry(_problem(causal=True, training=True), "chunked", {"chunk": 16})]))
    decision = attn_tune.explain(*_qkv(), is_causal=True)
    assert decision.rule == "default" and "were tuned for training; this call runs inference" in decision.reason
    q, k, v = _qkv(requires_grad=True)
    assert attn_tune.explain(q, k, v, is_causal=True).variant == "chunked"


def test_config_of_another_device_type_is_refused_with_one_warning() -> None:
    cuda = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
    attn_tune.use_config(config([entry(_problem(device="cuda"), "dense")], device=cuda))
    with pytest.warns(RuntimeWarning, match="tuned on cuda, this call runs on cpu: using the default policy"):
        decision = attn_tune.explain(*_qkv())
    assert (decision.variant, decision.rule) == ("sdpa", "default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn_tune.attention(*_qkv(q_len=32))  # warned once per config and device type, not per shape


def test_merged_config_uses_the_entry_measured_on_this_device() -> None:
    """Two devices' configs merge; on this machine the entry of this machine's device is the one used."""
    here = device_info("cpu")
    other = {"type": "cpu", "name": "Some Other CPU @ 1.00GHz", "threads": 64}
    mine = config([entry(_problem(), "chunked", {"chunk": 16})], device=here)
    theirs = config([entry(_problem(), "dense")], device=other)
    for order in ([theirs, mine], [mine, theirs]):
        merged = merge_configs(order)
        assert merged.device["type"] == "mixed" and len(merged.entries) == 2
        attn_tune.use_config(merged)
        assert attn_tune.explain(*_qkv()).variant == "chunked"


def test_variant_that_cannot_serve_the_call_falls_back_to_an_exact_one() -> None:
    """Unknown here, refusing the problem, or refusing at call time: an exact variant answers, and says why."""
    attn_tune.use_config(config([
        entry(_problem(q_len=64), "not-installed-here"),
        entry(_problem(q_len=64, causal=True), "linformer", {"rank": 16}, max_error=5.0),
        entry(_problem(q_len=64, mask=True), "window-chunked", {"block": 16}),
    ]))
    decision = attn_tune.explain(*_qkv())
    assert (decision.variant, decision.rule) == ("sdpa", "fallback") and "not-installed-here" in decision.reason
    decision = attn_tune.explain(*_qkv(), is_causal=True)
    assert (decision.variant, decision.rule) == ("sdpa", "fallback") and "causal" in decision.reason
    mask = torch.rand(64, 64) > 0.3
    decision = attn_tune.explain(*_qkv(), attn_mask=mask)
    assert decision.variant == "sdpa" and "window" in decision.reason


def test_masked_call_uses_the_unmasked_entry_when_its_variant_takes_masks() -> None:
    attn_tune.use_config(config([entry(_problem(), "chunked", {"chunk": 16}), entry(_problem(q_len=32), "window-chunked", {"block": 8})]))
    q, k, v = _qkv()
    mask = torch.rand(64, 64) > 0.3
    mask[:, 0] = True
    decision = attn_tune.explain(q, k, v, attn_mask=mask)
    assert decision.variant == "chunked" and "tuned without an explicit mask" in decision.reason
    torch.testing.assert_close(attn_tune.attention(q, k, v, attn_mask=mask),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_refusal_at_call_time_falls_back_once_with_a_warning() -> None:
    """A plugin variant whose supports() claims the call but whose fn raises UnsupportedProblem."""

    def refuses(q, k, v, **kwargs):
        raise attn_tune.UnsupportedProblem("not today")

    with registered(attn_tune.Variant(name="moody", family="dense", fn=refuses, exact=True)):
        attn_tune.use_config(config([entry(_problem(), "moody")]))
        q, k, v = _qkv()
        assert attn_tune.explain(q, k, v).variant == "moody"
        with pytest.warns(RuntimeWarning, match="moody refused the call: not today; using sdpa"):
            out = attn_tune.attention(q, k, v)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        decision = attn_tune.explain(q, k, v)
        assert (decision.variant, decision.rule) == ("sdpa", "fallback")


def test_approximate_entries_serve_only_their_own_problem_exact_ones_their_neighbours_too() -> None:
    """By hand, no tune. `rough` (approximate, supports everything, masks included) tuned for q512 and `chunked`
    (exact) for q256, both unmasked: the exact entry reaches its nearest lengths and the masked twin of its
    problem; the approximate one reaches neither (its error was measured only at its own problem). Both were tuned
    with approximate variants allowed: only the approximate choice is called approximate."""

    def rough(q, k, v, *, is_causal, window, attn_mask, scale, **params):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    approximate = attn_tune.Problem(batch=1, heads=2, q_len=512, head_dim=32)
    exact = attn_tune.Problem(batch=1, heads=2, q_len=256, head_dim=32, causal=True)

    def decision(q_len, causal=False, masked=False):
        q = torch.randn(1, 2, q_len, 32)
        mask = None
        if masked:  # a generic mask (an all-True one is read as no mask at all: that problem's own entry)
            mask = torch.rand(1, 1, q_len, q_len, generator=torch.Generator().manual_seed(0)) < 0.7
            mask[..., range(q_len), range(q_len)] = True
        return attn_tune.explain(q, q, q, attn_mask=mask, is_causal=causal)

    with registered(attn_tune.Variant(name="rough", family="dense", fn=rough, exact=False)):
        attn_tune.use_config(config([entry(approximate, "rough", max_error=2.0),
                                     entry(exact, "chunked", {"chunk": 32}, max_error=2.0)]))
        own = decision(512)
        assert (own.variant, own.rule) == ("rough", "own-entry")
        assert "error:    approximate, tuned within max_error 2" in str(own)
        assert "approximate" not in str(decision(256, causal=True)) and decision(256, causal=True).max_error == 0
        for near in (decision(600), decision(512, masked=True)):  # nearest lengths; the masked twin
            assert near.entry == approximate and (near.variant, near.rule) == ("sdpa", "fallback")
            assert "approximate rough, whose error was measured only at" in near.reason
        assert (decision(256, causal=True).variant, decision(256, causal=True).rule) == ("chunked", "own-entry")
        near = decision(300, causal=True)
        assert (near.variant, near.rule, near.entry) == ("chunked", "nearest-entry", exact)
        twin = decision(256, causal=True, masked=True)
        assert (twin.variant, twin.rule, twin.entry) == ("chunked", "own-entry", exact)
        assert "tuned without an explicit mask" in twin.reason


def test_use_config_as_a_context_manager_restores_the_previous(tmp_path) -> None:
    path = tmp_path / "tuned.json"
    config([entry(_problem(), "dense")]).save(path)
    attn_tune.use_config(config([entry(_problem(), "chunked", {"chunk": 16})]))
    with attn_tune.use_config(path):
        assert attn_tune.explain(*_qkv()).variant == "dense"
        assert attn_tune.explain(*_qkv()).config == str(path)
    assert attn_tune.explain(*_qkv()).variant == "chunked"


def test_use_config_refuses_a_foreign_file_in_one_line(tmp_path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConfigError, match="not an attn-tune config"):
        attn_tune.use_config(path)
    assert attn_tune.explain(*_qkv()).rule == "default"  # nothing half-applied


def _run_with_env(tmp_path, env_value: str) -> subprocess.CompletedProcess:
    code = (
        "import torch, attn_tune\n"
        "q = torch.randn(1, 2, 64, 16)\n"
        "print(attn_tune.explain(q, q, q).variant)\n"
    )
    import os

    env = {**os.environ, "ATTN_TUNE_CONFIG": env_value}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_environment_variable_sets_the_config(tmp_path) -> None:
    config([entry(_problem(), "dense")]).save(tmp_path / "tuned.json")
    assert _run_with_env(tmp_path, "tuned.json").stdout.strip() == "dense"
    bad = _run_with_env(tmp_path, "missing.json")
    assert bad.returncode != 0 and "ConfigError: ATTN_TUNE_CONFIG: cannot read missing.json" in bad.stderr


def test_routes_are_cached_per_call_signature_and_dropped_on_config_change() -> None:
    from attn_tune.runtime import route_cache

    q, k, v = _qkv()
    attn_tune.attention(q, k, v)
    size = len(route_cache._lines)
    attn_tune.attention(torch.randn_like(q), k, v)  # same signature: no new route
    assert len(route_cache._lines) == size
    attn_tune.use_config(config([entry(_problem(), "dense")]))
    assert len(route_cache._lines) == 0
    assert attn_tune.explain(q, k, v).variant == "dense"


def test_show_why_says_which_entry_and_variant_a_problem_gets(tmp_path) -> None:
    from click.testing import CliRunner

    from attn_tune.cli.main import cli

    path = tmp_path / "tuned.json"
    config([entry(Problem(batch=1, heads=8, q_len=1024, head_dim=64, causal=True), "chunked", {"chunk": 256})]).save(path)
    runner = CliRunner()
    result = runner.invoke(cli, ["show", str(path), "--why", "--seq-len", "900,1024", "--causal"])
    assert result.exit_code == 0, result.output
    near, exact = result.stdout.split("\n\n")
    assert "q900" in near and "chunked {'chunk': 256}  [nearest-entry]" in near and "entry:    b1 h8 q1024" in near
    assert "[own-entry]" in exact
    result = runner.invoke(cli, ["show", str(path), "--why", "--seq-len", "1024", "--json"])
    (decision,) = json.loads(result.stdout)
    assert (decision["variant"], decision["rule"], decision["entry"]) == ("sdpa", "default", None)
    result = runner.invoke(cli, ["show", str(path), "--seq-len", "1024"])
    assert result.exit_code == 2 and "problem options go with --why" in result.output
