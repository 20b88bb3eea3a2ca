"""Plain-text tables and number formats for people; `--json` output bypasses all of this."""

from __future__ import annotations

import json
import shutil
from typing import Any, Sequence

import click

from attn_tune.tuned_config import choice_label

__all__ = ["table", "mib", "echo_json", "named", "versus_default", "counted"]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None = None) -> str:
    """Left-aligned columns separated by two spaces, with a header rule; the last column (reasons, notes) is cut
    with "..." so that a line fits `width` (default: the terminal's, at least 100). `--json` keeps every word."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    width = width or max(100, shutil.get_terminal_size((120, 24)).columns)
    room = width - sum(widths[:-1]) - 2 * (len(widths) - 1)
    if widths[-1] > room >= 20:
        for row in cells:
            if len(row[-1]) > room:
                row[-1] = row[-1][:room - 3].rstrip() + "..."
        widths[-1] = room
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def named(variant: str, params: dict[str, Any] | None) -> str:
    """A choice as people read it: `local(local_window=256)`, or the bare name without knobs."""
    return choice_label({"variant": variant, "params": params})


def counted(n: int, one: str, many: str | None = None) -> str:
    """'1 entry', '3 entries': a count with its noun in the right number (`many` defaults to `one` + "s")."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def mib(n_bytes: float | None) -> str:
    """Bytes as MiB with one decimal."""
    return "" if n_bytes is None else f"{n_bytes / 2**20:.1f}"


def echo_json(data: Any) -> None:
    """Machine-readable output on stdout, nothing else."""
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def versus_default(entry: Any) -> str:
    """The choice's latency against sdpa's: the head-to-head ratio and its interval when there was one."""
    verdict = entry.head_to_head or {}
    row = next((r for r in verdict.get("ratios", []) if r["variant"] == entry.choice["variant"]
                and r["params"] == entry.choice["params"]), None)
    if row is not None:
        return f"{row['ratio']:.2f}x [{row['low']:.2f}-{row['high']:.2f}]"
    if verdict.get("ratios"):
        best = min(verdict["ratios"], key=lambda r: r["ratio"])
        return f"kept (nearest rival {best['variant']} {best['ratio']:.2f}x [{best['low']:.2f}-{best['high']:.2f}])"
    base = entry.baseline_latency_ms()
    return f"{entry.measured['latency_ms'] / base:.2f}x" if base else ""
