"""`AutoAttention`, its rotary tables, and the reference models, against float64 written-out references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attn_tune
from attn_tune import AutoAttention, InvalidProblem
from attn_tune.families.masks import shared_visible_keys
from attn_tune.measurement.inputs import relative_error
from attn_tune.models import CausalLM, Encoder
from attn_tune.modules.rotary import rotary_tables
from attn_tune.runtime import record
from tests.runtime_helpers import config, entry

pytestmark = pytest.mark.usefixtures("no_config")


def _rope_complex(x: torch.Tensor) -> torch.Tensor:
    """RoPE written with complex numbers: dims (i, i + d/2) form one pair rotated by position * base^(-2i/d)."""
    length, dim = x.shape[-2], x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rot = torch.polar(torch.ones(length, dim // 2, dtype=torch.float64), torch.arange(length)[:, None] * theta)
    z = torch.complex(x[..., : dim // 2], x[..., dim // 2 :]) * rot
    return torch.cat([z.real, z.imag], dim=-1)


def _reference(layer: AutoAttention, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """The layer's function in float64, from its weights, written out."""
    b, n, _ = x.shape
    h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    qkv = F.linear(x.double(), layer.qkv.weight.double(), layer.qkv.bias.double())
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = (t.view(b, n, -1, d).transpose(1, 2) for t in (q, k, v))
    if layer.rope:
        q, k = _rope_complex(q), _rope_complex(k)
    k, v = k.repeat_interleave(h // kvh, dim=1), v.repeat_interleave(h // kvh, dim=1)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = torch.ones(n, n, dtype=torch.bool)
    if layer.causal:
        keep &= i >= j
    if layer.window:
        keep &= (i - j).abs() < layer.window
    keep = keep.expand(b, 1, n, n)
    if pad is not None:
        keep = keep & ~pad[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) / d**0.5
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = (probs @ v).transpose(1, 2).reshape(b, n, h * d)
    return F.linear(out, layer.out.weight.double(), layer.out.bias.double())


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, 5), (True, 4)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_auto_attention_matches_a_written_out_reference(causal, window, kv_heads, rope, padded) -> None:
    torch.manual_seed(0)
    layer = AutoAttention(64, 4, num_kv_heads=kv_heads, causal=causal, window=window, rope=rope)
    x = torch.randn(3, 20, 64)
    pad = None
    if padded:
        pad = torch.zeros(3, 20, dtype=torch.bool)
        pad[1, 15:] = True  # right padding
        pad[2, :6] = True  # left padding: with causal, the first queries see no key at all
    with torch.no_grad():
        out = layer(x, pad)
    assert relative_error(out, _reference(layer, x, pad)) <= 1e-5
    assert torch.isfinite(out).all()


def test_rotary_covers_each_heads_dimension_and_tables_are_shared() -> None:
    cos, sin = rotary_tables(32, 16, device=torch.device("cpu"), dtype=torch.float32)
    assert cos.shape == sin.shape == (32, 16)
    again = rotary_tables(32, 16, device=torch.device("cpu"), dtype=torch.float32)
    assert again[0] is cos and again[1] is sin  # built once, shared by every layer and call
    with torch.inference_mode():
        fresh = rotary_tables(33, 16, device=torch.device("cpu"), dtype=torch.float32)
    assert not fresh[0].is_inference()  # usable later under autograd
    with pytest.raises(ValueError, match="even head_dim"):
        rotary_tables(8, 7, device=torch.device("cpu"), dtype=torch.float32)


def test_window_masks_are_built_once_per_shape() -> None:
    first = shared_visible_keys(40, 40, causal=True, window=8, device="cpu")
    assert shared_visible_keys(40, 40, causal=True, window=8, device=torch.device("cpu")) is first
    assert shared_visible_keys(40, 40, causal=False, window=8, device="cpu") is not first


def test_gradients_flow_through_the_layer() -> None:
    torch.manual_seed(0)
    layer = AutoAttention(32, 4, num_kv_heads=2, causal=True, rope=True)
    x = torch.randn(2, 16, 32, requires_grad=True)
    layer(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"embed_dim": 30, "num_heads": 4}, "multiple of num_heads"),
     ({"embed_dim": 32, "num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
     ({"embed_dim": 12, "num_heads": 4, "rope": True}, "even head dimension")],
)
def test_impossible_layers_are_refused_in_one_line(kwargs, message) -> None:
    with pytest.raises(InvalidProblem, match=message):
        AutoAttention(**kwargs)


def test_bad_padding_mask_is_refused() -> None:
    layer = AutoAttention(16, 2)
    with pytest.raises(InvalidProblem, match=r"key_padding_mask must be a bool tensor of shape \(2, 5\)"):
        layer(torch.randn(2, 5, 16), torch.zeros(2, 5))


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_encoder_ignores_padded_tokens(norm) -> None:
    torch.manual_seed(0)
    model = Encoder(vocab_size=50, dim=32, depth=2, heads=4, norm=norm).eval()
    ids = torch.randint(0, 50, (2, 12))
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 8:] = True
    other = ids.clone()
    other[1, 8:] = (other[1, 8:] + 7) % 50  # different tokens where there is padding
    with torch.no_grad():
        a, b = model(ids, pad), model(other, pad)
    torch.testing.assert_close(a[1, :8], b[1, :8])
    torch.testing.assert_close(a[0], b[0])


def test_causal_lm_logits_do_not_see_the_future_and_train() -> None:
    torch.manual_seed(0)
    model = CausalLM(vocab_size=50, dim=32, depth=2, heads=4, kv_heads=2)
    ids = torch.randint(0, 50, (2, 12))
    later = ids.clone()
    later[:, 7:] = (later[:, 7:] + 3) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :7], model(later)[:, :7])
    logits = model(ids)
    assert logits.shape == (2, 12, 50)
    F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_models_use_the_tuned_choice_and_keep_their_answer() -> None:
    torch.manual_seed(0)
    model = CausalLM(vocab_size=50, dim=32, depth=2, heads=4, kv_heads=2).eval()
    ids = torch.randint(0, 50, (2, 24))
    with torch.no_grad(), record() as seen:
        default = model(ids)
    assert [p.describe() for p in seen] == ["b2 h4 kvh2 q24 d8 float32 cpu causal"]
    with attn_tune.use_config(config([entry(seen[0], "chunked", {"chunk": 8})])), torch.no_grad():
        assert attn_tune.explain(torch.randn(2, 4, 24, 8), torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8),
                                 is_causal=True, enable_gqa=True).variant == "chunked"
        tuned = model(ids)
    torch.testing.assert_close(tuned, default, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tuned", [False, True], ids=["default", "config-chunked"])
def test_attention_inside_torch_compile(tuned) -> None:
    """A small model compiled with the default (inductor) backend on CPU answers as the eager one."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CausalLM(vocab_size=64, dim=32, depth=2, heads=4, kv_heads=2, window=6).eval()
    ids = torch.randint(0, 64, (2, 16))
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[0, :3] = True
    problem = attn_tune.Problem(batch=2, heads=4, kv_heads=2, q_len=16, head_dim=8, causal=True, window=6, mask=True)
    with attn_tune.use_config(config([entry(problem, "chunked", {"chunk": 4})] if tuned else [])), torch.no_grad():
        eager = model(ids, pad)
        compiled = torch.compile(model)(ids, pad)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_tuned_variant_is_what_runs_inside_torch_compile() -> None:
    """The config picks `local` (a narrower window: a different answer), so the compiled output shows which ran:
    it equals eager under the same config and differs from exact attention."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CausalLM(vocab_size=64, dim=32, depth=1, heads=4, kv_heads=2, window=32).eval()
    ids = torch.randint(0, 64, (2, 64))
    problem = attn_tune.Problem(batch=2, heads=4, kv_heads=2, q_len=64, head_dim=8, causal=True, window=32)
    with torch.no_grad():
        exact = model(ids)
        with attn_tune.use_config(config([entry(problem, "local", {"local_window": 16, "block": 16}, max_error=10.0)])):
            eager = model(ids)
            compiled = torch.compile(model)(ids)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert relative_error(compiled, exact) > 1e-3
