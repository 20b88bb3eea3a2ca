"""The conformance kit: checks any `Variant` keeps the contract of DESIGN section 2, for plugin authors' own tests.

    from attn_tune.testing import check_variant, conformance_cases
    findings = check_variant(my_variant)                 # [] when it conforms; else one readable line each

    @pytest.mark.parametrize("case", conformance_cases(my_variant), ids=str)
    def test_conformance(case):
        case.run()                                       # AssertionError naming the check and the problem

Over small problems (causal, window, grouped-query heads, kv_len != q_len, explicit masks, float32 and bfloat16,
training) it checks, per check name:
  output            the output has q's shape, dtype and device, and is finite
  correctness       exact variants: within the dtype's rounding of float64 attention
  determinism       two calls on the same inputs give the same output (bit for bit)
  inputs-unchanged  q, k, v and attn_mask are not modified
  supports-claims   what `supports()` accepts runs (no exception)
  supports-refusals what it refuses raises UnsupportedProblem if called anyway (an exact variant may instead answer
                    correctly); never another error, never a wrong answer
  backward          when it accepts training: gradients exist, are finite, and (exact) match float64's
  space             `space()` gives optuna distributions, and every sampled point runs
Nothing here imports pytest; `conformance_cases` only builds objects with `run()` and a readable `str()`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import optuna
import torch
from torch import Tensor

from attn_tune.errors import InvalidProblem, UnsupportedProblem, one_line
from attn_tune.measurement.inputs import make_inputs, reference_output, relative_error
from attn_tune.problem import Inputs, Problem
from attn_tune.registry.catalog import availability
from attn_tune.registry.space import quiet_optuna, suggest
from attn_tune.registry.variant import Variant, malformed_reason

__all__ = [
    "CHECKS", "TOLERANCE", "Finding", "Case", "conformance_problems", "conformance_cases", "check_variant",
    "sample_params", "runnable_problems",
]

CHECKS: tuple[str, ...] = (
    "output", "correctness", "determinism", "inputs-unchanged", "supports-claims", "supports-refusals", "backward",
    "space",
)
TOLERANCE: dict[str, float] = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
GRAD_TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 3e-2}
SPACE_SAMPLES = 6
SEED = 0  # of the inputs every check draws: the same numbers in every check, so a finding can be reproduced


@dataclass(frozen=True)
class Finding:
    """One failed check on one problem."""

    variant: str
    check: str
    problem: Problem | None
    message: str

    def __str__(self) -> str:
        where = self.problem.describe() if self.problem is not None else "any problem"
        return f"{self.variant}: {self.check} failed on {where}: {self.message}"


def conformance_problems(device: str = "cpu") -> list[Problem]:
    """The small problems the kit runs: every masking kind, GQA, unequal lengths, two dtypes, and training."""
    problems = []
    for causal, window, mask, (q_len, kv_len), kv_heads, dtype in itertools.product(
        (False, True), (None, 5), (False, True), ((33, 33), (17, 40), (40, 17)), (4, 2), ("float32", "bfloat16")
    ):
        try:
            problems.append(Problem(batch=2, heads=4, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=16,
                                    dtype=dtype, device=device, causal=causal, window=window, mask=mask))
        except InvalidProblem:
            continue
    for causal, window, kv_heads in ((False, None, 4), (True, None, 2), (True, 5, 2)):
        problems.append(Problem(batch=2, heads=4, kv_heads=kv_heads, q_len=24, kv_len=30, head_dim=16, device=device,
                                causal=causal, window=window, training=True))
    return problems


def sample_params(variant: Variant, problem: Problem, count: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """`count` knob settings drawn from the variant's space exactly as the tuner draws them (seeded)."""
    with quiet_optuna():
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        return [suggest(study.ask(), problem, [variant])[1] for _ in range(count)]


def _call(variant: Variant, problem: Problem, inputs: Inputs, params: dict[str, Any]) -> Tensor:
    return variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)


def _check_supported(variant: Variant, problem: Problem, params: dict[str, Any], checks: set[str]) -> list[str]:
    """Messages (prefixed by their check) for a problem the variant says it supports."""
    failures: list[str] = []
    run = make_inputs(problem, SEED)
    before = [t.detach().clone() for t in (run.q, run.k, run.v)] + ([run.attn_mask.clone()] if run.attn_mask is not None else [])
    try:
        with torch.set_grad_enabled(problem.training):
            out = _call(variant, problem, run, params)
    except Exception as exc:  # noqa: BLE001 - any exception here is the finding
        return [f"supports-claims|supports() accepts it, but the call raised {one_line(exc)}"]
    if "output" in checks:
        expected = run.q.shape[:-1] + (run.v.shape[-1],)
        if out.shape != expected or out.dtype != run.q.dtype or out.device != run.q.device:
            failures.append(f"output|returned {tuple(out.shape)} {out.dtype} on {out.device}, expected "
                            f"{tuple(expected)} {run.q.dtype} on {run.q.device}")
        elif not torch.isfinite(out).all():
            failures.append("output|non-finite values in the output")
    if "inputs-unchanged" in checks:
        after = [run.q, run.k, run.v] + ([run.attn_mask] if run.attn_mask is not None else [])
        for name, old, new in zip(("q", "k", "v", "attn_mask"), before, after):
            if not torch.equal(old, new.detach()):
                failures.append(f"inputs-unchanged|{name} was modified in place")
    if "determinism" in checks:
        fresh = make_inputs(problem, SEED)  # the same seeded inputs, untouched even if the first call mutated its own
        with torch.no_grad():
            first, second = _call(variant, problem, fresh, params), _call(variant, problem, fresh, params)
        if not torch.equal(first, second):
            diff = (first.double() - second.double()).abs().max().item()
            failures.append(f"determinism|two calls on the same inputs differ (max abs difference {diff:.2e})")
    if "correctness" in checks and variant.exact and out.shape == run.q.shape[:-1] + (run.v.shape[-1],):
        err = relative_error(out, reference_output(problem, SEED))
        if not err <= TOLERANCE[problem.dtype]:
            failures.append(f"correctness|relative error {err:.2e} against float64 attention, above "
                            f"{TOLERANCE[problem.dtype]:g} for {problem.dtype}")
    if "backward" in checks and problem.training:
        failures += _check_backward(variant, problem, run, out)
    return failures


def _check_backward(variant: Variant, problem: Problem, run: Inputs, out: Tensor) -> list[str]:
    if not out.requires_grad:
        return ["backward|supports() accepts training, but the output does not require grad"]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    try:
        grads = torch.autograd.grad(out, (run.q, run.k, run.v), grad_out, allow_unused=True)
    except Exception as exc:  # noqa: BLE001
        return [f"backward|the backward pass raised {one_line(exc)}"]
    failures = []
    for name, grad in zip("qkv", grads):
        if grad is None or not torch.isfinite(grad).all():
            failures.append(f"backward|d{name} is {'missing' if grad is None else 'not finite'}")
    if failures or not variant.exact:
        return failures
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (run.q, run.k, run.v)]
    from attn_tune.families.dense import dense_attention

    ref = dense_attention(*leaves, **run.call_kwargs(problem))
    want = torch.autograd.grad(ref, leaves, grad_out.to(torch.float64))
    for name, got, expected in zip("qkv", grads, want):
        err = relative_error(got, expected)
        if not err <= GRAD_TOLERANCE[problem.dtype]:
            failures.append(f"backward|d{name} is {err:.2e} from float64's gradient")
    return failures


def _check_refused(variant: Variant, problem: Problem, params: dict[str, Any]) -> list[str]:
    """Called anyway on a problem it refuses: UnsupportedProblem, or (exact variants) a correct answer."""
    run = make_inputs(problem, SEED)
    try:
        with torch.set_grad_enabled(problem.training):
            out = _call(variant, problem, run, params)
    except UnsupportedProblem:
        return []
    except Exception as exc:  # noqa: BLE001
        return [f"supports-refusals|refused, and the call raised {one_line(exc)} instead of UnsupportedProblem"]
    if not variant.exact:
        return ["supports-refusals|refused, yet the call returned a result instead of raising UnsupportedProblem"]
    if out.shape != run.q.shape[:-1] + (run.v.shape[-1],) or out.dtype != run.q.dtype:
        return [f"supports-refusals|refused, yet returned {tuple(out.shape)} {out.dtype}"]
    err = relative_error(out, reference_output(problem, SEED))
    if not err <= TOLERANCE[problem.dtype]:
        return [f"supports-refusals|refused, yet returned a wrong answer (relative error {err:.2e}) instead of "
                f"raising UnsupportedProblem"]
    return []


def _check_space(variant: Variant, problem: Problem) -> list[str]:
    from optuna.distributions import BaseDistribution

    try:
        space = variant.space(problem)
    except Exception as exc:  # noqa: BLE001
        return [f"space|space() raised {one_line(exc)}"]
    if not isinstance(space, dict) or not all(isinstance(d, BaseDistribution) for d in space.values()):
        return ["space|space() must return a dict of optuna distributions"]
    failures = []
    run = make_inputs(problem, SEED)
    for params in sample_params(variant, problem, count=SPACE_SAMPLES, seed=1):
        try:
            with torch.no_grad():
                out = _call(variant, problem, run, params)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"space|sampled knobs {params} raised {one_line(exc)}")
            continue
        if not torch.isfinite(out).all():
            failures.append(f"space|sampled knobs {params} gave non-finite output")
        elif variant.exact and not relative_error(out, reference_output(problem, SEED)) <= TOLERANCE[problem.dtype]:
            failures.append(f"space|sampled knobs {params} gave a wrong answer for an exact variant")
    return failures


@dataclass(frozen=True)
class Case:
    """One (variant, problem) conformance case; `run()` raises AssertionError with one line per finding."""

    variant: Variant
    problem: Problem
    checks: tuple[str, ...] = CHECKS

    def findings(self) -> list[Finding]:
        return _findings(self.variant, self.problem, set(self.checks))

    def run(self) -> None:
        found = self.findings()
        if found:
            raise AssertionError("\n".join(str(f) for f in found))

    def __str__(self) -> str:
        return f"{self.variant.name}-{self.problem.describe().replace(' ', '-')}"


def _findings(variant: Variant, problem: Problem, checks: set[str]) -> list[Finding]:
    try:
        reason = variant.supports(problem)
    except Exception as exc:  # noqa: BLE001
        return [Finding(variant.name, "supports-claims", problem, f"supports() raised {one_line(exc)}")]
    try:
        params = sample_params(variant, problem)[0]
    except Exception as exc:  # noqa: BLE001
        return [Finding(variant.name, "space", problem, f"space() is not usable: {one_line(exc)}")]
    if reason is not None:
        messages = _check_refused(variant, problem, params) if "supports-refusals" in checks else []
    else:
        messages = _check_supported(variant, problem, params, checks)
        if "space" in checks and not problem.training and problem.dtype == "float32":
            messages += _check_space(variant, problem)
    findings = []
    for message in messages:
        check, text = message.split("|", 1)
        if check in checks:
            findings.append(Finding(variant.name, check, problem, text))
    return findings


def _refusal(variant: Variant, problem: Problem) -> str | None:
    """supports()'s refusal; None when it claims the problem (or raises, which the kit reports as a finding)."""
    try:
        return variant.supports(problem)
    except Exception:  # noqa: BLE001
        return None


def runnable_problems(variant: Variant, problems: Sequence[Problem], device: str = "cpu") -> list[Problem]:
    """The problems the variant claims, which the kit runs it on (the others only check its refusal).

    Raises:
        UnsupportedProblem: it is unavailable here (with the import or kernel-load error), or it claims none of
            them: nothing could be checked on this device.
    """
    unavailable = availability(variant)
    if unavailable is not None:
        raise UnsupportedProblem(f"{variant.name} is unavailable here: {unavailable}")
    refusals = [_refusal(variant, p) for p in problems]
    if problems and all(refusals):
        raise UnsupportedProblem(f"{variant.name} supports none of the {len(problems)} conformance problems on "
                                 f"{device} ({refusals[0]}): nothing could be checked here")
    return [p for p, refusal in zip(problems, refusals) if refusal is None]


def conformance_cases(
    variant: Variant, device: str = "cpu", problems: Sequence[Problem] | None = None,
    checks: Iterable[str] = CHECKS,
) -> list[Case]:
    """One `Case` per problem, for `pytest.mark.parametrize("case", conformance_cases(v), ids=str)`."""
    checks = tuple(checks)
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; the checks are {', '.join(CHECKS)}")
    return [Case(variant, p, checks) for p in (problems if problems is not None else conformance_problems(device))]


def check_variant(
    variant: Variant, device: str = "cpu", problems: Sequence[Problem] | None = None,
    checks: Iterable[str] = CHECKS, on_case: Callable[[Case], None] | None = None,
) -> list[Finding]:
    """Every finding of the kit for `variant`: [] when it conforms. Raises UnsupportedProblem if the variant is
    unavailable here (its kernels or modules are missing) or supports none of the problems on this device, since
    then nothing can be checked: a kit that ran nothing never says "conforms"."""
    malformed = malformed_reason(variant)
    if malformed is not None:
        return [Finding(getattr(variant, "name", "?"), "output", None, f"not a usable Variant: {malformed}")]
    problems = list(problems if problems is not None else conformance_problems(device))
    runnable_problems(variant, problems, device)
    findings: list[Finding] = []
    for case in conformance_cases(variant, device, problems, checks):
        findings += case.findings()
        if on_case is not None:
            on_case(case)
    return findings
