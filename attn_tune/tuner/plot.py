"""`plot_config`: latency and peak memory against q_len per variant, the chosen variant marked, as a PNG."""

from __future__ import annotations

import io
import os
from typing import Any

from attn_tune.tuned_config import TunedConfig, write_atomically

__all__ = ["plot_config", "bar_rows"]


def _group_key(entry: Any) -> tuple:
    """Entries equal in everything but the lengths share one row of plots."""
    fields = {k: v for k, v in entry.problem.to_dict().items() if k not in ("q_len", "kv_len")}
    return tuple(sorted(fields.items())) + (((entry.device or {}).get("name")),)


def _title(entry: Any) -> str:
    label = entry.problem.describe().split(" ")
    return " ".join(part for part in label if not part.startswith(("q", "kv")) or part.startswith("kvh"))


def bar_rows(entry: Any) -> list[tuple[dict[str, Any], bool]]:
    """One problem's bars, slowest first: each variant's fastest measured knobs, and always the choice (with the
    figures it was chosen on), marked True, even when its knobs were not its variant's fastest trial."""
    best: dict[str, dict] = {}
    for c in entry.candidates:
        if c.get("status") == "ok" and "latency_ms" in c:
            if c["variant"] not in best or c["latency_ms"] < best[c["variant"]]["latency_ms"]:
                best[c["variant"]] = c
    choice = {"variant": entry.choice["variant"], "params": entry.choice["params"], **entry.measured}
    rows = [c for c in best.values() if (c["variant"], c.get("params") or {}) != (choice["variant"], choice["params"])]
    marked = [(c, False) for c in rows] + [(choice, True)]
    return sorted(marked, key=lambda row: -row[0]["latency_ms"])


def _bars(lat_ax: Any, mem_ax: Any, entry: Any) -> None:
    """One problem: each variant's fastest measured knobs as a bar, with its error; the choice in orange."""
    marked = bar_rows(entry)
    rows = [c for c, _ in marked]
    chosen = [x for _, x in marked]
    labels = [c["variant"] + ("\n" + ",".join(f"{k}={v}" for k, v in c["params"].items()) if c.get("params") else "")
              for c in rows]
    for ax, values, xlabel in ((lat_ax, [c["latency_ms"] for c in rows], "latency (ms)"),
                               (mem_ax, [c["peak_bytes"] / 2**20 for c in rows], "peak memory (MiB)")):
        bars = ax.barh(range(len(rows)), values, color=["tab:orange" if x else "tab:blue" for x in chosen])
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="x", alpha=0.3)
        for bar, c in zip(bars, rows):
            ax.annotate(f" err {c.get('rel_error', float('nan')):.1e}", (bar.get_width(), bar.get_y()), fontsize=6,
                        va="bottom")
    inputs = entry.error_inputs or "random"
    lat_ax.set_title(f"{entry.problem.describe()} (chosen in orange; error on {inputs})", fontsize=9, loc="left")


def plot_config(config: TunedConfig, out: str | os.PathLike) -> None:
    """Draw one row per group of problems (latency left, peak memory right), written atomically to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list] = {}
    for entry in sorted(config.entries, key=lambda e: e.problem.q_len):
        groups.setdefault(_group_key(entry), []).append(entry)
    rows = max(1, len(groups))
    fig, axes = plt.subplots(rows, 2, figsize=(12, 3.6 * rows), squeeze=False)
    for row, entries in enumerate(groups.values()):
        lat_ax, mem_ax = axes[row]
        series: dict[str, list[tuple[int, float, float]]] = {}
        for entry in entries:
            best: dict[str, dict] = {}
            for c in entry.candidates:
                if c.get("status") == "ok" and ("latency_ms" in c):
                    if c["variant"] not in best or c["latency_ms"] < best[c["variant"]]["latency_ms"]:
                        best[c["variant"]] = c
            for name, c in best.items():
                series.setdefault(name, []).append((entry.problem.q_len, c["latency_ms"], c["peak_bytes"] / 2**20))
        lengths = sorted({e.problem.q_len for e in entries})
        if len(lengths) == 1:  # one length: a line per variant would be a dot; bars, best knobs per variant
            _bars(lat_ax, mem_ax, entries[0])
            continue
        for name, points in sorted(series.items()):
            xs, lat, mem = zip(*sorted(points))
            (line,) = lat_ax.plot(xs, lat, marker="o", markersize=3, label=name)
            mem_ax.plot(xs, mem, marker="o", markersize=3, color=line.get_color(), label=name)
        chosen = [(e.problem.q_len, e.measured["latency_ms"], e.measured["peak_bytes"] / 2**20) for e in entries]
        xs, lat, mem = zip(*chosen)
        lat_ax.scatter(xs, lat, marker="*", s=180, facecolors="none", edgecolors="black", zorder=5, label="chosen")
        mem_ax.scatter(xs, mem, marker="*", s=180, facecolors="none", edgecolors="black", zorder=5, label="chosen")
        for ax, ylabel in ((lat_ax, "latency (ms)"), (mem_ax, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.set_yscale("log")
            ax.set_xlabel("q_len")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        lat_ax.set_title(_title(entries[0]), fontsize=10, loc="left")
        mem_ax.legend(fontsize=7, loc="upper left", ncol=2)
    device = config.device.get("name", config.device.get("type", ""))
    title = f"attn-tune: measured latency and peak memory ({device})"
    v = config.validation
    if v and v.get("loss_change") is not None:
        title += (f"\nvalidated end to end on {v['factory']}: held-out loss {v['loss_exact']:.4f} -> "
                  f"{v['loss_tuned']:.4f} ({v['loss_change']:+.2%}), {v['approximate_calls']} of {v['calls']} "
                  "attention calls approximate")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomically(out, buffer.getvalue())
