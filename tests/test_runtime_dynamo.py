"""The runtime never loads torch's compiler (dynamo, about a second) itself, yet registers with it whenever it
loads: torch.compile traces the chosen variant whichever came first, dynamo, the runtime or an eager call."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from attn_tune.runtime import when_imported as watcher

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, tmp_path: Path) -> str:
    """Run `code` in a fresh interpreter (this checkout first on the path); its stdout, or the failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env.pop("ATTN_TUNE_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_the_eager_runtime_never_imports_dynamo(tmp_path: Path) -> None:
    out = _python("""
        import sys
        import torch
        import torch.nn.functional as F
        import attn_tune
        import attn_tune.runtime
        assert "torch._dynamo" not in sys.modules, "import attn_tune.runtime"
        q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
        mask = torch.rand(8, 8) > 0.3
        mask[:, 0] = True
        attn_tune.attention(q, k, k, enable_gqa=True, is_causal=True)
        attn_tune.attention(q, k, k, enable_gqa=True, is_causal=True, window=3)
        attn_tune.attention(q, k, k, attn_mask=mask, enable_gqa=True)
        attn_tune.attention(q[0], q[0], q[0])
        attn_tune.explain(q, q, q)
        assert "torch._dynamo" not in sys.modules, "eager attention"
        with attn_tune.patch_sdpa():
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
            torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()(q[0], q[0], q[0], need_weights=False)
        assert attn_tune.patch_calls()["routed"] == 2
        assert "torch._dynamo" not in sys.modules, "patch_sdpa"
        print("ok")
    """, tmp_path)
    assert out.strip() == "ok"


# Which comes first in a fresh process: dynamo loaded before the runtime (registered at import), torch.compile
# before any eager call (registered when compile loads dynamo), or eager calls first.
ORDERS = {
    "dynamo, then the runtime": "import torch._dynamo\nimport attn_tune\n",
    "compile before any eager call": "import attn_tune\nimport attn_tune.runtime\n",
    "eager calls, then compile": "import attn_tune\nattn_tune.attention(q, cache[:, :, :50], cache[:, :, :50])\n"
                                 "attn_tune.attention(q, cache[:, :, :50], cache[:, :, :50], window=8)\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("order", list(ORDERS))
def test_compile_traces_the_chosen_variant_whichever_loads_first(order: str, tmp_path: Path) -> None:
    setup = textwrap.indent(ORDERS[order], "        ")
    out = _python(f"""
        import sys
        import torch
        q, cache = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 100, 16)
{setup}
        assert ("torch._dynamo" in sys.modules) == {order.startswith("dynamo")}
        raw = torch._C._nn.scaled_dot_product_attention

        def frames(fn):
            graphs = []

            def backend(gm, example_inputs):  # dynamo's graphs, run as traced (backend "eager"), counted
                graphs.append(gm)
                return gm.forward

            step = torch.compile(lambda q, k, v: fn(q, k, v) + 1, backend=backend)
            with torch.no_grad():
                for n in range(40, 48):
                    k = cache[:, :, :n]
                    torch.testing.assert_close(step(q, k, k) - 1, raw(q, k, k), atol=1e-6, rtol=1e-5)
            return len(graphs)

        ours = frames(attn_tune.attention)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        from attn_tune.runtime import when_imported
        assert when_imported._FINDER not in sys.meta_path  # registered: nothing left waiting on imports
        print(ours, breaks, frames(raw))
    """, tmp_path)
    ours, breaks, sdpa = map(int, out.split())
    assert (ours, breaks) == (sdpa, 0) and sdpa == 2  # static, then dynamic: as SDPA itself


def _module(tmp_path: Path, name: str) -> None:
    (tmp_path / f"{name}.py").write_text("VALUE = 42\n")
    sys.path.insert(0, str(tmp_path))


def test_when_imported_calls_back_after_the_modules_code_ran_and_then_steps_aside(tmp_path: Path) -> None:
    _module(tmp_path, "watched_module_a")
    seen = []
    try:
        watcher.when_imported("watched_module_a", lambda module: seen.append(module.VALUE))
        assert seen == [] and "watched_module_a" not in sys.modules
        module = importlib.import_module("watched_module_a")
        assert seen == [42]
        assert type(module.__loader__).__name__ == "SourceFileLoader" and module.__spec__.loader is module.__loader__
        assert "watched_module_a" not in watcher._waiting  # and the finder steps aside once nothing waits
        assert (watcher._FINDER in sys.meta_path) == bool(watcher._waiting)
        watcher.when_imported("watched_module_a", lambda module: seen.append(-module.VALUE))
        assert seen == [42, -42]  # loaded already: at once
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("watched_module_a", None)


def test_a_failing_callback_warns_and_never_fails_the_import(tmp_path: Path) -> None:
    _module(tmp_path, "watched_module_b")

    def broken(module):
        raise ValueError("no luck")

    try:
        watcher.when_imported("watched_module_b", broken)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert importlib.import_module("watched_module_b").VALUE == 42
        assert any("no luck" in str(w.message) and w.category is RuntimeWarning for w in caught)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("watched_module_b", None)
