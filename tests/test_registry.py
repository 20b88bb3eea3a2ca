"""The registry: built-ins through the hook, temporary plugins, malformed plugins, clashes, availability."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest

import attn_tune
from attn_tune import UnknownVariant, Variant, hookimpl
from attn_tune.registry import catalog, pm
from attn_tune.registry.plugins import BUILTIN_PLUGINS, PluginRecord, _register
from attn_tune.families.dense import dense_attention

EXACT_BUILTINS = {"dense", "sdpa", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "chunked", "xformers-mea",
                  "flash-attn", "window-chunked", "window-flex", "sdpa-unpadded"}
APPROXIMATE_BUILTINS = {"local", "blocksparse", "flex-blocksparse", "xformers-blocksparse", "linformer"}
BUILTIN_NAMES = EXACT_BUILTINS | APPROXIMATE_BUILTINS


@contextmanager
def registered(plugin: object, name: str):
    pm.register(plugin, name=name)
    try:
        yield
    finally:
        pm.unregister(name=name)


class _Plugin:
    def __init__(self, *variants) -> None:
        self._variants = variants

    @hookimpl
    def attn_tune_variants(self):
        return list(self._variants)


def test_builtins_are_registered_as_plugins_through_the_hook() -> None:
    names = {v.name for v in attn_tune.variants()}
    assert BUILTIN_NAMES <= names
    origins = catalog().origin
    assert {origins[n] for n in BUILTIN_NAMES} == set(BUILTIN_PLUGINS)
    assert {n for n in BUILTIN_NAMES if attn_tune.get_variant(n).exact} == EXACT_BUILTINS


def test_unknown_variant_names_the_close_ones() -> None:
    with pytest.raises(UnknownVariant) as info:
        attn_tune.get_variant("sdpa-flsh")
    assert "sdpa-flash" in str(info.value) and "unknown variant 'sdpa-flsh'" in str(info.value)


def test_temporary_plugin_appears_and_disappears() -> None:
    extra = Variant(name="test-temp", family="dense", fn=dense_attention, exact=True)
    with registered(_Plugin(extra), "temp-plugin"):
        assert attn_tune.get_variant("test-temp") is extra
        assert catalog().origin["test-temp"] == "temp-plugin"
    assert "test-temp" not in {v.name for v in attn_tune.variants()}


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ("not a variant", "expected attn_tune.Variant"),
        (Variant(name="Bad_Name", family="dense", fn=dense_attention, exact=True), "not kebab-case"),
        (Variant(name="no-fn", family="dense", fn=None, exact=True), "fn is not callable"),
        (Variant(name="no-family", family="", fn=dense_attention, exact=True), "family"),
        (Variant(name="bad-requires", family="dense", fn=dense_attention, exact=True, requires="xformers"), "requires"),
    ],
)
def test_malformed_variant_is_reported_and_its_plugin_skipped(bad, fragment) -> None:
    good = Variant(name="test-good-sibling", family="dense", fn=dense_attention, exact=True)
    with registered(_Plugin(good, bad), "malformed-plugin"):
        cat = catalog()
        assert fragment in cat.errors["malformed-plugin"]
        assert "test-good-sibling" not in cat.by_name  # the whole plugin is skipped
        assert BUILTIN_NAMES <= set(cat.by_name)  # the others still load


def test_name_clash_is_an_error_naming_both_plugins() -> None:
    impostor = Variant(name="dense", family="dense", fn=dense_attention, exact=False)
    with registered(_Plugin(impostor), "impostor-plugin"):
        cat = catalog()
        error = cat.errors["impostor-plugin"]
        assert "attn_tune.families.dense" in error and "impostor-plugin" in error
        assert attn_tune.get_variant("dense").exact  # the first registration keeps the name


def test_hook_that_raises_is_reported() -> None:
    class Raising:
        @hookimpl
        def attn_tune_variants(self):
            raise RuntimeError("kernel table corrupt")

    with registered(Raising(), "raising-plugin"):
        assert "kernel table corrupt" in catalog().errors["raising-plugin"]
        assert BUILTIN_NAMES <= {v.name for v in attn_tune.variants()}


def test_misspelled_hook_is_rejected_at_registration() -> None:
    class Misspelled:
        @hookimpl
        def attn_tune_variantz(self):
            return []

    record = PluginRecord(name="misspelled", module="tests")
    _register(Misspelled(), record)
    assert record.error and "attn_tune_variantz" in record.error
    assert pm.get_plugin("misspelled") is None


def test_unimportable_requirement_gives_the_import_error_as_reason(tmp_path, monkeypatch) -> None:
    (tmp_path / "attn_tune_fake_kernel.py").write_text("raise OSError('libfakekernel.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    missing = Variant(name="needs-missing", family="dense", fn=dense_attention, exact=True, requires=("no_such_module_xyz",))
    broken = Variant(name="needs-broken", family="dense", fn=dense_attention, exact=True, requires=("attn_tune_fake_kernel",))
    probed = Variant(name="probe-raises", family="dense", fn=dense_attention, exact=True, probe=lambda: 1 / 0)
    assert "No module named 'no_such_module_xyz'" in attn_tune.availability(missing)
    assert "libfakekernel.so: cannot open" in attn_tune.availability(broken)
    assert "ZeroDivisionError" in attn_tune.availability(probed)
    assert attn_tune.availability(attn_tune.get_variant("dense")) is None


def test_xformers_reason_is_the_real_one() -> None:
    """Installed but without loadable kernels (the CPU machine): the reason is xformers' own load error."""
    pytest.importorskip("xformers", reason="xformers is not installed here")
    from xformers import _cpp_lib

    reason = attn_tune.availability(attn_tune.get_variant("xformers-mea"))
    if _cpp_lib._cpp_library_load_exception is None:
        assert reason is None
    else:
        assert reason.startswith("xformers kernels did not load:") and "built for" in reason and "\n" not in reason
        problem = attn_tune.Problem(batch=1, heads=2, q_len=8, head_dim=8)
        assert attn_tune.get_variant("xformers-mea").supports(problem) == "xformers kernels run on CUDA only"


def test_runtime_path_imports_no_optuna_click_or_kernels() -> None:
    code = textwrap.dedent(
        """
        import sys, torch, attn_tune
        q = torch.randn(1, 2, 8, 8)
        for name in ("dense", "sdpa", "chunked"):
            attn_tune.get_variant(name).fn(q, q, q, is_causal=True, window=None, attn_mask=None, scale=None)
        print(sorted(m for m in ("optuna", "click", "xformers", "flash_attn", "linformer_pytorch") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_hook_has_a_test_and_docs() -> None:
    """As datasette does: a hook nobody tests or documents is a hook nobody can rely on."""
    from pathlib import Path

    from attn_tune.registry import hookspecs

    root = Path(__file__).resolve().parent.parent
    tests = "".join(p.read_text() for p in (root / "tests").rglob("*.py"))
    docs = (root / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("attn_tune_")]
    assert hooks
    for hook in hooks:
        assert f"def {hook}(" in tests, f"no test defines an implementation of {hook}"
        assert f"### `{hook}(" in docs and "->" in docs.split(f"### `{hook}(", 1)[1].split("\n", 1)[0], (
            f"docs/plugins.md has no '### `{hook}(...) -> ...`' heading giving its signature"
        )
