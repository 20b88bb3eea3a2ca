"""Recording the attention problems a model asks for, as a shapes file for `attn-tune tune --shapes`."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from typing import Any, Callable, Iterator

from attn_tune.errors import AttnTuneError
from attn_tune.problem import Problem
from attn_tune.runtime import dispatch
from attn_tune.tuned_config import write_atomically

__all__ = ["record", "capture_factory", "load_factory", "save_shapes", "CaptureError"]


class CaptureError(AttnTuneError):
    """MODULE:FACTORY cannot be imported or called, or does not return (model, example_inputs)."""


@contextlib.contextmanager
def record() -> Iterator[list[Problem]]:
    """Collect the distinct problems `attn_tune.attention` is called with inside the block, in first-seen order."""
    seen: list[Problem] = []
    dispatch._recorders.append(seen)
    distinct: list[Problem] = []
    try:
        yield distinct
    finally:
        dispatch._recorders.remove(seen)
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


def capture_factory(factory: Callable[[], Any], training: bool = False) -> list[Problem]:
    """Build (model, example_inputs) with `factory`, run one forward (and backward when `training`), record.

    `example_inputs` is a tuple of positional arguments, a dict of keyword arguments, or a single tensor.
    """
    import torch

    try:
        model, inputs = factory()
    except (TypeError, ValueError) as exc:
        raise CaptureError(f"the factory must return (model, example_inputs): {exc}") from None
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {}) if isinstance(inputs, torch.Tensor) else (tuple(inputs), {})
    model.train(training)
    with record() as problems, torch.set_grad_enabled(training):
        out = model(*args, **kwargs)
        if training:
            loss = _first_tensor(out)
            loss.float().square().mean().backward()
    return problems


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else vars(out).values()
    for value in values:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return value
    raise CaptureError("the model's output holds no tensor to run backward from")


def save_shapes(problems: list[Problem], path: str | os.PathLike, source: str = "") -> None:
    """Write the problems in the `--shapes` format `attn-tune tune` reads ({"problems": [...]}), atomically."""
    data = {"format": "attn-tune/shapes", "version": 1, "source": source, "problems": [p.to_dict() for p in problems]}
    write_atomically(path, json.dumps(data, indent=2) + "\n")
