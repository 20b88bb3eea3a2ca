"""The conformance kit: every built-in variant passes it, and each planted fault is caught by the check meant for it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attn_tune
from attn_tune import Problem, UnsupportedProblem, Variant
from attn_tune.families.dense import dense_attention
from attn_tune.testing import CHECKS, check_variant, conformance_cases, conformance_problems
from tests.conftest import slow_cases

AVAILABLE = [v for v in attn_tune.variants() if attn_tune.availability(v) is None]
UNAVAILABLE = [v.name for v in attn_tune.variants() if attn_tune.availability(v) is not None]
RUNS_HERE = [v for v in AVAILABLE if any(v.supports(p) is None for p in conformance_problems("cpu"))]
REFUSES_HERE = [v for v in AVAILABLE if v not in RUNS_HERE]  # CUDA-only kernels on a CPU


@pytest.mark.parametrize("variant", slow_cases(RUNS_HERE, {"flex-blocksparse", "window-flex"}), ids=lambda v: v.name)
def test_builtin_variant_passes_the_kit(variant: Variant) -> None:
    findings = check_variant(variant)
    assert not findings, "\n".join(str(f) for f in findings)


@pytest.mark.parametrize("variant", REFUSES_HERE, ids=lambda v: v.name)
def test_builtin_variant_that_runs_nothing_here_refuses_cleanly_and_is_never_said_to_conform(variant: Variant) -> None:
    findings = [f for case in conformance_cases(variant) for f in case.findings()]
    assert not findings, "\n".join(str(f) for f in findings)  # each call refused with UnsupportedProblem
    with pytest.raises(UnsupportedProblem, match="supports none of the 90 conformance problems on cpu"):
        check_variant(variant)


@pytest.mark.parametrize("name", UNAVAILABLE)
def test_unavailable_variant_is_refused_with_its_reason(name: str) -> None:
    with pytest.raises(UnsupportedProblem, match="unavailable here: "):
        check_variant(attn_tune.get_variant(name))


def _dense(name: str, **changes) -> Variant:
    base = Variant(name=name, family="dense", fn=dense_attention, exact=True)
    return dataclasses.replace(base, **changes)


def _slightly_wrong(q, k, v, **kw):
    return dense_attention(q, k, v, **kw) * 1.001


def _mutates(q, k, v, **kw):
    out = dense_attention(q, k, v, **kw)
    with torch.no_grad():
        v.mul_(2.0)
    return out


def _no_causal(q, k, v, *, is_causal=False, **kw):
    if is_causal:
        raise UnsupportedProblem("no causal here")
    return dense_attention(q, k, v, **kw)


def _float32_out(q, k, v, **kw):
    return dense_attention(q.float(), k.float(), v.float(), **kw)


def _noisy(q, k, v, **kw):
    out = dense_attention(q, k, v, **kw)
    return out + torch.randn_like(out) * 1e-9 * out.abs().mean()


def _ignores_causal(q, k, v, *, is_causal=False, **kw):
    return dense_attention(q, k, v, **kw)  # computes non-causal attention whatever it is asked


def _detached(q, k, v, **kw):
    return dense_attention(q.detach(), k.detach(), v.detach(), **kw)


def _bad_space(problem):
    from optuna.distributions import CategoricalDistribution

    return {"tile": CategoricalDistribution([8, -1])}


def _tile_fn(q, k, v, *, tile=8, **kw):
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    return dense_attention(q, k, v, **kw)


PLANTED = [
    ("slightly-wrong", _dense("slightly-wrong", fn=_slightly_wrong), "correctness"),
    ("mutates-input", _dense("mutates-input", fn=_mutates), "inputs-unchanged"),
    ("claims-causal", _dense("claims-causal", fn=_no_causal), "supports-claims"),
    ("wrong-dtype", _dense("wrong-dtype", fn=_float32_out), "output"),
    ("nondeterministic", _dense("nondeterministic", fn=_noisy), "determinism"),
    ("refuses-but-answers-wrong",
     _dense("refuses-but-answers-wrong", fn=_ignores_causal, supports=lambda p: "no causal" if p.causal else None),
     "supports-refusals"),
    ("no-gradient", _dense("no-gradient", fn=_detached), "backward"),
    ("bad-space", _dense("bad-space", fn=_tile_fn, space=_bad_space), "space"),
]


@pytest.mark.parametrize("label,variant,check", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_fault_is_caught_by_its_check(label: str, variant: Variant, check: str) -> None:
    findings = check_variant(variant)
    assert check in {f.check for f in findings}, f"{label} not caught by {check}: {[str(f) for f in findings[:5]]}"
    line = str(next(f for f in findings if f.check == check))
    assert "\n" not in line and label in line and f"{check} failed on b2 h4" in line


def test_nondeterminism_within_rounding_is_caught_only_by_determinism() -> None:
    """Noise far below float32 rounding passes correctness: the determinism check is what catches it."""
    findings = check_variant(_dense("nondeterministic", fn=_noisy))
    assert {f.check for f in findings} == {"determinism"}


def test_the_kit_covers_every_masking_kind() -> None:
    problems = conformance_problems()
    assert {p.causal for p in problems} == {False, True} and {p.window for p in problems} == {None, 5}
    assert {p.mask for p in problems} == {False, True} and {p.training for p in problems} == {False, True}
    assert {p.dtype for p in problems} >= {"float32", "bfloat16"}
    assert any(p.n_kv_heads < p.heads for p in problems) and any(p.n_kv_len != p.q_len for p in problems)


def test_cases_parametrize_with_readable_ids_and_fail_with_one_line_per_finding() -> None:
    cases = conformance_cases(_dense("slightly-wrong", fn=_slightly_wrong), checks=["correctness"])
    assert str(cases[0]).startswith("slightly-wrong-b2-h4")
    with pytest.raises(AssertionError, match=r"^slightly-wrong: correctness failed on b2 h4 .*relative error"):
        cases[0].run()
    with pytest.raises(ValueError, match="unknown checks"):
        conformance_cases(_dense("x"), checks=["speed"])
    assert set(CHECKS) >= {"output", "correctness", "determinism", "inputs-unchanged", "backward", "space"}


def test_kit_problems_run_on_a_chosen_device_list() -> None:
    problem = Problem(batch=1, heads=2, q_len=8, head_dim=16)
    assert check_variant(attn_tune.get_variant("dense"), problems=[problem]) == []


class _FaultyPlugin:
    @attn_tune.hookimpl
    def attn_tune_variants(self):
        return [_dense("slightly-wrong", fn=_slightly_wrong)]


def test_check_command_exit_codes_and_json() -> None:
    import json

    from click.testing import CliRunner

    from attn_tune.cli.main import cli
    from attn_tune.registry import pm

    def run(*args: str):
        return CliRunner().invoke(cli, list(args), prog_name="attn-tune")

    ok = run("check", "dense")
    assert ok.exit_code == 0 and ok.stdout.strip().endswith("dense: conforms (8 checks on 90 problems, cpu)")
    pm.register(_FaultyPlugin(), name="faulty")
    try:
        bad = run("check", "slightly-wrong", "--check", "correctness")
        assert bad.exit_code == 1
        lines = bad.stdout.strip().splitlines()
        assert lines[0].startswith("slightly-wrong: correctness failed on b2 h4") and "1 checks on 90 problems" in lines[-1]
        data = json.loads(run("check", "slightly-wrong", "--json").stdout)
        assert data["variant"] == "slightly-wrong" and data["findings"][0]["check"] == "correctness"
    finally:
        pm.unregister(name="faulty")
    for args, fragment in ((("check", "dens"), "did you mean dense"), (("check", "dense", "--check", "speed"), "unknown check"),
                           (("check", "sdpa", "--device", "cuda:64"), "cuda")):
        result = run(*args)
        assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output


def test_a_kit_that_could_run_no_problem_says_so_and_exits_2() -> None:
    """A variant refusing every problem on this device (a CUDA-only kernel on a CPU): never "conforms"."""
    from click.testing import CliRunner

    from attn_tune.cli.main import cli
    from tests.runtime_helpers import registered

    gpu_only = _dense("gpu-only", supports=lambda p: "runs on CUDA only")
    with registered(gpu_only):
        result = CliRunner().invoke(cli, ["check", "gpu-only"], prog_name="attn-tune")
        with pytest.raises(UnsupportedProblem, match="supports none of the 90 conformance problems on cpu"):
            check_variant(gpu_only)
    assert result.exit_code == 2 and "conforms" not in result.output
    assert result.output.strip() == ("Error: gpu-only supports none of the 90 conformance problems on cpu "
                                     "(runs on CUDA only): nothing could be checked here")


def test_the_verdict_says_how_many_problems_were_run() -> None:
    """A variant that claims only some problems (windows only) conforms on those, and says how many it refused."""
    from click.testing import CliRunner

    from attn_tune.cli.main import cli

    variant = attn_tune.get_variant("window-chunked")
    runs = len([p for p in conformance_problems("cpu") if variant.supports(p) is None])
    result = CliRunner().invoke(cli, ["check", "window-chunked", "--check", "output"], prog_name="attn-tune")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(f"window-chunked: conforms (1 checks on {runs} of 90 problems, cpu; it "
                                          f"refuses the other {90 - runs})") and 0 < runs < 90


@pytest.mark.parametrize("name", UNAVAILABLE)
def test_check_names_why_an_unavailable_variant_cannot_run_before_anything_else(name: str) -> None:
    from click.testing import CliRunner

    from attn_tune.cli.main import cli

    result = CliRunner().invoke(cli, ["check", name], prog_name="attn-tune")
    assert result.exit_code == 2 and f"Error: {name} is unavailable here: " in result.output
