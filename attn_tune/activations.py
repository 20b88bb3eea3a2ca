"""The activations file: real q, k, v (and mask) of a few attention calls per problem, in safetensors.

Written by `attn-tune capture --activations`, read by `attn-tune tune --activations` to measure each candidate's
error on what the model really computes. Tensors are named `p{problem}/s{sample}/{q,k,v,attn_mask,grad_out}`
(`grad_out`, the gradient that reached the call's output, only from a training capture; files without it read as
before); the metadata holds the format, the problems (as in a shapes file) and each sample's scale and call number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from attn_tune.errors import AttnTuneError, InvalidProblem
from attn_tune.problem import Inputs, Problem
from attn_tune.tuned_config import write_atomically

__all__ = ["FORMAT", "VERSION", "ActivationsError", "save_activations", "load_activations",
           "check_against", "describe_inputs"]

FORMAT, VERSION = "attn-tune/activations", 1


class ActivationsError(AttnTuneError):
    """An activations file that is missing, not safetensors, of another format, or not matching its problems."""


def describe_inputs(samples: Iterable[Inputs] | None) -> str:
    """What an entry's error was measured on: "captured: N calls", then " with gradients" when every call carries
    the gradient that reached it in a training capture (" (M with gradients)" when M do), or "random"."""
    kept = list(samples or ())
    if not kept:
        return "random"
    text = f"captured: {len(kept)} call{'s' if len(kept) != 1 else ''}"
    graded = sum(s.grad_out is not None for s in kept)
    if graded == len(kept):
        return f"{text} with gradients"
    return f"{text} ({graded} with gradients)" if graded else text


def save_activations(path: str | os.PathLike, samples: Mapping[Problem, list[Inputs]], source: str = "") -> None:
    """Write the samples of each problem to `path` (safetensors, contiguous CPU copies), atomically."""
    from safetensors.torch import save

    tensors, problems = {}, []
    for i, (problem, kept) in enumerate(samples.items()):
        problems.append({"problem": problem.to_dict(), "samples": [{"scale": s.scale, "call": s.call} for s in kept]})
        for j, s in enumerate(kept):
            for name in ("q", "k", "v", "attn_mask", "grad_out"):
                tensor = getattr(s, name)
                if tensor is not None:
                    tensors[f"p{i}/s{j}/{name}"] = tensor.detach().to("cpu").contiguous()
    metadata = {"format": FORMAT, "version": str(VERSION), "source": source, "problems": json.dumps(problems)}
    write_atomically(path, save(tensors, metadata=metadata))


def load_activations(path: str | os.PathLike) -> dict[Problem, list[Inputs]]:
    """Read an activations file; every sample's tensors are checked against its problem's shapes and dtype.

    Raises:
        ActivationsError: missing, unreadable, not safetensors, another format or a newer version, or tensors
            that do not match their problem (one line).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ActivationsError(f"activations file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a file that is not one
        raise ActivationsError(f"{path} is not a safetensors file ({' '.join(str(exc).split())[:120]})") from None
    if metadata.get("format") != FORMAT:
        raise ActivationsError(f"{path} is not an attn-tune activations file (format {metadata.get('format')!r}; "
                               "make one with `attn-tune capture --activations`)")
    if not metadata.get("version", "").isdigit() or int(metadata["version"]) > VERSION:
        raise ActivationsError(f"{path} is activations version {metadata.get('version')!r}; this attn-tune reads "
                               f"version {VERSION} (upgrade attn-tune)")
    try:
        listed = json.loads(metadata["problems"])
        return {Problem.from_dict(item["problem"]): [_sample(tensors, i, j, Problem.from_dict(item["problem"]), s)
                                                     for j, s in enumerate(item["samples"])]
                for i, item in enumerate(listed)}
    except (KeyError, TypeError, ValueError, json.JSONDecodeError, InvalidProblem) as exc:
        raise ActivationsError(f"{path}: malformed activations ({type(exc).__name__}: {exc})") from None


def _sample(tensors: dict[str, Any], i: int, j: int, problem: Problem, meta: dict[str, Any]) -> Inputs:
    def get(name: str) -> Any:
        return tensors.get(f"p{i}/s{j}/{name}")

    q, k, v, mask, grad_out = get("q"), get("k"), get("v"), get("attn_mask"), get("grad_out")
    expected = {"q": (problem.batch, problem.heads, problem.q_len, problem.head_dim),
                "k": (problem.batch, problem.n_kv_heads, problem.n_kv_len, problem.head_dim),
                "v": (problem.batch, problem.n_kv_heads, problem.n_kv_len, problem.head_dim),
                "grad_out": (problem.batch, problem.heads, problem.q_len, problem.head_dim)}
    for name, tensor in (("q", q), ("k", k), ("v", v), ("grad_out", grad_out)):
        if tensor is None:
            if name == "grad_out":  # optional: a forward capture, a call off the loss's path, or an older file
                continue
            raise ValueError(f"sample {j} of {problem.describe()} has no {name}")
        if tuple(tensor.shape) != expected[name] or str(tensor.dtype).removeprefix("torch.") != problem.dtype:
            raise ValueError(f"sample {j} of {problem.describe()}: {name} is {tuple(tensor.shape)} "
                             f"{str(tensor.dtype).removeprefix('torch.')}, not {expected[name]} {problem.dtype}")
    if problem.mask != (mask is not None):
        raise ValueError(f"sample {j} of {problem.describe()}: a mask {'missing' if problem.mask else 'not expected'}")
    return Inputs(q, k, v, mask, meta.get("scale"), int(meta.get("call", j)), grad_out)


def check_against(activations: Mapping[Problem, list[Inputs]], problems: Iterable[Problem], path: Any,
                  shapes_label: str = "the problems tuned") -> None:
    """Every problem the activations hold must be one of `problems`: else the two files were not captured together.

    Raises:
        ActivationsError: naming the first problem that does not match.
    """
    wanted = set(problems)
    for problem in activations:
        if problem not in wanted:
            raise ActivationsError(f"{path} has activations for {problem.describe()}, which is not among "
                                   f"{shapes_label}: were they captured together?")
