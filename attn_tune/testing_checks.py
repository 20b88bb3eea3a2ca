"""The per-problem checks of the conformance kit: run a variant on one problem, return "check|message" strings.

Private to `attn_tune.testing`, which turns them into `Finding`s and is the module to import from.
"""

from __future__ import annotations

from typing import Any

import optuna
import torch
from torch import Tensor

from attn_tune.errors import UnsupportedProblem, one_line
from attn_tune.measurement.inputs import make_inputs, reference_output, relative_error
from attn_tune.problem import Inputs, Problem
from attn_tune.registry.space import quiet_optuna, suggest
from attn_tune.registry.variant import Variant

TOLERANCE: dict[str, float] = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
GRAD_TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 3e-2}
SPACE_SAMPLES = 6
SEED = 0  # of the inputs every check draws: the same numbers in every check, so a finding can be reproduced


def sample_params(variant: Variant, problem: Problem, count: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """`count` knob settings drawn from the variant's space exactly as the tuner draws them (seeded)."""
    with quiet_optuna():
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        return [suggest(study.ask(), problem, [variant])[1] for _ in range(count)]


def _call(variant: Variant, problem: Problem, inputs: Inputs, params: dict[str, Any]) -> Tensor:
    return variant.fn(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem), **params)


def check_supported(variant: Variant, problem: Problem, params: dict[str, Any], checks: set[str]) -> list[str]:
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


def check_refused(variant: Variant, problem: Problem, params: dict[str, Any]) -> list[str]:
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


def check_space(variant: Variant, problem: Problem) -> list[str]:
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
