"""Training problems: every variant's dq, dk, dv against float64 autograd; measure() reports the worst of the output
and the three gradients; a training capture keeps the gradient that reached each sampled call's output."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import attn_tune
from attn_tune import Problem, UnsupportedProblem
from attn_tune.activations import describe_inputs, load_activations, save_activations
from attn_tune.families.dense import dense_attention
from attn_tune.measurement.inputs import (
    exact_attention, exact_gradients, grad_output, make_inputs, reference_gradients,
)
from attn_tune.measurement.measure import Measurement, measure
from attn_tune.models import CausalLM
from attn_tune.registry.catalog import availability, variants
from attn_tune.registry.variant import Variant
from attn_tune.runtime.capture import capture_activations, observe
from attn_tune.testing_checks import sample_params
from tests.oracle import oracle

pytestmark = pytest.mark.usefixtures("no_config")

FAST = dict(warmup=1, min_repeats=2, max_repeats=3, min_time_s=0.0)
SEED = 5  # not measure()'s default 0: these inputs are drawn for the test alone
SMALL = dict(batch=1, heads=4, q_len=64, head_dim=16, training=True)
PROBLEMS = [
    Problem(**SMALL, kv_len=80),
    Problem(**SMALL, causal=True),
    Problem(**SMALL, kv_len=80, causal=True),
    Problem(**SMALL, kv_len=80, window=16),
    Problem(**SMALL, causal=True, window=16),
    Problem(**SMALL, causal=True, kv_heads=2),
    Problem(**SMALL, kv_len=80, mask=True),
]
PARTS = ("out", "dq", "dk", "dv")


def _cases() -> list:
    cases = []
    for variant in variants():
        if availability(variant) is not None:
            continue
        cases += [pytest.param(variant, problem, id=f"{variant.name}-{problem.describe()}")
                  for problem in PROBLEMS if variant.supports(problem) is None]
    return cases


def _oracle_gradients(inputs, problem: Problem, grad_out: torch.Tensor, **extra) -> tuple[torch.Tensor, ...]:
    """Float64 autograd through the tests' own oracle (no attn_tune code): out, dq, dk, dv."""
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (inputs.q, inputs.k, inputs.v)]
    out = oracle(*leaves, causal=problem.causal, window=problem.window, **{"mask": inputs.attn_mask, **extra})
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(torch.float64)))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want).norm() / want.norm())


def _variant_gradients(variant: Variant, problem: Problem, inputs, params: dict, grad_out: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().to(dtype).requires_grad_() for t in (inputs.q, inputs.k, inputs.v)]
    out = variant.fn(*leaves, **inputs.call_kwargs(problem), **params)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dtype)))


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.describe())
def test_the_float64_gradient_reference_is_the_oracles(problem: Problem) -> None:
    inputs = make_inputs(problem, SEED)
    grad_out = grad_output(problem, SEED)
    got = exact_gradients(inputs.q, inputs.k, inputs.v, grad_out, **inputs.call_kwargs(problem))
    forward = exact_attention(inputs.q, inputs.k, inputs.v, **inputs.call_kwargs(problem))
    assert torch.allclose(got.out, forward, rtol=0, atol=1e-12)  # the output reference's own figures
    for part, ours, want in zip(PARTS, got, _oracle_gradients(inputs, problem, grad_out)):
        assert ours.dtype == torch.float64 and bool(want.any()), part
        assert torch.allclose(ours, want, rtol=0, atol=1e-12), part
    assert bool(grad_out.any()) and grad_out.std() > 0.5  # fresh random, never zeros
    bias = torch.randn(problem.q_len, problem.n_kv_len)  # an additive float mask, and a scale
    got = exact_gradients(inputs.q, inputs.k, inputs.v, grad_out, is_causal=problem.causal, window=problem.window,
                          attn_mask=bias, scale=0.3)
    for part, ours, want in zip(PARTS, got, _oracle_gradients(inputs, problem, grad_out, mask=None, bias=bias,
                                                                     scale=0.3)):
        assert torch.allclose(ours, want, rtol=0, atol=1e-12), part


@pytest.mark.parametrize("variant, problem", _cases())
def test_every_variant_gradient_against_float64(variant: Variant, problem: Problem) -> None:
    """Exact variants: dq, dk, dv within 1e-4 of float64's in float32 (1e-10 in float64, where the variant takes
    float64 tensors). Approximate ones: finite gradients, and measure()'s rel_error is the worst of the four."""
    params = sample_params(variant, problem)[0]
    inputs = make_inputs(problem, SEED)
    grad_out = grad_output(problem, SEED)
    reference = exact_gradients(inputs.q, inputs.k, inputs.v, grad_out, **inputs.call_kwargs(problem))
    got = _variant_gradients(variant, problem, inputs, params, grad_out)
    errors = dict(zip(PARTS, (_rel(g, w) for g, w in zip(got, reference))))
    assert all(torch.isfinite(g).all() for g in got), errors
    if variant.exact:
        assert errors["out"] < 1e-5 and max(errors.values()) < 1e-4, errors
        try:
            got64 = _variant_gradients(variant, problem, inputs, params, grad_out, torch.float64)
        except Exception:  # noqa: BLE001 - a kernel without float64 (Problem has no float64; fn may still take it)
            got64 = None
        if got64 is not None:
            errors64 = [_rel(g, w) for g, w in zip(got64, reference)]
            assert max(errors64) < 1e-10, errors64
    measured = measure(variant, problem, params, seed=SEED, **FAST)
    worst = max(PARTS, key=errors.__getitem__)
    assert measured.rel_error == pytest.approx(errors[worst], rel=1e-6, abs=1e-12)
    if errors[worst] > 1e-3:  # parts within rounding of each other may swap
        assert measured.error_of == worst


def _scaled_dq(q, k, v, **kwargs):
    """dense attention whose forward is exact but whose backward gives 1.01 times the true dq."""

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    return dense_attention(ScaleGrad.apply(q), k, v, **kwargs)


WRONG_BACKWARD = Variant(name="wrong-backward", family="test", fn=_scaled_dq, exact=True)


def test_measure_catches_a_backward_that_is_wrong_where_the_forward_is_exact() -> None:
    problem = Problem(**SMALL, causal=True)
    forward_only = measure(WRONG_BACKWARD, dataclasses.replace(problem, training=False), **FAST)
    assert forward_only.rel_error < 1e-5 and forward_only.error_of is None
    training = measure(WRONG_BACKWARD, problem, **FAST)
    assert training.error_of == "dq" and training.rel_error == pytest.approx(0.01, rel=1e-3)
    exact = measure(attn_tune.get_variant("dense"), problem, **FAST)
    assert exact.rel_error < 1e-5 and exact.error_of in PARTS


def _no_grad_output(q, k, v, **kwargs):
    with torch.no_grad():
        return dense_attention(q, k, v, **kwargs)


def _backward_raises(q, k, v, **kwargs):
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no backward written\nfor this kernel")

    return dense_attention(NoBackward.apply(q), k, v, **kwargs)


@pytest.mark.parametrize("fn, reason", [(_no_grad_output, "does not require grad"),
                                        (_backward_raises, "backward raised RuntimeError: no backward written for")])
def test_a_variant_without_a_backward_is_one_unsupported_line(fn, reason: str) -> None:
    variant = Variant(name="forward-only", family="test", fn=fn, exact=True)
    problem = Problem(**SMALL)
    with pytest.raises(UnsupportedProblem, match=reason) as caught:
        measure(variant, problem, **FAST)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("forward-only: ")
    assert measure(variant, dataclasses.replace(problem, training=False), **FAST).rel_error < 1e-5


def test_measurement_error_of_is_stored_only_when_set() -> None:
    base = dict(latency_ms=1.0, latency_iqr_ms=0.1, peak_bytes=1, rel_error=1e-7, repeats=3)
    assert "error_of" not in Measurement(**base).to_dict()  # forward-only figures keep the keys they always had
    stored = json.loads(json.dumps(Measurement(**base, error_of="dk").to_dict()))
    assert Measurement(**stored) == Measurement(**base, error_of="dk")
    assert Measurement(**json.loads(json.dumps(Measurement(**base).to_dict()))) == Measurement(**base)


def test_the_random_gradient_reference_is_cached_per_problem_and_seed() -> None:
    problem = Problem(**SMALL, causal=True)
    assert reference_gradients(problem, SEED) is reference_gradients(problem, SEED)
    assert not torch.equal(reference_gradients(problem, SEED).dq, reference_gradients(problem, SEED + 1).dq)


# ---- capture: the gradient that reached each sampled call's output ----

LM_TRAINING = Problem(batch=1, heads=2, q_len=64, head_dim=16, causal=True, training=True)


def lm():
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (1, 65))
    return CausalLM(vocab_size=32, dim=32, depth=3, heads=2), (ids[:, :-1],), ids[:, 1:]


def lm_without_targets():
    return lm()[:2]


class OwnLoss(torch.nn.Module):
    """The LM returning its own loss (as Hugging Face models do given labels), and no targets from the factory."""

    def __init__(self) -> None:
        super().__init__()
        self.lm, (self.ids,), self.targets = lm()

    def forward(self, ids):
        logits = self.lm(ids)
        return {"logits": logits, "loss": 3 * torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                                                  self.targets.flatten())}


def own_loss():
    model = OwnLoss()
    return model, (model.ids,)


def _by_hand(factory, loss_of) -> list:
    """Every attention call of one training step run by hand, with the gradient autograd gives its output."""
    model, (ids, *_), *rest = factory()
    seen = []
    model.train()
    with observe(seen.append):
        out = model(ids)
    grads = torch.autograd.grad(loss_of(out, rest[0] if rest else None), [call.out for call in seen],
                                allow_unused=True)
    return list(zip(seen, grads))


def _ce(out, targets):
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("factory, loss_of", [
    (lm, _ce),  # the factory's targets: the model's real loss
    (own_loss, lambda out, _: out["loss"]),  # the model's own loss
    (lm_without_targets, lambda out, _: out.float().square().mean()),  # nothing to compute a loss from
], ids=["targets", "own-loss", "no-loss"])
def test_a_training_capture_keeps_each_calls_output_gradient(factory, loss_of) -> None:
    problems, kept = capture_activations(factory, samples=2, training=True)
    assert problems == [LM_TRAINING]
    samples = kept[LM_TRAINING]
    assert [s.call for s in samples] == [0, 2]
    by_hand = _by_hand(factory, loss_of)
    for sample in samples:
        call, grad = by_hand[sample.call]
        assert sample.grad_out is not None and sample.grad_out.shape == (1, 2, 64, 16)
        assert torch.allclose(sample.grad_out, grad, rtol=1e-5, atol=1e-9)
        for name in ("q", "k", "v"):  # the values the call saw, as detached copies
            kept_tensor = getattr(sample, name)
            assert torch.equal(kept_tensor, getattr(call.inputs, name).detach())
            assert not kept_tensor.requires_grad and kept_tensor.grad_fn is None
    assert not torch.allclose(samples[0].grad_out, samples[1].grad_out)  # each call's own gradient


def test_the_captured_gradient_is_the_real_loss_not_the_fallback() -> None:
    _, kept = capture_activations(lm, samples=1, training=True)
    sample = kept[LM_TRAINING][0]
    fallback = _by_hand(lm, lambda out, _: out.float().square().mean())[sample.call][1]
    assert not torch.allclose(sample.grad_out, fallback, rtol=1e-2)


class Branches(torch.nn.Module):
    """Three attention calls: the middle one's output is detached, so no gradient reaches it. The last runs on
    3-D (batch, length, dim) tensors, which observers see with a heads axis added."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.proj(x)
        a = attn_tune.attention(h, h, h, is_causal=True)
        b = attn_tune.attention(h + 1, h, h, is_causal=True).detach()
        c = attn_tune.attention(h.flatten(0, 1), h.flatten(0, 1), h.flatten(0, 1), is_causal=True)
        return a + b + 2 * c.view_as(a)


def branches():
    torch.manual_seed(0)
    return Branches(), (torch.randn(1, 2, 24, 16),)


def test_a_call_off_the_losss_path_keeps_no_gradient_and_a_3d_call_keeps_its_own() -> None:
    problems, kept = capture_activations(branches, samples=2, training=True)
    four_d = Problem(batch=1, heads=2, q_len=24, head_dim=16, causal=True, training=True)
    three_d = Problem(batch=2, heads=1, q_len=24, head_dim=16, causal=True, training=True)
    assert problems == [four_d, three_d]
    on_path, off_path = kept[four_d]
    assert on_path.grad_out is not None and off_path.grad_out is None
    by_hand = _by_hand(branches, lambda out, _: out.float().square().mean())
    assert torch.allclose(on_path.grad_out, by_hand[0][1], rtol=1e-5, atol=1e-9)
    (flat,) = kept[three_d]
    model, (x,) = branches()
    out = model(x).detach()
    # out = a + b + 2 * c.view_as(a) under mean(out^2): the 3-D output c gets 2 * 2 * out / out.numel()
    expected = (4 * out / out.numel()).flatten(0, 1).unsqueeze(1)
    assert flat.grad_out is not None and flat.grad_out.shape == (2, 1, 24, 16)
    assert torch.allclose(flat.grad_out, expected, rtol=1e-5, atol=1e-9)
    assert describe_inputs(kept[four_d]) == "captured: 2 calls (1 with gradients)"


def test_a_training_capture_round_trips_its_gradients_and_old_files_still_load(tmp_path: Path) -> None:
    _, kept = capture_activations(lm, samples=2, training=True)
    save_activations(tmp_path / "a.safetensors", kept, source="lm")
    loaded = load_activations(tmp_path / "a.safetensors")
    for before, after in zip(kept[LM_TRAINING], loaded[LM_TRAINING]):
        assert torch.equal(before.grad_out, after.grad_out) and after.call == before.call
    assert describe_inputs(loaded[LM_TRAINING]) == "captured: 2 calls with gradients"

    from safetensors.torch import save_file  # a file as attn-tune wrote it before gradients were kept

    sample = kept[LM_TRAINING][0]
    problems = [{"problem": LM_TRAINING.to_dict(), "samples": [{"scale": None, "call": 0}]}]
    save_file({f"p0/s0/{n}": getattr(sample, n).contiguous() for n in "qkv"}, str(tmp_path / "old.safetensors"),
              metadata={"format": "attn-tune/activations", "version": "1", "source": "",
                        "problems": json.dumps(problems)})
    (old,) = load_activations(tmp_path / "old.safetensors")[LM_TRAINING]
    assert old.grad_out is None and torch.equal(old.q, sample.q)
    assert describe_inputs([old]) == "captured: 1 call"


def test_measure_on_captured_training_calls_uses_each_calls_gradient(tmp_path: Path) -> None:
    """The error is the worst part over the captured calls, each with the gradient the model gave it (a call
    without one gets a seeded gradient), against float64 autograd of the oracle."""
    _, kept = capture_activations(lm, samples=2, training=True)
    samples = list(kept[LM_TRAINING])
    samples[1] = dataclasses.replace(samples[1], grad_out=None)
    path = tmp_path / "a.safetensors"
    save_activations(path, {LM_TRAINING: samples})
    local = attn_tune.get_variant("local")
    params = {"local_window": 16, "block": 16, "unfolded": False}
    measured = measure(local, LM_TRAINING, params, activations=path, **FAST)
    worst, part = 0.0, None
    for index, sample in enumerate(samples):
        grad_out = sample.grad_out if sample.grad_out is not None else grad_output(LM_TRAINING, seed=index)
        want = _oracle_gradients(sample, LM_TRAINING, grad_out)
        got = _variant_gradients(local, LM_TRAINING, sample, params, grad_out)
        for name, g, w in zip(PARTS, got, want):
            if _rel(g, w) > worst:
                worst, part = _rel(g, w), name
    assert measured.rel_error == pytest.approx(worst, rel=1e-6) and measured.error_of == part
    on_random = measure(local, LM_TRAINING, params, **FAST)
    assert on_random.rel_error != pytest.approx(measured.rel_error, rel=1e-3)
