"""Recording the attention problems a model asks for (a shapes file for `attn-tune tune --shapes`) and, on request,
the real q, k, v of a few of its calls (an activations file for `--activations`)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import sys
from typing import Any, Callable, Iterator

from attn_tune.errors import AttnTuneError, users_code
from attn_tune.outputs import first_tensor, loss_tensor
from attn_tune.problem import Inputs, Problem
from attn_tune.runtime import dispatch
from attn_tune.runtime.patch import patch_sdpa
from attn_tune.tuned_config import write_atomically

__all__ = ["record", "observe", "capture_factory", "capture_activations", "load_factory", "call_factory",
           "save_shapes", "CaptureError", "ModelRun", "NO_CALLS"]


NO_CALLS = ("made no attention call attn-tune could see (neither attn_tune.attention nor "
            "torch.nn.functional.scaled_dot_product_attention looked up at call time; a module that imported the "
            "function by name keeps PyTorch's)")


class CaptureError(AttnTuneError):
    """MODULE:FACTORY cannot be imported or called, or does not return (model, example_inputs)."""


@contextlib.contextmanager
def observe(observer: Callable[[dispatch.Call], None]) -> Iterator[None]:
    """Show every `attn_tune.attention` call inside the block (a problem describes) to `observer`, after it ran."""
    dispatch._observers.append(observer)
    try:
        yield
    finally:
        dispatch._observers.remove(observer)


@contextlib.contextmanager
def counting_calls(heard: Callable[[int], None]) -> Iterator[None]:
    """`heard(n)` after each attention call inside the block, n counting from 1: progress for a long capture."""
    count = 0

    def one_more(call: dispatch.Call) -> None:
        nonlocal count
        count += 1
        heard(count)

    with observe(one_more):
        yield


@contextlib.contextmanager
def record() -> Iterator[list[Problem]]:
    """Collect the distinct problems `attn_tune.attention` is called with inside the block, in first-seen order."""
    seen: list[Problem] = []
    distinct: list[Problem] = []
    try:
        with observe(lambda call: seen.append(call.problem)):
            yield distinct
    finally:
        distinct.extend(dict.fromkeys(seen))


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by 'package.module:function'; the current directory is importable, as for `python -m`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CaptureError(f"expected MODULE:FACTORY (e.g. attn_tune.models:encoder_example), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module, reported in one line
        raise CaptureError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CaptureError(f"{module_name} has no callable {attr!r}")
    return factory


class ModelRun:
    """A factory's model ready to run on its example inputs (call it), and the targets its loss is computed against;
    with several held-out batches, `batches` of them (`run(i)` runs batch i, calling the object runs the first)."""

    def __init__(self, model: Any, inputs: Any, targets: Any = None, metric: Callable[[Any, Any], float] | None = None
                 ) -> None:
        self.model, self.metric = model, metric
        self.batches: list[tuple[tuple, dict, Any]] = [(*_arguments(inputs), targets)]

    @classmethod
    def several(cls, model: Any, inputs: list[Any], targets: list[Any] | None,
                metric: Callable[[Any, Any], float] | None = None) -> ModelRun:
        """One model, several batches: inputs[i] with targets[i]."""
        run = cls(model, inputs[0], None if targets is None else targets[0], metric)
        run.batches = [(*_arguments(x), None if targets is None else t)
                       for x, t in zip(inputs, targets if targets is not None else [None] * len(inputs))]
        return run

    @property
    def targets(self) -> Any:
        return self.batches[0][2]

    def __call__(self) -> Any:
        """One forward on the first batch, unchanged model: its `F.scaled_dot_product_attention` calls reach
        attn-tune (patched for the call only), as its `attn_tune.attention` calls do."""
        return self.run(0)

    def run(self, batch: int) -> Any:
        args, kwargs, _ = self.batches[batch]
        with patch_sdpa():
            return self.model(*args, **kwargs)


def _arguments(inputs: Any) -> tuple[tuple, dict]:
    import torch

    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    return tuple(inputs), {}


def takes_batches(factory: Callable[..., Any]) -> bool:
    """Whether `factory` has a `batches` parameter, so it can give several held-out batches."""
    try:
        return "batches" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def call_factory(factory: Callable[..., Any], batches: int = 1) -> ModelRun:
    """Call `factory()`: it returns (model, example_inputs), (model, example_inputs, targets) or (model,
    example_inputs, targets, metric), metric(outputs, targets) -> a number, higher is better (an accuracy).

    `example_inputs` is a tuple of positional arguments, a dict of keyword arguments, or a single tensor. For
    `batches` > 1 the factory must take a `batches` parameter: `factory(batches=N)` returns (model, [inputs] * N)
    or (model, [inputs] * N, [targets] * N), N held-out batches.
    """
    if batches > 1:
        if not takes_batches(factory):
            raise CaptureError(f"{getattr(factory, '__name__', 'the factory')} takes no `batches` parameter, so it "
                               f"gives one batch: add `batches` and return a list of {batches} inputs (and targets)")
        result = factory(batches=batches)
    else:
        result = factory()
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3, 4):
        raise CaptureError("the factory must return (model, example_inputs), (model, example_inputs, targets) or "
                           f"(model, example_inputs, targets, metric), got {type(result).__name__}")
    if len(result) == 4 and not callable(result[3]):
        raise CaptureError(f"the factory's metric is a {type(result[3]).__name__}, not a function of (outputs, "
                           "targets)")
    if not callable(result[0]):
        raise CaptureError(f"the factory's model is a {type(result[0]).__name__}, not something to call")
    if batches == 1:
        return ModelRun(*result)
    inputs, targets = result[1], result[2] if len(result) >= 3 else None
    if not isinstance(inputs, list) or len(inputs) != batches or (targets is not None and (
            not isinstance(targets, list) or len(targets) != batches)):
        raise CaptureError(f"asked for {batches} batches, the factory must return lists of {batches} inputs "
                           "(and targets)")
    return ModelRun.several(result[0], inputs, targets, result[3] if len(result) == 4 else None)


def _run(built: ModelRun, training: bool) -> None:
    import torch

    built.model.train(training)
    with torch.set_grad_enabled(training):
        out = built()
        if training:
            _training_loss(out, built.targets).backward()


def _training_loss(out: Any, targets: Any) -> Any:
    """What a captured training step runs backward from, so each call's gradient is the one training feeds it: the
    model's own `loss`, else its loss against the factory's targets (as `validate` computes it), else (no loss to
    be had) the mean square of its first output that requires grad."""
    loss, _ = users_code("the model's loss against its targets", lambda: loss_tensor(out, targets))
    if loss is not None:
        if not loss.requires_grad:
            raise CaptureError("the model's loss does not require grad, so a training step cannot run backward")
        return loss
    loss_from = first_tensor(out, wanted=lambda t: t.requires_grad)
    if loss_from is None:
        raise CaptureError("the model's output holds no tensor to run backward from")
    return loss_from.float().square().mean()


def _on_gradient(out: Any, store: Callable[[Any], None]) -> None:
    """Call `store(grad)` with the gradient that reaches `out` in backward (never, if `out` is off the loss's path).

    A 3-D call is shown to observers through `out.unsqueeze(1)`, a view nothing downstream uses: its gradient is
    the one reaching the node that made the model's own tensor, read there (and given the shown layout)."""
    node = out.grad_fn
    if out.shape[1] == 1 and type(node).__name__ == "UnsqueezeBackward0" and node.next_functions[0][0] is not None:
        made, index = node.next_functions[0]

        def before(grads: tuple) -> None:
            if grads[index] is not None:
                store(grads[index].unsqueeze(1))

        made.register_prehook(before)
    else:
        out.register_hook(store)


def _gradient_keeper(samples: list[Inputs], at: int) -> Callable[[Any], None]:
    """Stores a gradient into `samples[at]` as its `grad_out`: a detached CPU copy in the call's dtype."""
    def store(grad: Any) -> None:
        sample = samples[at]
        samples[at] = dataclasses.replace(sample, grad_out=grad.detach().to("cpu", sample.q.dtype, copy=True))

    return store


def capture_factory(factory: Callable[[], Any], training: bool = False) -> list[Problem]:
    """Build the factory's model, run one forward (and backward when `training`), return the problems it asked."""
    built = call_factory(factory)
    with record() as problems:
        _run(built, training)
    return problems


def spread(count: int, samples: int) -> list[int]:
    """`samples` call numbers out of `count`, evenly spread from the first to the last (all when fewer)."""
    if samples >= count:
        return list(range(count))
    if samples == 1:
        return [count // 2]
    return sorted({round(i * (count - 1) / (samples - 1)) for i in range(samples)})


def capture_activations(factory: Callable[[], Any], samples: int, training: bool = False
                        ) -> tuple[list[Problem], dict[Problem, list[Inputs]]]:
    """The problems, and for each the q, k, v (and mask) of `samples` of its calls spread across the model's layers.

    Runs the model twice (the same inputs): once to count each problem's calls, once to copy the chosen ones,
    so that only what is kept is ever held. With `training`, each run is a training step (`_training_loss`'s
    backward) and a kept call also keeps `grad_out`, the gradient that reached its output (None if none did).
    """
    if samples < 1:
        raise CaptureError(f"samples must be positive, got {samples}")
    built = call_factory(factory)
    calls: dict[Problem, int] = {}

    def count(call: dispatch.Call) -> None:
        calls[call.problem] = calls.get(call.problem, 0) + 1

    with observe(count):
        _run(built, training)
    wanted = {problem: set(spread(n, samples)) for problem, n in calls.items()}
    seen: dict[Problem, int] = {}
    kept: dict[Problem, list[Inputs]] = {problem: [] for problem in calls}

    def keep(call: dispatch.Call) -> None:
        number = seen.get(call.problem, 0)
        seen[call.problem] = number + 1
        if number in wanted.get(call.problem, ()):
            shown = call.inputs
            copy = [None if t is None else t.detach().to("cpu", copy=True) for t in (shown.q, shown.k, shown.v, shown.attn_mask)]
            samples_of = kept[call.problem]
            samples_of.append(Inputs(*copy, scale=shown.scale, call=number))
            if training and call.out.requires_grad:
                _on_gradient(call.out, _gradient_keeper(samples_of, len(samples_of) - 1))

    with observe(keep):
        _run(built, training)
    return list(calls), kept


def save_shapes(problems: list[Problem], path: str | os.PathLike, source: str = "") -> None:
    """Write the problems in the `--shapes` format `attn-tune tune` reads ({"problems": [...]}), atomically."""
    data = {"format": "attn-tune/shapes", "version": 1, "source": source, "problems": [p.to_dict() for p in problems]}
    write_atomically(path, json.dumps(data, indent=2) + "\n")
