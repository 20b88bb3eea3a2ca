"""The exception hierarchy: one base, specific subclasses, each with a one-line message."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")

__all__ = [
    "AttnTuneError",
    "InvalidProblem",
    "UnsupportedProblem",
    "UnknownVariant",
    "UnavailableDevice",
    "UsersCodeError",
    "CausalHintWithoutMask",
    "one_line",
    "users_code",
]


class AttnTuneError(Exception):
    """Base of every error attn-tune raises on purpose."""


class InvalidProblem(AttnTuneError, ValueError):
    """A problem that cannot exist: non-positive sizes, heads not divisible by kv_heads, unknown dtype."""


class UnsupportedProblem(AttnTuneError):
    """A variant was asked to compute something it does not support; the message says why."""


class UnknownVariant(AttnTuneError, KeyError):
    """No registered variant has that name; the message lists close names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnavailableDevice(AttnTuneError):
    """The problem names a device this machine does not have."""


class UsersCodeError(AttnTuneError):
    """The user's factory, model or metric raised: the message names it and its error in one line."""


def users_code(label: str, run: Callable[[], T]) -> T:
    """Run the user's factory, model or metric (named `label`): its own failure becomes one line, not a traceback;
    attn-tune's own errors pass as they are."""
    try:
        return run()
    except AttnTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code failed
        raise UsersCodeError(f"{label} raised {one_line(exc)}") from None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line, "Type: message" (whitespace folded, at most `limit` characters of message): how a
    failed plugin, variant or trial is reported wherever attn-tune records a failure instead of raising it."""
    text = " ".join(str(exc).split())[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class CausalHintWithoutMask(UsersCodeError, RuntimeError):
    """nn.MultiheadAttention got is_causal=True without attn_mask inside `patch_sdpa` (PyTorch's slow path needs the
    mask): the user's call, so a RuntimeError as PyTorch's own, and exit 1 from the CLI as the user's code failing."""
