"""Unchanged models that hand SDPA an explicit mask (transformers' "sdpa" path with a window or left padding, a
nanoGPT-style boolean band, nn.TransformerEncoder with an additive causal mask and key padding): under
`patch_sdpa` their calls are the structured problems, structured variants serve them with SDPA's answer, and the
one-command tune measures those variants on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from click.testing import CliRunner

import attn_tune
from attn_tune import Problem
from attn_tune.cli.main import cli
from attn_tune.models.masked_examples import band_attention_example, torch_decoder_example
from attn_tune.runtime.capture import capture_factory, observe
from attn_tune.tuned_config import load_config
from tests.runtime_helpers import config, entry

transformers = pytest.importorskip("transformers", reason="transformers is the optional extra 'transformers'")

from attn_tune.integrations.transformers_examples import (  # noqa: E402
    mistral_sdpa_example,
    qwen2_sdpa_padded_example,
    qwen2_sdpa_window_padded_example,
)

pytestmark = pytest.mark.usefixtures("no_config")


# Small sizes of each factory, by name (the CLI test reaches them as tests.test_explicit_mask_models:NAME).
def tiny_mistral_sdpa():
    return mistral_sdpa_example(length=48, window=16)


def tiny_qwen2_padded():
    return qwen2_sdpa_padded_example(batch=3, length=24)


def tiny_qwen2_window_padded():
    return qwen2_sdpa_window_padded_example(batch=2, length=80, window=32)  # local's narrowest is 16


def tiny_band_attention():
    return band_attention_example(length=64, window=16)


def tiny_torch_decoder():
    return torch_decoder_example(batch=3, length=24)


def tiny_torch_encoder():
    return torch_decoder_example(batch=3, length=24, causal=False)


# name: (factory, the one problem it asks for: (batch, q_len, causal, window, key_padding), structured variants)
MODELS: dict[str, tuple[Callable[[], Any], tuple[int, int, bool, int | None, bool], list[str]]] = {
    "mistral-sdpa-window": (tiny_mistral_sdpa, (1, 48, True, 16, False), ["window-chunked", "window-flex"]),
    "qwen2-sdpa-left-padded": (tiny_qwen2_padded, (3, 24, True, None, True), ["sdpa-unpadded"]),
    "qwen2-sdpa-window-left-padded": (tiny_qwen2_window_padded, (2, 80, True, 32, True),
                                      ["window-chunked", "sdpa-unpadded"]),
    "band-attention": (tiny_band_attention, (1, 64, True, 16, False), ["window-chunked", "window-flex"]),
    "torch-decoder-padded": (tiny_torch_decoder, (3, 24, True, None, True), ["sdpa-unpadded"]),
    "torch-encoder-padded": (tiny_torch_encoder, (3, 24, False, None, True), ["sdpa-unpadded"]),
}
STRUCTURED_PARAMS = {"window-chunked": {"block": 8}, "window-flex": {}, "sdpa-unpadded": {}}
SERVED = [(name, variant) for name, (_, _, variants) in MODELS.items() for variant in variants]


def _expected(batch: int, q_len: int, causal: bool, window: int | None, key_padding: bool) -> Problem:
    """Every model here has 4 heads of 64 (transformers repeats the key/value heads itself on its "sdpa" path)."""
    return Problem(batch=batch, heads=4, q_len=q_len, head_dim=64, causal=causal, window=window, mask=key_padding,
                   key_padding=key_padding)


def _real_positions(inputs: Any) -> torch.Tensor:
    """(batch, length) bool, True at a real (not padded) token, from the factory's example inputs."""
    if isinstance(inputs, dict):
        ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        return torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if len(inputs) == 2:  # (ids, src_key_padding_mask): True = padding
        return ~inputs[1]
    return torch.ones_like(inputs[0], dtype=torch.bool)


def _logits(model: Any, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", list(MODELS))
def test_capture_records_the_structured_problem_not_a_generic_mask(name: str) -> None:
    factory, expected, _ = MODELS[name]
    problems = capture_factory(factory)
    assert problems == [_expected(*expected)], [p.describe() for p in problems]


@pytest.mark.parametrize("name,variant", SERVED, ids=[f"{n}-{v}" for n, v in SERVED])
def test_a_structured_variant_serves_every_call_with_the_unpatched_models_logits(name: str, variant: str) -> None:
    factory, expected, _ = MODELS[name]
    model, inputs = factory()[:2]
    with torch.no_grad():
        want = _logits(model, inputs)
        tuned = config([entry(_expected(*expected), variant, STRUCTURED_PARAMS[variant])])
        served: list[str] = []
        with attn_tune.patch_sdpa(tuned), observe(lambda call: served.append(call.decision.variant)):
            got = _logits(model, inputs)
    assert served and set(served) == {variant}, served  # every layer, no fallback
    real = _real_positions(inputs)
    # Compared at real tokens. A left-padded query (Qwen2) sees no key: SDPA and the variants both give its attention
    # zeros, so its logits are those of the residual stream alone, finite; a right-padded one (nn.Transformer) still
    # sees the real keys before it.
    assert torch.isfinite(got).all()
    assert (got[real] - want[real]).abs().max() <= 1e-5


def test_pad_positions_get_what_sdpa_gives_them_too() -> None:
    """Not asked of a model, but true here: padded queries' logits agree as well (zeros from every path)."""
    factory, expected, variants = MODELS["qwen2-sdpa-left-padded"]
    model, inputs = factory()[:2]
    with torch.no_grad():
        want = model(**inputs).logits
        tuned = config([entry(_expected(*expected), "sdpa-unpadded")])
        with attn_tune.patch_sdpa(tuned):
            got = model(**inputs).logits
    pad = ~inputs["attention_mask"].bool()
    assert pad.any() and (got[pad] - want[pad]).abs().max() <= 1e-5


# name: extra `attn-tune tune` arguments (--variant sdpa and the structured ones are added from MODELS)
TUNED = {
    "mistral-sdpa-window": [],
    "qwen2-sdpa-left-padded": [],
    "qwen2-sdpa-window-left-padded": ["--variant", "local", "--max-error", "1", "--max-loss-change", "0.5"],
    "band-attention": [],
    "torch-decoder-padded": [],
    "torch-encoder-padded": [],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TUNED))
def test_one_command_tune_measures_the_structured_variants_on_the_structured_problem(name: str,
                                                                                     tmp_path: Path) -> None:
    factory, expected, variants = MODELS[name]
    extra = TUNED[name]
    taking_part = ["sdpa", *variants, *[extra[i + 1] for i, a in enumerate(extra) if a == "--variant"]]
    options = [a for pair in (("--variant", v) for v in ["sdpa", *variants]) for a in pair]
    out = tmp_path / "tuned.json"
    result = CliRunner().invoke(cli, ["tune", f"tests.test_explicit_mask_models:{factory.__name__}", *options,
                                      *extra, "--trials", str(len(taking_part)), "--samples", "2", "--seed", "0",
                                      "--out", str(out)], prog_name="attn-tune")
    assert result.exit_code == 0, result.output
    assert f"validate tests.test_explicit_mask_models:{factory.__name__}: " in result.output  # the guard ran
    (tuned,) = load_config(out).entries
    assert tuned.problem == _expected(*expected)
    measured = {c["variant"] for c in tuned.candidates if c.get("status") == "ok"}
    assert set(taking_part) <= measured, tuned.candidates
    assert tuned.choice["variant"] in taking_part  # which one wins at this size is the machine's noise
