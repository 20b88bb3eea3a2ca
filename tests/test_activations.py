"""Real activations: capture keeps a few calls' q, k, v; tune measures error on them; validate runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import attn_tune
from attn_tune import Problem
from attn_tune.activations import ActivationsError, load_activations, save_activations
from attn_tune.cli.main import cli
from attn_tune.measurement.measure import measure
from attn_tune.problem import Inputs
from attn_tune.registry.variant import Variant
from attn_tune.runtime.capture import capture_activations, load_factory, observe, spread
from attn_tune.tuned_config import load_config
from attn_tune.tuner.guard import guard_config
from attn_tune.tuner.job import Guard
from attn_tune.tuner.tune import tune
from attn_tune.tuner.validator import NoLoss, Validator
from tests.jobs import Heard, job
from tests.oracle import oracle
from tests.runtime_helpers import config, entry, registered

FACTORIES = '''
import torch
import attn_tune
from attn_tune.models import CausalLM

def lm():
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (1, 65))
    return CausalLM(vocab_size=32, dim=32, depth=3, heads=2), (ids[:, :-1],), ids[:, 1:]

def lm_without_targets():
    return lm()[:2]

def lm_batches(batches=None):
    """lm's model, and `batches` held-out batches of it when asked (as a factory that can give an interval)."""
    model, inputs, targets = lm()
    if batches is None:
        return model, inputs, targets
    ids = torch.randint(0, 32, (batches, 1, 65), generator=torch.Generator().manual_seed(1))
    return model, [(x[:, :-1],) for x in ids], [x[:, 1:] for x in ids]

def top1(logits, targets):
    return float((logits.argmax(-1) == targets).float().mean())

class Sharp(torch.nn.Module):
    """Attention whose scores are large and peaked, as a trained model's are (random inputs' are not)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        outs = []
        for layer in range(3):
            h = self.proj(x) + layer
            outs.append(attn_tune.attention(6 * h, 6 * h, h, is_causal=True))
        return torch.stack(outs).sum(0)

def sharp():
    torch.manual_seed(0)
    return Sharp(), (torch.randn(1, 2, 32, 16),)
'''
LM_PROBLEM = Problem(batch=1, heads=2, q_len=64, head_dim=16, causal=True)
SHARP_PROBLEM = Problem(batch=1, heads=2, q_len=32, head_dim=16, causal=True)


def _clamped(q, k, v, *, is_causal, window, attn_mask, scale, **params):
    """Causal attention with scores clipped to [-5, 5]: harmless for random inputs, wrong for peaked ones."""
    scores = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    scores = scores.clamp(-5, 5)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


CLAMPED = Variant(name="clamped", family="test", fn=_clamped, exact=False,
                  supports=lambda p: None if p.window is None and not p.mask and p.kv_heads is None else "plain only")


pytestmark = pytest.mark.usefixtures("no_config")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "act_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="attn-tune")


def test_spread_takes_the_first_and_last_layers_and_between() -> None:
    assert spread(12, 4) == [0, 4, 7, 11]
    assert spread(3, 4) == [0, 1, 2]
    assert spread(5, 1) == [2]


def test_capture_with_activations_round_trips(user_module: Path) -> None:
    problems, kept = capture_activations(load_factory("act_models:lm"), samples=2)
    assert problems == [LM_PROBLEM]
    assert [s.call for s in kept[LM_PROBLEM]] == [0, 2]  # three layers: the first and the last
    save_activations(user_module / "a.safetensors", kept, source="act_models:lm")
    loaded = load_activations(user_module / "a.safetensors")
    assert list(loaded) == [LM_PROBLEM]
    for before, after in zip(kept[LM_PROBLEM], loaded[LM_PROBLEM]):
        for name in ("q", "k", "v"):
            assert torch.equal(getattr(before, name), getattr(after, name))
        assert after.call == before.call and after.attn_mask is None
    # the layers differ: these are real activations, not one call copied
    assert not torch.equal(loaded[LM_PROBLEM][0].q, loaded[LM_PROBLEM][1].q)


def test_capture_cli_writes_shapes_and_activations(user_module: Path, monkeypatch) -> None:
    from attn_tune.cli import progress

    monkeypatch.setattr(progress, "on_terminal", lambda: True)  # progress on a terminal, but never under --json
    result = run("capture", "act_models:lm", "--out", "s.json", "--activations", "a.safetensors", "--samples", "3",
                 "--json")
    assert result.exit_code == 0 and result.stderr == "", result.output
    shown = run("capture", "act_models:lm", "--out", "t.json")
    assert "capturing act_models:lm: attention calls: 3" in shown.stderr  # the model's three layers, counted
    report = json.loads(result.stdout)
    assert report["samples"] == [3] and report["activations"] == "a.safetensors"
    assert [s.call for s in load_activations("a.safetensors")[LM_PROBLEM]] == [0, 1, 2]
    assert run("capture", "act_models:lm", "--samples", "2").exit_code == 2  # --samples needs --activations


def test_a_mask_is_kept_with_its_call(tmp_path: Path) -> None:
    problem = Problem(batch=1, heads=2, q_len=8, head_dim=4, mask=True)
    sample = Inputs(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4),
                    torch.rand(1, 1, 8, 8) > 0.3, scale=0.5, call=3)
    save_activations(tmp_path / "m.safetensors", {problem: [sample]})
    back = load_activations(tmp_path / "m.safetensors")[problem][0]
    assert torch.equal(back.attn_mask, sample.attn_mask) and back.scale == 0.5 and back.call == 3


def test_error_is_measured_on_the_captured_calls(user_module: Path) -> None:
    _, kept = capture_activations(load_factory("act_models:sharp"), samples=2)
    save_activations("sharp.safetensors", kept)
    on_random = measure(CLAMPED, SHARP_PROBLEM, min_repeats=1, min_time_s=0)
    on_captured = measure(CLAMPED, SHARP_PROBLEM, min_repeats=1, min_time_s=0, activations="sharp.safetensors")
    assert on_random.rel_error < 0.02 < 0.3 < on_captured.rel_error
    exact = measure(attn_tune.registry.get_variant("sdpa"), SHARP_PROBLEM, min_repeats=1, min_time_s=0,
                    activations="sharp.safetensors")
    assert exact.rel_error < 1e-5


def test_tune_excludes_a_variant_wrong_on_real_calls_only_with_activations(user_module: Path) -> None:
    _, kept = capture_activations(load_factory("act_models:sharp"), samples=2)
    save_activations("sharp.safetensors", kept)
    pool = [attn_tune.registry.get_variant("sdpa"), CLAMPED]
    settings = dict(trials=2, max_error=0.05, variants=pool, seed=0, rounds=1,
                    trial_measure={"min_repeats": 1, "min_time_s": 0}, final_measure={"min_repeats": 1, "min_time_s": 0})
    with registered(CLAMPED):
        blind = tune([SHARP_PROBLEM], job(**settings)).entries[0]
        seeing = tune([SHARP_PROBLEM], job(activations="sharp.safetensors", **settings)).entries[0]
    blind_status, seeing_status = ({c["variant"]: c["status"] for c in e.candidates} for e in (blind, seeing))
    assert blind_status["clamped"] == "ok" and blind.error_inputs == "random"
    assert seeing_status["clamped"] == "excluded" and seeing.error_inputs == "captured: 2 calls"
    assert seeing.choice["variant"] == "sdpa"


def test_validate_reports_each_call_and_the_loss_change(user_module: Path) -> None:
    validator = Validator(load_factory("act_models:lm"), "act_models:lm")
    same = validator.validate(config([]))
    assert same.loss_change == 0.0 and same.output_error == 0.0 and [c.variant for c in same.calls] == ["sdpa"] * 3
    assert all(c.rel_error < 1e-5 for c in same.calls)
    bad = config([entry(LM_PROBLEM, "local", {"local_window": 2}, max_error=1.0)])  # planted: two keys per query
    checked = validator.validate(bad)
    assert [c.variant for c in checked.calls] == ["local"] * 3 and min(c.rel_error for c in checked.calls) > 0.1
    assert checked.loss_change > 0.001 and checked.output_error > 0.01  # an untrained model: small loss changes
    fitted, after = guard_config(bad, validator, Guard(factory="act_models:lm", max_loss_change=0.001))
    assert fitted.entries == [] and after.loss_change == 0.0
    assert [d["variant"] for d in after.dropped] == ["local"] and fitted.validation["dropped"][0]["variant"] == "local"


def test_validate_cli_catches_a_planted_bad_config(user_module: Path) -> None:
    config([entry(LM_PROBLEM, "local", {"local_window": 2}, max_error=1.0)]).save("bad.json")
    config([]).save("exact.json")
    result = run("validate", "act_models:lm", "--config", "bad.json", "--max-loss-change", "0.001")
    assert result.exit_code == 1 and "over the loss budget" in result.stdout
    assert "local(local_window=2)" in result.stdout
    fine = run("validate", "act_models:lm", "--config", "exact.json", "--max-loss-change", "0.01", "--json")
    assert fine.exit_code == 0, fine.output
    report = json.loads(fine.stdout)
    assert report["within_budget"] and report["loss_change"] == 0.0 and report["loss_from"] == "targets"
    assert len(report["calls"]) == 3


def test_the_guard_runs_an_interval_of_batches_when_the_factory_can_give_them_and_says_so(user_module: Path,
                                                                                         monkeypatch) -> None:
    """No --batches: a factory that takes `batches` is validated on INTERVAL_BATCHES (an interval), one that does not
    on one batch, and the output says which and why; progress shows on a terminal, never under --json."""
    from attn_tune.cli import progress
    from attn_tune.tuner.job import INTERVAL_BATCHES

    config([]).save("exact.json")
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    several = run("validate", "act_models:lm_batches", "--config", "exact.json", "--max-loss-change", "0.01")
    assert several.exit_code == 0, several.output
    assert f"guard: {INTERVAL_BATCHES} held-out batches of act_models:lm_batches (it takes `batches`" in several.stdout
    assert f"{INTERVAL_BATCHES} batches)" in several.stdout and "the interval's upper end decides" in several.stdout
    assert "act_models:lm_batches: batches with exact attention" in several.stderr
    assert "act_models:lm_batches: batches with the config" in several.stderr
    one = run("validate", "act_models:lm", "--config", "exact.json")
    assert "guard: one batch of act_models:lm, so no interval: the factory takes no `batches`" in one.stdout
    assert "(one batch, so no interval" in one.stdout
    quiet = run("validate", "act_models:lm_batches", "--config", "exact.json", "--json")
    assert quiet.exit_code == 0 and quiet.stderr == "" and json.loads(quiet.stdout)["batches"] == INTERVAL_BATCHES
    asked = run("validate", "act_models:lm_batches", "--config", "exact.json", "--batches", "3", "--json")
    assert json.loads(asked.stdout)["batches"] == 3


def test_tune_validate_drops_what_breaks_the_loss_budget(user_module: Path) -> None:
    """A candidate error filter loose enough to admit a harmful window; the loss budget removes it."""
    result = run("capture", "act_models:lm", "--out", "s.json", "--activations", "a.safetensors")
    assert result.exit_code == 0, result.output
    with registered(Variant(name="tiny-window", family="test", exact=False,
                            fn=lambda q, k, v, **kw: attn_tune.registry.get_variant("local").fn(q, k, v, **kw, local_window=2))):
        result = run("tune", "--shapes", "s.json", "--activations", "a.safetensors", "--variant", "tiny-window",
                     "--max-error", "10", "--trials", "1", "--validate", "act_models:lm", "--max-loss-change", "0.001",
                     "--out", "tuned.json")
    assert result.exit_code == 0, result.output
    assert "tiny-window for b1 h2 q64 d16 float32 cpu causal had the worst call" in result.stdout
    assert "sdpa serves it" in result.stdout  # nothing else in the pool: the entry is dropped
    assert "guard: one batch of act_models:lm, so no interval" in result.stdout
    tuned = load_config("tuned.json")
    assert tuned.entries == [] or all(e.choice["variant"] != "tiny-window" for e in tuned.entries)
    assert tuned.validation["dropped"][0]["variant"] == "tiny-window" and tuned.validation["loss_change"] == 0.0


def test_bad_activations_and_loss_budgets_are_one_line_and_write_nothing(user_module: Path) -> None:
    assert run("capture", "act_models:lm", "--out", "s.json", "--activations", "a.safetensors").exit_code == 0
    assert run("capture", "act_models:sharp", "--out", "other.json", "--activations", "other.safetensors").exit_code == 0
    Path("not.safetensors").write_text("{}")
    base = ["tune", "--shapes", "s.json", "--trials", "1", "--out", "tuned.json"]
    cases = {
        ("--activations", "missing.safetensors"): "does not exist",
        ("--activations", "not.safetensors"): "is not a safetensors file",
        ("--activations", "s.json"): "is not a safetensors file",
        ("--activations", "other.safetensors"): "which is not among the problems of s.json",
        ("--validate", "act_models:lm_without_targets", "--max-loss-change", "0.01"): "gives no loss",
        ("--max-loss-change", "0.01"): "give --validate",
    }
    for extra, message in cases.items():
        result = run(*base, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not Path("tuned.json").exists()
    with pytest.raises(ActivationsError, match="not among"):
        tune([LM_PROBLEM], job(activations="other.safetensors", trials=1))
    validator = Validator(load_factory("act_models:lm_without_targets"))
    with pytest.raises(NoLoss):
        guard_config(config([]), validator, Guard(factory="act_models:lm_without_targets", max_loss_change=0.01))


@pytest.mark.slow
def test_a_preset_with_a_model_captures_tunes_and_validates_it(user_module: Path, monkeypatch) -> None:
    """The main job's path (`tune --preset quick`) on a tiny stand-in for the reference LM."""
    from attn_tune.tuner import presets

    window = Problem(batch=1, heads=2, q_len=64, head_dim=16, causal=True, window=8)
    light = {"warmup": 0, "min_repeats": 1, "min_time_s": 0}
    monkeypatch.setitem(presets.PRESETS, "quick", presets.Preset(
        description="tiny", samples=2, problems=(window,),
        job=job(max_error=0.5, variants=("sdpa", "local", "window-chunked"), factory="act_models:lm",
                max_loss_change=0.01, trials=3, trial_measure=light, final_measure=light, rounds=1)))
    result = run("tune", "--preset", "quick", "--out", "tuned.json")
    assert result.exit_code == 0, result.output
    assert "captured 1 problem of act_models:lm, up to 2 real calls each" in result.stdout
    assert "validate act_models:lm: loss exact" in result.stdout and "calls approximate" in result.stdout
    tuned = load_config("tuned.json")
    inputs = {e.problem: e.error_inputs for e in tuned.entries}
    assert inputs[window] == "random"
    assert inputs.get(LM_PROBLEM, "captured: 2 calls") == "captured: 2 calls"  # absent only if dropped
    assert tuned.validation["max_loss_change"] == 0.01 and tuned.validation["loss_change"] <= 0.01
    assert Path("tuned.report.png").read_bytes()[:4] == b"\x89PNG" and "wrote tuned.report.png" in result.stdout
    again = run("tune", "--preset", "quick", "--out", "other.json")  # its own report, the first one kept
    assert again.exit_code == 0 and "wrote other.report.png" in again.stdout and Path("tuned.report.png").is_file()
    assert not Path("report.png").exists()


@pytest.mark.slow
def test_a_loss_budget_chooses_a_safer_knob_from_the_study_before_dropping(user_module: Path) -> None:
    """Latency faked (narrower windows faster), errors real: the fastest window breaks the budget; the study's
    next choice, with errors below that call's, is the wider window, and the model's loss then holds."""
    import dataclasses

    def measure_fn(variant, problem, params, **kwargs):
        m = measure(variant, problem, params, **{**kwargs, "min_repeats": 1, "min_time_s": 0})
        return dataclasses.replace(m, latency_ms=params["local_window"] / 8 if variant.name == "local" else 10.0)

    assert run("capture", "act_models:lm", "--out", "s.json", "--activations", "a.safetensors").exit_code == 0
    drops: list[dict] = []
    full = attn_tune.get_variant("local")  # the window is the knob here; block and unfolding only change speed
    local = dataclasses.replace(full, space=lambda problem: {"local_window": full.space(problem)["local_window"]})
    tuned = tune([LM_PROBLEM], job(variants=[attn_tune.get_variant("sdpa"), local], trials=3, max_error=10.0, seed=0,
                                   rounds=1, activations="a.safetensors", factory="act_models:lm",
                                   max_loss_change=0.002),
                 measure_fn=measure_fn, listener=Heard(rechosen=drops.append))
    assert [(d["params"], d["now"]) for d in drops] == [
        ({"local_window": 16}, {"variant": "local", "params": {"local_window": 32}})]
    assert tuned.entries[0].choice == {"variant": "local", "params": {"local_window": 32}}
    assert tuned.entries[0].error_inputs == "captured: 3 calls"
    assert tuned.validation["loss_change"] <= 0.002 and tuned.validation["dropped"] == drops
    tuned.save("tuned.json")
    shown = run("show", "tuned.json")
    assert "over the loss budget, b1 h2 q64 d16 float32 cpu causal: local(local_window=16) -> local(local_window=32)" \
        in shown.stdout and "captured 3 calls" in shown.stdout


def test_a_captured_additive_float_mask_is_measured_against_its_own_reference(tmp_path: Path) -> None:
    problem = Problem(batch=1, heads=2, q_len=8, head_dim=4, mask=True)
    keep = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[..., torch.arange(8), torch.arange(8)] = True
    additive = torch.zeros(1, 1, 8, 8).masked_fill(~keep, float("-inf"))
    sample = Inputs(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), additive)
    save_activations(tmp_path / "f.safetensors", {problem: [sample]})
    m = measure(attn_tune.registry.get_variant("sdpa"), problem, min_repeats=1, min_time_s=0,
                activations=str(tmp_path / "f.safetensors"))
    assert m.rel_error < 1e-5


LIGHT = {"min_repeats": 1, "min_time_s": 0}


def test_a_second_tune_with_activations_does_not_reuse_the_random_input_studies(user_module: Path) -> None:
    """The activations' digest is part of each study's name: errors measured on random inputs are never taken for
    errors on the model's own calls (with a storage that keeps studies, the second run would find the first's)."""
    _, kept = capture_activations(load_factory("act_models:sharp"), samples=2)
    save_activations("sharp.safetensors", kept)
    storage = "sqlite:///studies.db"
    settings = dict(trials=2, max_error=0.05, variants=[attn_tune.registry.get_variant("sdpa"), CLAMPED], seed=0,
                    rounds=1, storage=storage, trial_measure=LIGHT, final_measure=LIGHT)
    with registered(CLAMPED):
        blind = tune([SHARP_PROBLEM], job(**settings)).entries[0]
        seeing = tune([SHARP_PROBLEM], job(activations="sharp.safetensors", **settings)).entries[0]
    assert {c["variant"]: c["status"] for c in blind.candidates}["clamped"] == "ok"
    assert {c["variant"]: c["status"] for c in seeing.candidates}["clamped"] == "excluded"
    import optuna

    assert len(optuna.get_all_study_names(storage)) == 2


def test_the_error_over_captured_calls_is_the_worst_call(user_module: Path) -> None:
    """Three layers' calls, each with its own error: `measure` reports the largest, not the mean or the first."""
    _, kept = capture_activations(load_factory("act_models:sharp"), samples=3)
    calls = kept[SHARP_PROBLEM][::-1]  # the first layer's call (the worst here) last
    save_activations("sharp.safetensors", {SHARP_PROBLEM: calls})
    errors = []
    for sample in calls:
        out = _clamped(sample.q, sample.k, sample.v, **sample.call_kwargs(SHARP_PROBLEM))
        ref = oracle(sample.q, sample.k, sample.v, causal=True, scale=sample.scale)
        errors.append(float((out.double() - ref).norm() / ref.norm()))
    worst = max(errors)
    assert worst > 1.05 * errors[0] and worst > 1.05 * sum(errors) / len(errors), errors  # the test can tell them apart
    measured = measure(CLAMPED, SHARP_PROBLEM, activations="sharp.safetensors", **LIGHT)
    assert measured.rel_error == pytest.approx(worst, rel=1e-6)


def test_validate_measures_each_calls_error_against_the_oracle(user_module: Path) -> None:
    validator = Validator(load_factory("act_models:lm"), "act_models:lm")
    seen = []
    with observe(lambda call: seen.append((call.inputs, call.out.detach().clone()))):
        report = validator.validate(config([entry(LM_PROBLEM, "local", {"local_window": 4}, max_error=1.0)]))
    assert len(seen) == len(report.calls) == 3
    for (inputs, out), call in zip(seen, report.calls):
        ref = oracle(inputs.q, inputs.k, inputs.v, causal=True, scale=inputs.scale)
        assert call.rel_error == pytest.approx(float((out.double() - ref).norm() / ref.norm()), rel=1e-6)


def test_validate_max_loss_change_passes_above_the_change_and_fails_below_it(user_module: Path) -> None:
    config([entry(LM_PROBLEM, "local", {"local_window": 2}, max_error=1.0)]).save("bad.json")
    measured = run("validate", "act_models:lm", "--config", "bad.json", "--json")
    assert measured.exit_code == 0, measured.output
    change = json.loads(measured.stdout)["loss_change"]
    assert change > 0
    within = run("validate", "act_models:lm", "--config", "bad.json", "--max-loss-change", f"{2 * change}")
    assert within.exit_code == 0 and "within the loss budget" in within.stdout, within.output
    over = run("validate", "act_models:lm", "--config", "bad.json", "--max-loss-change", f"{change / 2}")
    assert over.exit_code == 1 and "over the loss budget" in over.stdout, over.output


def test_the_real_quick_preset_names_a_factory_and_variants_that_exist() -> None:
    """`make run` is `tune --preset quick`: its model loads and gives a loss, and every variant name resolves."""
    from attn_tune.tuner import presets

    quick = presets.PRESETS["quick"]
    names = quick.job.search.variants
    assert names and all(attn_tune.get_variant(name).name == name for name in names)
    guard = quick.job.guard
    model, inputs, targets, metric = load_factory(guard.factory)()
    assert isinstance(model, torch.nn.Module) and targets is not None and callable(metric)
    assert guard.batches >= 2  # the loss change gets an interval
    assert all(isinstance(p, Problem) and p.causal for p in quick.problems)
    assert 0 < quick.job.search.max_error < 1 and 0 < guard.max_loss_change < 0.05 and 0 < guard.max_metric_drop < 0.05


def _stale(path: str) -> None:
    """Mark every entry of the config at `path` as measured under another torch (and its validation as old)."""
    data = json.loads(Path(path).read_text())
    for e in data["entries"]:
        e["measured_with"]["torch"] = "2.0.0"
    if data.get("validation"):
        data["validation"]["loss_tuned"] = 99.0
    Path(path).write_text(json.dumps(data))


def test_stale_only_retunes_with_what_each_entry_was_tuned_with(user_module: Path) -> None:
    """The re-tune the staleness warning recommends runs again with the entry's max_error, variant pool and
    activations (the earlier approximate choice measured first), and validates again under the recorded loss
    budget; the validation record is kept."""
    from attn_tune.tuner.retune import retune
    from tests.test_tune import FakeMeasure

    assert run("capture", "act_models:lm", "--out", "s.json", "--activations", "a.safetensors").exit_code == 0
    local = attn_tune.get_variant("local")
    pool = [attn_tune.get_variant("sdpa"), local]
    table = {("sdpa", ()): (5.0, 2**20, 1e-7),
             **{("local", (("local_window", w),)): (2.0, 2**20, 0.05) for w in (16, 32, 64, 128)}}
    seen: list[tuple[str, dict, dict]] = []

    def fake(variant, problem, params, **kwargs):  # local's latency by its window alone, whatever block it runs
        seen.append((variant.name, dict(params), dict(kwargs)))
        keyed = {"local_window": params["local_window"]} if variant.name == "local" else params
        return FakeMeasure(table)(variant, problem, keyed, **kwargs)

    tune([LM_PROBLEM], job(trials=5, max_error=0.1, variants=pool, activations="a.safetensors", rounds=1, seed=0,
                           factory="act_models:lm", max_loss_change=0.5), measure_fn=fake).save("tuned.json")
    before = load_config("tuned.json")
    assert before.entries[0].choice["variant"] == "local" and before.entries[0].settings["max_error"] == 0.1
    _stale("tuned.json")
    seen.clear()
    after = retune(load_config("tuned.json"), [LM_PROBLEM], job(trials=3, rounds=1, seed=0), measure_fn=fake)
    first_variant, first_params, first_kwargs = seen[0]
    assert (first_variant, first_params) == ("local", before.entries[0].choice["params"])  # the earlier choice first
    assert first_kwargs["activations"] == str(Path("a.safetensors").resolve())
    assert {name for name, _, _ in seen} == {"sdpa", "local"}  # the recorded pool, not every variant
    (entry,) = after.entries
    assert entry.choice["variant"] == "local" and entry.error_inputs == before.entries[0].error_inputs != "random"
    assert entry.settings == before.entries[0].settings and entry.measured_with["torch"] == torch.__version__
    assert after.validation["max_loss_change"] == 0.5 and after.validation["factory"] == "act_models:lm"
    assert after.validation["loss_tuned"] == pytest.approx(before.validation["loss_tuned"])  # run again, not copied


@pytest.mark.slow
def test_stale_only_validates_with_the_metric_it_was_tuned_with(user_module: Path) -> None:
    """`--metric MODULE:FN` is recorded beside its budget, and the re-tune the staleness warning recommends loads
    it again (this factory has no metric of its own: without the record the re-tune could not guard it)."""
    assert run("capture", "act_models:lm", "--out", "s.json", "--activations", "a.safetensors").exit_code == 0
    tuned = run("tune", "--shapes", "s.json", "--activations", "a.safetensors", "--variant", "sdpa", "--variant",
                "local", "--max-error", "10", "--trials", "2", "--validate", "act_models:lm", "--metric",
                "act_models:top1", "--max-metric-drop", "1.0", "--out", "tuned.json")
    assert tuned.exit_code == 0, tuned.output
    before = load_config("tuned.json").validation
    assert before["metric"] == "top1" and before["metric_from"] == "act_models:top1"
    _stale("tuned.json")
    again = run("tune", "--config", "tuned.json", "--stale-only", "--out", "after.json")
    assert again.exit_code == 0, again.output
    after = load_config("after.json").validation
    assert after["metric"] == "top1" and after["metric_from"] == "act_models:top1" and after["max_metric_drop"] == 1.0
    assert after["metric_exact"] == pytest.approx(before["metric_exact"])


def test_stale_only_refuses_in_one_line_what_it_cannot_repeat(user_module: Path) -> None:
    assert run("capture", "act_models:lm", "--out", "s.json", "--activations", "a.safetensors").exit_code == 0
    pool = ["--variant", "sdpa", "--variant", "local"]
    result = run("tune", "--shapes", "s.json", "--activations", "a.safetensors", "--max-error", "0.5", "--trials", "2",
                 *pool, "--out", "tuned.json")
    assert result.exit_code == 0, result.output
    _stale("tuned.json")
    Path("a.safetensors").unlink()
    again = run("tune", "--config", "tuned.json", "--stale-only", "--out", "after.json")
    assert again.exit_code == 2 and not Path("after.json").exists()
    assert len(again.output.strip().splitlines()) == 1, again.output
    assert "cannot re-tune b1 h2 q64 d16 float32 cpu causal as it was tuned" in again.output
    assert "a.safetensors, which is gone" in again.output
