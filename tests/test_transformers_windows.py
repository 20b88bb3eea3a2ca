"""Sliding-window models from transformers through attn_implementation="attn_tune": the window arrives as a window.

Tiny random Mistral, Qwen2 (sliding layers from max_window_layers) and Gemma 3 (sliding and global layers
alternating) models: logits equal "eager", greedy decoding equals "sdpa", gradients equal "sdpa"'s, with a
tuned config that sends the window problems to `window-chunked`.
"""

from __future__ import annotations

import pytest
import torch

import attn_tune
from attn_tune.runtime import record
from tests.runtime_helpers import config, entry

transformers = pytest.importorskip("transformers", reason="transformers is the optional extra 'transformers'")
from transformers import masking_utils as mu  # noqa: E402

from attn_tune.integrations.transformers_examples import mistral_example  # noqa: E402
from attn_tune.integrations.transformers_masks import StructuredMask, structured_mask  # noqa: E402

WINDOW = 8
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)


def _mistral(attn: str):
    return _build(transformers.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **SMALL), attn)


def _qwen2(attn: str):  # layers >= max_window_layers slide: 2 full layers, then 2 sliding ones
    cfg = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=WINDOW,
                                   max_window_layers=2, **SMALL)
    return _build(cfg, attn)


def _gemma3(attn: str):  # sliding, global, sliding, global
    cfg = transformers.Gemma3TextConfig(num_hidden_layers=4, head_dim=16, sliding_window=WINDOW,
                                        sliding_window_pattern=2, **SMALL)
    return _build(cfg, attn)


def _build(cfg, attn: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


MODELS = [_mistral, _qwen2, _gemma3]
SLIDING_LAYERS = {_mistral: [True, True], _qwen2: [False, False, True, True], _gemma3: [True, False, True, False]}


pytestmark = pytest.mark.usefixtures("no_config")


def _inputs(length: int, left_padding: bool, batch: int = 3):
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 96, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if left_padding:
        mask[1, :2], mask[-1, : length - 3] = 0, 0
    return ids, mask


def _window_chunked_for(problems) -> attn_tune.TunedConfig:
    """A config sending every window problem to window-chunked with blocks smaller than the window."""
    return config([entry(p, "window-chunked", {"block": 4}) for p in problems if p.window is not None])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make", MODELS, ids=["mistral", "qwen2", "gemma3"])
@pytest.mark.parametrize("length", [WINDOW - 3, WINDOW, 3 * WINDOW + 2], ids=["below", "at", "above"])
@pytest.mark.parametrize("left_padding", [False, True], ids=["no-padding", "left-padding"])
def test_logits_equal_eager_with_window_variants_serving_the_sliding_layers(make, length, left_padding) -> None:
    ids, mask = _inputs(length, left_padding)
    with torch.no_grad():
        reference = make("eager")(input_ids=ids, attention_mask=mask).logits
        model = make("attn_tune")
        with record() as seen:
            model(input_ids=ids, attention_mask=mask)
        assert len(seen) <= 2
        windows = [p.window for p in seen]
        if length > WINDOW:  # a window that cuts something reaches attn-tune as a window, on sliding layers only
            assert WINDOW in windows and (None in windows) == (False in SLIDING_LAYERS[make])
            assert all(p.causal and p.mask == left_padding for p in seen)
        else:
            assert windows == [None]
        tuned = _window_chunked_for(seen)
        with attn_tune.use_config(tuned):
            ours = model(input_ids=ids, attention_mask=mask).logits
            for p in seen:
                q = torch.randn(p.batch, p.heads, p.q_len, p.head_dim)
                kv = torch.randn(p.batch, p.kv_heads, p.q_len, p.head_dim)
                padding = torch.ones(p.batch, 1, 1, p.q_len, dtype=torch.bool) if p.mask else None
                decision = attn_tune.explain(q, kv, kv, attn_mask=padding, is_causal=True, window=p.window,
                                             enable_gqa=True)
                assert decision.variant == ("window-chunked" if p.window else "sdpa")
    real = mask.bool()
    assert torch.isfinite(ours).all()
    assert _rel(ours[real], reference[real]) < 1e-5


GEOMETRIES = [  # (q_length, kv_length, q_offset, kv_offset): prefill, decode, continued prompt, sliding cache full
    (12, 12, 0, 0), (1, 13, 12, 0), (4, 16, 12, 0), (1, 8, 20, 13), (3, 10, 20, 13)]
FUNCTIONS = {"causal": mu.causal_mask_function, "bidirectional": mu.bidirectional_mask_function,
             "sliding-causal": mu.sliding_window_causal_mask_function(5),
             "sliding-bidirectional": mu.sliding_window_bidirectional_mask_function(3)}


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "q{}-kv{}-at{}-from{}".format(*g))
@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
def test_structured_mask_is_the_mask_transformers_would_build(geometry, name, padded) -> None:
    """The flags mean exactly transformers' mask (window conventions included), proved by comparing values."""
    q_length, kv_length, q_offset, kv_offset = geometry
    padding = torch.ones(2, q_offset + q_length, dtype=torch.bool)
    if padded:
        padding[1, : q_offset + q_length - 3] = False
    args = dict(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                mask_function=FUNCTIONS[name], attention_mask=padding if padded else None)
    expected = mu.sdpa_mask(**args, allow_is_causal_skip=False).expand(2, 1, q_length, kv_length)
    got = structured_mask(**args)
    aligned = q_offset + q_length == kv_offset + kv_length
    if not aligned:
        assert isinstance(got, torch.Tensor) and torch.equal(got, mu.sdpa_mask(**args))
    elif got is None:  # plain causal, no padding, queries == keys: is_causal says it
        assert name == "causal" and not padded and q_length == kv_length
        assert torch.equal(expected[0, 0], torch.ones(q_length, q_length, dtype=torch.bool).tril())
    else:
        assert isinstance(got, StructuredMask)
        assert torch.equal(got.dense().expand(2, 1, q_length, kv_length), expected)


def test_masks_it_does_not_recognise_are_built_as_sdpa_builds_them() -> None:
    chunked = mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    args = dict(batch_size=1, q_length=10, kv_length=10, mask_function=chunked, local_size=4)
    got = structured_mask(**args)
    assert isinstance(got, torch.Tensor) and torch.equal(got, mu.sdpa_mask(**args))
    custom = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 3)
    assert isinstance(structured_mask(**{**args, "mask_function": custom}), torch.Tensor)


@pytest.mark.parametrize("make", MODELS, ids=["mistral", "qwen2", "gemma3"])
@pytest.mark.parametrize("cache", ["default", "full"], ids=["model-cache", "full-cache"])
def test_greedy_decoding_through_the_cache_equals_sdpa_and_reads_only_the_window(make, cache) -> None:
    """Prompt below the window, 14 new tokens past it; a cache keeping every key still gives a sliding layer only
    the last `window` keys (a global layer, all of them)."""
    ids, mask = _inputs(5, left_padding=True, batch=2)
    kwargs = dict(max_new_tokens=14, do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        reference = make("sdpa").generate(ids, **kwargs)
        model = make("attn_tune")
        extra = {"past_key_values": transformers.DynamicCache()} if cache == "full" else {}
        with record() as seen:
            ours = model.generate(ids, **kwargs, **extra)
    assert torch.equal(ours, reference)
    longest = max(p.kv_len for p in seen if p.q_len == 1)
    assert longest == (WINDOW if all(SLIDING_LAYERS[make]) else 5 + 13)
    assert any(p.q_len == 1 and p.kv_len == WINDOW for p in seen)  # sliding layers past the window: w keys


@pytest.mark.parametrize("make", MODELS, ids=["mistral", "qwen2", "gemma3"])
def test_gradients_equal_sdpa_through_the_window_path(make) -> None:
    ids, mask = _inputs(3 * WINDOW + 2, left_padding=False, batch=2)

    def grads(attn: str, tuned=None):
        model = make(attn).train()
        with attn_tune.use_config(tuned), record() as seen:
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, seen

    reference, _ = grads("sdpa")
    _, seen = grads("attn_tune")
    assert WINDOW in [p.window for p in seen] and all(p.training for p in seen)
    ours, _ = grads("attn_tune", _window_chunked_for(seen))
    for name, grad in reference.items():
        assert _rel(ours[name], grad) < 1e-4, name


def test_capture_records_the_window_problems_of_a_transformers_model() -> None:
    from attn_tune.runtime.capture import capture_factory

    problems = capture_factory(lambda: mistral_example(length=40, window=16))
    assert problems == [attn_tune.Problem(batch=1, heads=4, kv_heads=2, q_len=40, head_dim=64, causal=True, window=16)]


def test_a_layer_using_softcapping_is_named_in_one_line() -> None:
    cfg = transformers.Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=WINDOW, **SMALL)
    model = _build(cfg, "attn_tune")
    assert cfg.attn_logit_softcapping
    with pytest.raises(ValueError, match=r"Gemma2Attention \(layer 0\) uses logit softcapping") as info:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 96, (1, 6)))
    assert "\n" not in str(info.value)

