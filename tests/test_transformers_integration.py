"""`attn_implementation="attn_tune"` in Hugging Face transformers: same logits as "eager" and "sdpa"."""

from __future__ import annotations

import pytest
import torch

import attn_tune
from attn_tune.runtime import record
from tests.runtime_helpers import config, entry, registered

transformers = pytest.importorskip("transformers", reason="transformers is the optional extra 'transformers'")
import attn_tune.integrations.transformers  # noqa: E402,F401  (registers "attn_tune")

pytestmark = pytest.mark.usefixtures("no_config")


def _llama(attn: str):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _bert(attn: str):
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(cfg, attn_implementation=attn).eval()


def _batch(padding_side: str):
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (3, 14))
    mask = torch.ones(3, 14, dtype=torch.long)
    if padding_side == "left":
        mask[1, :5], mask[2, :9] = 0, 0
    else:
        mask[1, 10:], mask[2, 4:] = 0, 0
    return ids, mask


def _run(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("make, padding_side", [(_llama, "left"), (_bert, "right"), (_bert, "left")],
                         ids=["llama-gqa-left-padding", "bert-right-padding", "bert-left-padding"])
def test_outputs_match_eager_and_sdpa(make, padding_side) -> None:
    ids, mask = _batch(padding_side)
    with record() as seen:
        ours = _run(make("attn_tune"), ids, mask)
    assert seen, "the model's attention did not go through attn_tune.attention"
    assert all(p.mask for p in seen)  # the padding reached attention as a mask
    real = mask.bool()
    for other in ("eager", "sdpa"):
        reference = _run(make(other), ids, mask)
        torch.testing.assert_close(ours[real], reference[real], atol=2e-5, rtol=1e-4)


def test_unpadded_causal_batch_uses_is_causal_and_grouped_heads() -> None:
    ids = torch.randint(0, 96, (2, 10))
    with record() as seen:
        ours = _run(_llama("attn_tune"), ids, torch.ones_like(ids))
    assert seen == [attn_tune.Problem(batch=2, heads=4, kv_heads=2, q_len=10, head_dim=16, causal=True)]
    torch.testing.assert_close(ours, _run(_llama("sdpa"), ids, torch.ones_like(ids)), atol=2e-5, rtol=1e-4)


def test_config_attn_implementation_switch_and_a_tuned_choice() -> None:
    """Setting the implementation on an existing model routes through attn_tune; a tuned entry is then used."""
    model = _llama("eager")
    model.set_attn_implementation("attn_tune")
    assert model.config._attn_implementation == "attn_tune"
    ids = torch.randint(0, 96, (2, 10))
    expected = _run(_llama("sdpa"), ids, torch.ones_like(ids))
    problem = attn_tune.Problem(batch=2, heads=4, kv_heads=2, q_len=10, head_dim=16, causal=True)
    with attn_tune.use_config(config([entry(problem, "chunked", {"chunk": 4})])), record() as seen:
        got = _run(model, ids, torch.ones_like(ids))
        q, kv = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
        assert attn_tune.explain(q, kv, kv, is_causal=True, enable_gqa=True).variant == "chunked"
    assert seen == [problem]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_generation_with_a_cache() -> None:
    """Greedy decoding through the KV cache (q_len 1 after the prompt) gives the tokens sdpa gives, and every call,
    prompt and decoding steps, ran the variant the config chose (a plugin variant that counts its calls)."""
    calls: list[tuple[int, int]] = []

    def counted(q, k, v, *, is_causal, window, attn_mask, scale, **params):
        calls.append((q.shape[-2], k.shape[-2]))
        return attn_tune.get_variant("sdpa").fn(q, k, v, is_causal=is_causal, window=window, attn_mask=attn_mask,
                                                scale=scale)

    ids = torch.randint(0, 96, (1, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), record() as seen:
        _llama("attn_tune").generate(ids, **kwargs)  # the problems generation asks for
    assert {p.q_len for p in seen} == {6, 1}
    with registered(attn_tune.Variant(name="counted", family="dense", fn=counted, exact=True)), torch.no_grad(), \
            attn_tune.use_config(config([entry(p, "counted") for p in seen])):
        ours = _llama("attn_tune").generate(ids, **kwargs)
    with torch.no_grad():
        reference = _llama("sdpa").generate(ids, **kwargs)
    assert torch.equal(ours, reference)
    assert calls == [(6, 6)] * 2 + [(1, n) for n in range(7, 11) for _ in range(2)]  # 2 layers: prompt, 4 steps


def _mistral(attn: str):
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     sliding_window=8)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


_STATIC = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")


def test_a_sliding_window_model_generates_from_a_static_cache() -> None:
    """generate builds a static cache's masks ahead and hands them back to forward: the structured mask passes
    through (it once failed on `.ndim`), and the tokens are sdpa's."""
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(_mistral("attn_tune").generate(ids, **_STATIC), _mistral("sdpa").generate(ids, **_STATIC))


def _compiled_generate(make, attn: str, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Greedy tokens from a static cache with forward compiled whole (fullgraph: a graph break fails), and frames."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = make(attn)
    model.forward = torch.compile(model.forward, backend=counter, fullgraph=True)
    with torch.no_grad():
        tokens = model.generate(ids, **_STATIC)
    return tokens, counter.frame_count


@pytest.mark.slow
@pytest.mark.parametrize("make", [_llama, _mistral], ids=["llama", "mistral-window-8"])
def test_compiled_generation_with_a_static_cache_runs_the_choice_in_one_graph(make) -> None:
    """torch.compile(fullgraph=True) over generate with a static cache: no graph break, no more frames than
    "sdpa" compiles, the same tokens, with a config choosing another exact variant for the decode steps."""
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(3))  # no pad token (0): no padding
    reference, sdpa_frames = _compiled_generate(make, "sdpa", ids)
    with record() as seen, torch.no_grad():
        make("attn_tune").generate(ids, **_STATIC)
    decode = [p for p in dict.fromkeys(seen) if p.q_len == 1]
    assert decode
    with attn_tune.use_config(config([entry(p, "chunked", {"chunk": 1}) for p in decode])):
        assert attn_tune.runtime.dispatch.decide(decode[0]).variant == "chunked"
        ours, frames = _compiled_generate(make, "attn_tune", ids)
    assert torch.equal(ours, reference)
    assert frames <= sdpa_frames
