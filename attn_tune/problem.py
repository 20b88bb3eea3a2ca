"""`Problem`: *what* attention computes (shapes, dtype, device, masking), never *how*; `Inputs`: one call's tensors."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attn_tune.errors import InvalidProblem, UnavailableDevice

if TYPE_CHECKING:
    import torch

__all__ = ["Problem", "Inputs", "DTYPES", "check_device"]

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
_DEVICE_RE = re.compile(r"^(cpu|cuda)(:\d+)?$")


@dataclass(frozen=True)
class Problem:
    """One attention computation: q is (batch, heads, q_len, head_dim), k/v are (batch, kv_heads, kv_len, head_dim).

    `window` w means query i sees keys j with |i - j| < w (with `causal`: 0 <= i - j < w). Causal masks are
    aligned top-left, as SDPA's `is_causal`. `key_padding` (with `mask`): the attn_mask is a (batch, 1, 1, kv_len)
    boolean mask of the real keys, read from the caller's mask (`attn_tune.mask_structure`); a query that sees no
    real key gets zeros, as SDPA gives. Invalid values raise `InvalidProblem` with a one-line reason.
    """

    batch: int
    heads: int
    q_len: int
    head_dim: int
    kv_len: int | None = None
    kv_heads: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = False
    window: int | None = None
    mask: bool = False
    training: bool = False
    key_padding: bool = False

    def __post_init__(self) -> None:
        reason = self._invalid_reason()
        if reason is not None:
            raise InvalidProblem(reason)

    def _invalid_reason(self) -> str | None:
        for name in ("batch", "heads", "q_len", "head_dim", "kv_len", "kv_heads", "window"):
            value = getattr(self, name)
            if value is None and name in ("kv_len", "kv_heads", "window"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{name} must be an integer, got {value!r}"
            if value < 1:
                return f"{name} must be positive, got {value}"
        if self.heads % self.n_kv_heads != 0:
            return f"heads ({self.heads}) must be a multiple of kv_heads ({self.n_kv_heads})"
        if self.dtype not in DTYPES:
            return f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}"
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            return f"unknown device {self.device!r}; use 'cpu', 'cuda' or 'cuda:N'"
        for name in ("causal", "mask", "training", "key_padding"):
            if not isinstance(getattr(self, name), bool):
                return f"{name} must be true or false, got {getattr(self, name)!r}"
        if self.key_padding and not self.mask:
            return "key_padding needs mask: the padding reaches the variant as its attn_mask"
        if self.window is not None and self.q_len >= self.n_kv_len + self.window:
            return (
                f"with window {self.window} and kv_len {self.n_kv_len}, queries from position "
                f"{self.n_kv_len + self.window - 1} on would see no key (q_len is {self.q_len})"
            )
        return None

    @property
    def n_kv_len(self) -> int:
        """Key/value length, resolving None to q_len."""
        return self.q_len if self.kv_len is None else self.kv_len

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads, resolving None to heads."""
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def device_type(self) -> str:
        """'cpu' or 'cuda', without the index."""
        return self.device.split(":", 1)[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by `dtype`."""
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        """A short human label: 'b1 h8 q1024 d64 float32 cpu causal'."""
        parts = [f"b{self.batch}", f"h{self.heads}"]
        if self.n_kv_heads != self.heads:
            parts.append(f"kvh{self.n_kv_heads}")
        parts.append(f"q{self.q_len}")
        if self.n_kv_len != self.q_len:
            parts.append(f"kv{self.n_kv_len}")
        parts += [f"d{self.head_dim}", self.dtype, self.device]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"window{self.window}")
        if self.key_padding:
            parts.append("padding")
        elif self.mask:
            parts.append("mask")
        if self.training:
            parts.append("training")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable; `key_padding` only when set, so files without padded problems still load
        in releases that predate the field."""
        data = dataclasses.asdict(self)
        if not self.key_padding:
            del data["key_padding"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Problem:
        """Build a problem from `to_dict` output; unknown or missing keys raise `InvalidProblem`."""
        if not isinstance(data, dict):
            raise InvalidProblem(f"a problem must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidProblem(f"unknown problem field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise InvalidProblem(f"incomplete problem: {exc}") from None


@dataclass(frozen=True)
class Inputs:
    """The tensors of one call of a problem: q, k, v in SDPA layout, its mask (boolean keep-mask or additive float)
    and scale. Seeded random inputs, captured activations and the calls the runtime shows observers are all this.

    `call` numbers a captured call among its problem's calls in one forward (0 = the first layer to ask).
    `grad_out` is the gradient that reached the call's output in a captured training step (None when none did), so
    that a training problem's gradient error is measured on what backward really feeds attention.
    """

    q: Any
    k: Any
    v: Any
    attn_mask: Any = None
    scale: float | None = None
    call: int = 0
    grad_out: Any = None

    def call_kwargs(self, problem: Problem) -> dict[str, Any]:
        """The keywords a variant's fn takes for this call of `problem`."""
        return {"is_causal": problem.causal, "window": problem.window, "attn_mask": self.attn_mask, "scale": self.scale}

    def to(self, device: Any) -> Inputs:
        """The same call with its tensors on `device`."""
        moved = {name: None if getattr(self, name) is None else getattr(self, name).to(device)
                 for name in ("q", "k", "v", "attn_mask", "grad_out")}
        return dataclasses.replace(self, **moved)


def check_device(device: str) -> None:
    """Raise `UnavailableDevice` with a one-line reason if this machine lacks `device`."""
    import torch

    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise UnavailableDevice(
            f"device {device!r} asked for, but this machine has no usable CUDA device "
            f"(torch {torch.__version__})"
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise UnavailableDevice(f"device {device!r} asked for, but only {count} CUDA device(s) exist")
