"""patch_sdpa: unchanged models that call torch.nn.functional.scaled_dot_product_attention (nanoGPT-style code,
nn.MultiheadAttention, transformers' "sdpa" path, diffusers) run through attn-tune, with the answer unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.nn.attention import SDPBackend, sdpa_kernel

import attn_tune
from attn_tune import Problem
from attn_tune.cli.main import cli
from attn_tune.errors import AttnTuneError
from attn_tune.families.torch_sdpa import sdpa as torch_sdpa
from attn_tune.runtime.patch import is_patched
from attn_tune.tuned_config import load_config
from tests.runtime_helpers import config, entry

pytestmark = pytest.mark.usefixtures("no_config")

ORIGINAL = F.scaled_dot_product_attention
ORIGINAL_MHA = F.multi_head_attention_forward


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with PyTorch's own function in place."""
    assert F.scaled_dot_product_attention is ORIGINAL
    yield
    attn_tune.unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL and torch.backends.mha.get_fastpath_enabled()
    assert F.multi_head_attention_forward is ORIGINAL_MHA


class CausalSelfAttention(torch.nn.Module):
    """nanoGPT's attention block, as written there: F.scaled_dot_product_attention looked up at call time."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


def _gpt(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[CausalSelfAttention() for _ in range(depth)]).eval()


GPT_PROBLEM = Problem(batch=2, heads=4, q_len=40, head_dim=16, causal=True)


def test_patch_and_unpatch_restore_the_very_objects_and_patching_twice_is_once() -> None:
    handle = attn_tune.patch_sdpa()
    attn_tune.patch_sdpa()
    assert is_patched() and not torch.backends.mha.get_fastpath_enabled()
    assert F.multi_head_attention_forward is not ORIGINAL_MHA  # to name the patch when is_causal lacks its mask
    attn_tune.unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL and torch.backends.mha.get_fastpath_enabled()
    assert F.multi_head_attention_forward is ORIGINAL_MHA
    attn_tune.unpatch_sdpa()  # nothing to undo
    assert isinstance(handle, attn_tune.patch_sdpa)


def test_a_block_restores_function_and_config_on_an_error(tmp_path: Path) -> None:
    config([entry(GPT_PROBLEM, "chunked", {"chunk": 16})]).save(tmp_path / "c.json")
    with pytest.raises(RuntimeError, match="boom"):
        with attn_tune.patch_sdpa(tmp_path / "c.json"):
            assert is_patched()
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL and torch.backends.mha.get_fastpath_enabled()
    q = torch.randn(2, 4, 40, 16)
    assert attn_tune.explain(q, q, q, is_causal=True).rule == "default"  # the config went with the block
    with attn_tune.patch_sdpa():
        with attn_tune.patch_sdpa():
            pass
        assert is_patched()  # an inner block leaves an outer patch in place


def test_a_patched_model_gives_the_same_output_bit_for_bit_without_a_config_and_within_rounding_with_one() -> None:
    model, x = _gpt(), torch.randn(2, 40, 64)
    with torch.no_grad():
        want = model(x)
        before = attn_tune.patch_calls()["routed"]
        with attn_tune.patch_sdpa():
            same = model(x)
        assert attn_tune.patch_calls()["routed"] == before + 2  # both layers arrived
        assert torch.equal(same, want)
        chunked = config([entry(GPT_PROBLEM, "chunked", {"chunk": 16})])
        with attn_tune.patch_sdpa(chunked):
            assert attn_tune.explain(*(torch.randn(2, 4, 40, 16),) * 3, is_causal=True).variant == "chunked"
            close = model(x)
    assert (close - want).abs().max() < 1e-5


def test_a_config_choosing_sdpa_itself_never_recurses() -> None:
    """The built-in sdpa variants and every fallback call PyTorch's own function, not the patched name."""
    q = torch.randn(2, 4, 40, 16)
    for name in ("sdpa", "sdpa-math", "sdpa-flash", "chunked", "dense"):
        with attn_tune.patch_sdpa(config([entry(GPT_PROBLEM, name)])):
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert torch.allclose(out, torch_sdpa(q, q, q, is_causal=True), atol=1e-5), name


@pytest.mark.parametrize("kwargs", [
    {"attn_mask": "bool"}, {"attn_mask": "float"}, {"scale": 0.3}, {"enable_gqa": True}, {"is_causal": True},
], ids=lambda k: next(iter(k)) + (f"-{next(iter(k.values()))}" if isinstance(next(iter(k.values())), str) else ""))
def test_every_sdpa_argument_keeps_its_meaning(kwargs: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 24, 16, generator=gen)
    kv_heads = 2 if kwargs.get("enable_gqa") else 4
    k, v = torch.randn(2, kv_heads, 30, 16, generator=gen), torch.randn(2, kv_heads, 30, 16, generator=gen)
    if kwargs.get("attn_mask") == "bool":
        kwargs = {"attn_mask": torch.rand(24, 30, generator=gen) > 0.3}
        kwargs["attn_mask"][:, 0] = True
    elif kwargs.get("attn_mask") == "float":
        kwargs = {"attn_mask": torch.randn(2, 1, 24, 30, generator=gen)}
    want = torch_sdpa(q, k, v, **kwargs)
    with attn_tune.patch_sdpa():
        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert (got - want).abs().max() < 1e-6


def test_dropout_and_unknown_arguments_reach_pytorch_unchanged() -> None:
    q = torch.randn(2, 4, 24, 16)
    torch.manual_seed(3)
    want = torch_sdpa(q, q, q, dropout_p=0.5)
    with attn_tune.patch_sdpa():
        torch.manual_seed(3)
        assert torch.equal(F.scaled_dot_product_attention(q, q, q, dropout_p=0.5), want)
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, q, q, not_an_sdpa_argument=1)


def test_gradients_compile_and_an_sdpa_kernel_block_go_through_the_patch() -> None:
    model, x = _gpt(), torch.randn(2, 40, 64)
    model.train()
    want = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    with attn_tune.patch_sdpa(config([entry(Problem(batch=2, heads=4, q_len=40, head_dim=16, causal=True,
                                                    training=True), "chunked", {"chunk": 16})])):
        got = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(got, want))
        model.eval()
        with torch.no_grad():
            compiled = torch.compile(model, backend="eager", fullgraph=False)(x)
            with sdpa_kernel(SDPBackend.MATH):
                pinned = model(x)
            eager = model(x)
    assert (compiled - eager).abs().max() < 1e-5 and (pinned - eager).abs().max() < 1e-5


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_multihead_attention_and_transformer_layers_reach_attn_tune(batch_first: bool, training: bool) -> None:
    """nn.MultiheadAttention (need_weights=False, as Transformer layers call it) with a key padding mask, eval (whose
    fused fast path the patch turns off) and training."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=batch_first).train(training)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first).train(training)
    x = torch.randn(2, 20, 64) if batch_first else torch.randn(20, 2, 64)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 15:] = True
    with torch.set_grad_enabled(training):
        want = (mha(x, x, x, key_padding_mask=pad, need_weights=False)[0], layer(x, src_key_padding_mask=pad))
        before = attn_tune.patch_calls()["routed"]
        with attn_tune.patch_sdpa():
            got = (mha(x, x, x, key_padding_mask=pad, need_weights=False)[0], layer(x, src_key_padding_mask=pad))
    assert attn_tune.patch_calls()["routed"] == before + 2
    for a, b in zip(got, want):
        assert torch.nan_to_num(a - b).abs().max() < 1e-5


def _encoder_layer(dtype: torch.dtype = torch.float32) -> torch.nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True, dtype=dtype).eval()


def test_is_causal_without_a_mask_is_one_line_naming_the_patch_and_the_fix() -> None:
    """Unpatched, the eval fast path ignores the hint (non-causal attention); the patch's slow path needs the mask:
    the error says so, and is still a RuntimeError."""
    layer, x = _encoder_layer(), torch.randn(2, 10, 32)
    with torch.no_grad():
        assert torch.equal(layer(x, is_causal=True), layer(x))  # PyTorch's own fast path, untouched
        with attn_tune.patch_sdpa():
            assert F.multi_head_attention_forward is not ORIGINAL_MHA
            with pytest.raises(AttnTuneError) as caught:
                layer(x, is_causal=True)
    assert isinstance(caught.value, RuntimeError) and "\n" not in str(caught.value)
    for fragment in ("is_causal=True without attn_mask", "attn_tune.patch_sdpa", "not causal",
                     "generate_square_subsequent_mask(L)", "drop is_causal"):
        assert fragment in str(caught.value)
    assert F.multi_head_attention_forward is ORIGINAL_MHA
    with pytest.raises(RuntimeError, match="^Need attn_mask") as unpatched:  # training: PyTorch's error, unpatched
        layer.train()(x, is_causal=True)
    assert not isinstance(unpatched.value, AttnTuneError)


def test_is_causal_with_its_mask_gives_the_unpatched_answer_and_the_counts_show_the_slow_path() -> None:
    layer, x = _encoder_layer(torch.float64), torch.randn(2, 10, 32, dtype=torch.float64)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x, src_mask=mask, is_causal=True)
        before = attn_tune.patch_calls()
        with attn_tune.patch_sdpa():
            got = layer(x, src_mask=mask, is_causal=True)
            layer.train()(x, src_mask=mask, is_causal=True)  # training never takes the fast path: not counted
    after = attn_tune.patch_calls()
    assert (got - want).abs().max() < 1e-12
    assert after["slow_path"] == before["slow_path"] + 1 and after["routed"] == before["routed"] + 2


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_an_encoder_with_padding_computes_the_padded_rows_under_the_patch_where_its_fast_path_gives_zeros() -> None:
    """Unpatched, eval nn.TransformerEncoder with src_key_padding_mask runs on nested tensors and pads with 0;
    inside the patch (fast path off) the padded rows hold computed values. The unpadded rows agree."""
    encoder = torch.nn.TransformerEncoder(_encoder_layer(), 2).eval()
    x, pad = torch.randn(2, 10, 32), torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        fast = encoder(x, src_key_padding_mask=pad)
        before = attn_tune.patch_calls()["slow_path"]
        with attn_tune.patch_sdpa():
            slow = encoder(x, src_key_padding_mask=pad)
    assert attn_tune.patch_calls()["slow_path"] == before + 2  # both layers' calls left the fast path
    assert torch.equal(fast[1, 6:], torch.zeros(4, 32)) and slow[1, 6:].abs().min() > 0
    assert (fast[~pad] - slow[~pad]).abs().max() < 1e-5


def test_a_module_that_imported_the_function_by_name_keeps_pytorchs_and_the_counts_show_it() -> None:
    namespace: dict = {}
    exec("from torch.nn.functional import scaled_dot_product_attention as sdpa", namespace)  # imported before
    q = torch.randn(1, 2, 8, 4)
    with attn_tune.patch_sdpa():
        before = attn_tune.patch_calls()
        namespace["sdpa"](q, q, q)
        assert attn_tune.patch_calls() == before  # nothing arrived: it holds PyTorch's own


USER_MODELS = '''
import torch
import torch.nn.functional as F


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = (z.view(2, 24, 2, 16).transpose(1, 2) for z in self.qkv(x).split(32, dim=2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 24, 32)


def gpt():
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (2, 25))
    model = torch.nn.Sequential(torch.nn.Embedding(16, 32), Block(), Block(), torch.nn.Linear(32, 16))
    return model, (ids[:, :-1],), ids[:, 1:]


def mha():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), (torch.randn(2, 24, 32),)


def vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, attn_implementation="sdpa")
    return ViTModel(config).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}


def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                 attention_head_dim=2, norm_num_groups=8).eval()  # (diffusers: 2 heads)
    return model, (torch.randn(1, 4, 8, 8), 10, torch.randn(1, 5, 16))


def causal_hint():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True).eval()
    return layer, {"src": torch.randn(2, 24, 32), "is_causal": True}  # and no src_mask


def by_name():
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    class Frozen(torch.nn.Module):
        def forward(self, x):
            return sdpa(x, x, x)

    return Frozen(), (torch.randn(1, 2, 8, 4),)
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="attn-tune")


@pytest.mark.parametrize("factory,problems", [
    ("gpt", ["b2 h2 q24 d16 float32 cpu causal"]),
    ("mha", ["b2 h2 q24 d16 float32 cpu"]),
    ("vit", ["b2 h2 q17 d16 float32 cpu"]),
    ("unet", ["b1 h2 q64 d8 float32 cpu", "b1 h2 q64 kv5 d8 float32 cpu", "b1 h2 q16 d16 float32 cpu",
              "b1 h2 q16 kv5 d16 float32 cpu"]),  # self- and cross-attention at two resolutions
])
def test_capture_finds_an_unchanged_models_problems(user_models: Path, factory: str, problems: list[str]) -> None:
    result = _run("capture", f"usermodels:{factory}", "--out", "s.json", "--json")
    assert result.exit_code == 0, result.output
    found = [Problem.from_dict(p).describe() for p in json.loads(result.stdout)["problems"]]
    assert found == problems
    assert not is_patched()  # patched for the model's run only


@pytest.mark.slow
def test_tune_a_users_own_model_in_one_command(user_models: Path) -> None:
    result = _run("tune", "usermodels:gpt", "--trials", "2", "--samples", "2", "--max-error", "0.5",
                  "--max-loss-change", "0.5", "--out", "tuned.json")
    assert result.exit_code == 0, result.output
    assert "captured 1 problem of usermodels:gpt" in result.stdout
    assert "validate usermodels:gpt: loss exact" in result.stdout
    tuned = load_config("tuned.json")
    (entry_,) = tuned.entries
    assert entry_.error_inputs == "captured: 2 calls" and tuned.validation["max_loss_change"] == 0.5
    assert Path("tuned.report.png").read_bytes()[:4] == b"\x89PNG" and Path("tuned.activations.safetensors").is_file()
    assert not math.isnan(tuned.validation["loss_exact"])


@pytest.mark.parametrize("spec,fragment", [
    ("usermodels:by_name", "made no attention call attn-tune could see"),
    ("usermodels:nope", "has no callable 'nope'"),
    ("usermodels:gpt --shapes s.json", "MODULE:FACTORY captures the model's own problems"),
])
def test_a_factory_that_cannot_be_tuned_is_one_line_and_writes_nothing(user_models: Path, spec: str,
                                                                       fragment: str) -> None:
    result = _run("tune", *spec.split(), "--trials", "1", "--out", "tuned.json")
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in user_models.iterdir() if p.name != "__pycache__") == ["usermodels.py"]


@pytest.mark.parametrize("command", ["capture", "tune", "validate"])
def test_a_model_given_is_causal_without_its_mask_fails_as_the_users_code_in_one_line(user_models: Path,
                                                                                      command: str) -> None:
    config([entry(Problem(batch=2, heads=2, q_len=24, head_dim=16), "sdpa")]).save("c.json")
    options = ["--config", "c.json"] if command == "validate" else ["--out", "out.json"]
    result = _run(command, "usermodels:causal_hint", *options)
    assert result.exit_code == 1, result.output  # the user's model failed, not a usage error
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: nn.MultiheadAttention got is_causal=True without attn_mask: ")
    assert line.endswith("or drop is_causal.")
    assert "Traceback" not in result.output and not (user_models / "out.json").exists()
