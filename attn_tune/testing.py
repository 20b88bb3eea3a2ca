"""The conformance kit: checks any `Variant` keeps the contract of DESIGN section 2, for plugin authors' own tests.

    from attn_tune.testing import check_variant, conformance_cases
    findings = check_variant(my_variant)                 # [] when it conforms; else one readable line each

    @pytest.mark.parametrize("case", conformance_cases(my_variant), ids=str)
    def test_conformance(case):
        case.run()                                       # AssertionError naming the check and the problem

Over small problems (causal, window, grouped-query heads, kv_len != q_len, explicit masks, padded batches, float32 and
bfloat16, training) it checks, per check name:
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
from typing import Callable, Iterable, Sequence

from attn_tune.errors import InvalidProblem, UnsupportedProblem, one_line
from attn_tune.problem import Problem
from attn_tune.registry.catalog import availability
from attn_tune.registry.variant import Variant, malformed_reason
from attn_tune.testing_checks import TOLERANCE, check_refused, check_space, check_supported, sample_params

__all__ = [
    "CHECKS", "TOLERANCE", "Finding", "Case", "conformance_problems", "conformance_cases", "check_variant",
    "sample_params", "runnable_problems", "padded_problems",
]

CHECKS: tuple[str, ...] = (
    "output", "correctness", "determinism", "inputs-unchanged", "supports-claims", "supports-refusals", "backward",
    "space",
)


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
    """The small problems the kit runs: every masking kind (padded batches too), GQA, unequal lengths, two dtypes, and
    training."""
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
    return problems + padded_problems(device)


def padded_problems(device: str = "cpu") -> list[Problem]:
    """Padded batches (`key_padding`): three rows, padded on the left, the right and the left (`make_inputs`), causal
    or not, with and without a window, GQA, unequal lengths once, bfloat16 once, training twice."""
    cases = (  # causal, window, kv_heads, q_len, kv_len, dtype, training
        (False, None, 4, 33, 33, "float32", False), (True, None, 2, 33, 33, "float32", False),
        (True, 5, 2, 33, 33, "float32", False), (False, 5, 4, 33, 33, "float32", False),
        (True, None, 2, 17, 40, "bfloat16", False), (True, None, 2, 24, 24, "float32", True),
        (False, 5, 2, 24, 24, "float32", True),
    )
    return [Problem(batch=3, heads=4, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=16, dtype=dtype,
                    device=device, causal=causal, window=window, mask=True, key_padding=True, training=training)
            for causal, window, kv_heads, q_len, kv_len, dtype, training in cases]




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
        messages = check_refused(variant, problem, params) if "supports-refusals" in checks else []
    else:
        messages = check_supported(variant, problem, params, checks)
        if "space" in checks and not problem.training and problem.dtype == "float32":
            messages += check_space(variant, problem)
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
