"""`plot_fine_tune`: the training guard's two fine-tunes side by side: each step's loss with exact attention and
with the config, and their step times and peak memory in the title, as a PNG."""

from __future__ import annotations

import io
import os
from typing import Any

from attn_tune.tuned_config import write_atomically

__all__ = ["plot_fine_tune"]


def plot_fine_tune(validation: dict[str, Any], out: str | os.PathLike) -> None:
    """Draw a config validation record's fine-tune (its `fine_tune`), written atomically to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = validation["fine_tune"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label, colour in (("exact", "exact attention", "tab:blue"), ("tuned", "the config", "tab:orange")):
        losses = run[key]["losses"]
        step = run[key].get("step_ms")
        timing = f", step {step:.1f} ms" if step else ""
        ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3, color=colour,
                label=f"{label}{timing}, peak {run[key]['peak_bytes'] / 2**20:.1f} MiB")
    ax.set_xlabel("fine-tune step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"training loss ({validation.get('loss_from') or 'loss'})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    change = validation.get("loss_change")
    held_out = "" if change is None else f"; held-out loss change {change:+.2%} with the config"
    ax.set_title(f"{validation['factory']}: {run['steps']} steps, {run['optimizer']} lr {run['learning_rate']:g}"
                 f"{held_out}", fontsize=9, loc="left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomically(out, buffer.getvalue())
