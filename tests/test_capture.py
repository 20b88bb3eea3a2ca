"""`attn-tune capture`: the problems a model asks for, and the capture -> tune -> use path end to end."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import attn_tune
from attn_tune import Problem
from attn_tune.cli.main import cli
from attn_tune.models import causal_lm_example, encoder_example
from attn_tune.runtime.capture import capture_factory

FACTORIES = '''
import torch
from attn_tune.models import CausalLM, Encoder

def tiny_lm():
    torch.manual_seed(0)
    return CausalLM(vocab_size=64, dim=32, depth=2, heads=4, kv_heads=2), (torch.randint(0, 64, (1, 256)),)

def padded_encoder():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 48))
    pad = torch.zeros(2, 48, dtype=torch.bool)
    pad[1, 40:] = True
    return Encoder(vocab_size=64, dim=32, depth=3, heads=2, norm="pre"), {"input_ids": ids, "key_padding_mask": pad}

def no_attention():
    return torch.nn.Linear(4, 4), torch.randn(2, 4)

def broken():
    raise RuntimeError("weights not found")
'''


pytestmark = pytest.mark.usefixtures("no_config")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_capture_on_the_bundled_models() -> None:
    assert capture_factory(causal_lm_example) == [
        Problem(batch=2, heads=8, kv_heads=2, q_len=512, head_dim=32, causal=True)
    ]
    assert capture_factory(encoder_example) == [Problem(batch=2, heads=4, q_len=512, head_dim=64)]
    assert capture_factory(lambda: causal_lm_example(batch=1, length=64), training=True) == [
        Problem(batch=1, heads=8, kv_heads=2, q_len=64, head_dim=32, causal=True, training=True)
    ]


def test_capture_command_writes_a_shapes_file(user_module) -> None:
    result = CliRunner().invoke(cli, ["capture", "my_models:padded_encoder", "--out", "shapes.json"])
    assert result.exit_code == 0, result.output
    data = json.loads((user_module / "shapes.json").read_text())
    assert data["source"] == "my_models:padded_encoder"
    # the padding mask is read for its structure: key padding, not a generic mask
    padded = Problem(batch=2, heads=2, q_len=48, head_dim=16, mask=True, key_padding=True)
    assert [Problem.from_dict(p) for p in data["problems"]] == [padded]
    assert "b2 h2 q48 d16 float32 cpu padding" in result.stdout
    as_json = CliRunner().invoke(cli, ["capture", "my_models:padded_encoder", "--out", "s2.json", "--json"])
    assert json.loads(as_json.stdout)["problems"] == data["problems"]


def test_capture_command_with_training_records_training_problems(user_module) -> None:
    """--training: train mode, forward and backward; the problems are marked training, as tune must measure them."""
    result = CliRunner().invoke(cli, ["capture", "my_models:padded_encoder", "--training", "--out", "train.json"])
    assert result.exit_code == 0, result.output
    data = json.loads((user_module / "train.json").read_text())
    assert [Problem.from_dict(p) for p in data["problems"]] == [
        Problem(batch=2, heads=2, q_len=48, head_dim=16, mask=True, key_padding=True, training=True)]
    assert "b2 h2 q48 d16 float32 cpu padding training" in result.stdout


@pytest.mark.parametrize(
    "spec, message, code",
    [
        ("my_models", "expected MODULE:FACTORY", 2),
        ("missing_module:f", "cannot import missing_module: ModuleNotFoundError", 2),
        ("my_models:nothing", "my_models has no callable 'nothing'", 2),
        ("my_models:no_attention", "made no attention call attn-tune could see", 2),
        ("my_models:broken", "my_models:broken raised RuntimeError: weights not found", 1),
    ],
)
def test_capture_errors_are_one_line(user_module, spec, message, code) -> None:
    result = CliRunner().invoke(cli, ["capture", spec, "--out", "shapes.json"])
    assert result.exit_code == code
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (user_module / "shapes.json").exists()


@pytest.mark.slow
def test_capture_tune_use_end_to_end(user_module) -> None:
    """Capture a model's problems, tune them, use the config: the model's calls then run the tuned entry."""
    runner = CliRunner()
    assert runner.invoke(cli, ["capture", "my_models:tiny_lm", "--out", "shapes.json"]).exit_code == 0
    tuned = runner.invoke(cli, ["tune", "--shapes", "shapes.json", "--trials", "3", "--variant", "sdpa",
                                "--variant", "chunked", "--seed", "0", "--out", "tuned.json"])
    assert tuned.exit_code == 0, tuned.output
    config = attn_tune.load_config(user_module / "tuned.json")
    assert [e.problem for e in config.entries] == [
        Problem(batch=1, heads=4, kv_heads=2, q_len=256, head_dim=8, causal=True)
    ]
    from my_models import tiny_lm

    model, (ids,) = tiny_lm()
    with torch.no_grad():
        expected = model(ids)
    with attn_tune.use_config(user_module / "tuned.json"), torch.no_grad(), attn_tune.runtime.record() as seen:
        got = model(ids)
        q = torch.randn(1, 4, 256, 8)
        kv = torch.randn(1, 2, 256, 8)
        decision = attn_tune.explain(q, kv, kv, is_causal=True, enable_gqa=True)
    assert decision.rule == "own-entry" and decision.variant == config.entries[0].choice["variant"]
    assert seen == [config.entries[0].problem]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
