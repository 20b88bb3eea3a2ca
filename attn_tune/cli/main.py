"""`attn-tune`: list variants, show plugins, benchmark variants on problems, check a variant's conformance."""

from __future__ import annotations

import sys
from typing import Any

import click

from attn_tune.cli import capture_command, config_commands, tune_command, validate_command  # noqa: F401  (they register)
from attn_tune.cli.group import cli
from attn_tune.cli.options import options_given, problem_options, problems_from_options
from attn_tune.cli.render import counted, echo_json, mib, table

__all__ = ["cli", "main"]


@cli.command("list")
@problem_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output only.")
@click.pass_context
def list_command(ctx: click.Context, as_json: bool, **options: Any) -> None:
    """Variants, their family, exactness, and whether they run here (and on the given problem)."""
    from attn_tune.registry import availability, catalog

    problems = problems_from_options(options) if options_given(ctx) else []  # a device not here: one line, exit 2
    cat = catalog()
    records = []
    for variant in cat.by_name.values():
        unavailable = availability(variant)
        not_here = unavailable or _runs_on_no_local_device(variant)
        per_problem = [
            {"problem": p.to_dict(), "label": p.describe(), "reason": unavailable or variant.supports(p)}
            for p in problems
        ]
        records.append(
            {
                "name": variant.name,
                "family": variant.family,
                "exact": variant.exact,
                "plugin": cat.origin[variant.name],
                "requires": list(variant.requires),
                "available": unavailable is None,
                "reason": unavailable,
                "runs_here": not_here is None,
                "reason_here": not_here,
                "problems": per_problem,
                "description": variant.description,
            }
        )
    if as_json:
        echo_json(records)
        return
    if not problems:
        rows = [(r["name"], r["family"], "yes" if r["exact"] else "no", r["reason_here"] or "available")
                for r in records]
        click.echo(table(("VARIANT", "FAMILY", "EXACT", "HERE"), rows))
        return
    for i, problem in enumerate(problems):
        click.echo(("\n" if i else "") + f"problem: {problem.describe()}")
        rows = [
            (r["name"], r["family"], "yes" if r["exact"] else "no", r["problems"][i]["reason"] or "supported")
            for r in records
        ]
        click.echo(table(("VARIANT", "FAMILY", "EXACT", "STATUS"), rows))


def _runs_on_no_local_device(variant: Any) -> str | None:
    """Why the variant serves no problem on this machine's devices (a CUDA-only kernel on a CPU machine), or None.

    Probes a plain, a causal, a windowed and a masked problem in each dtype on each local device."""
    import torch

    from attn_tune.problem import DTYPES, Problem

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    first = None
    for device in devices:
        for dtype in DTYPES:
            for masking in ({}, {"causal": True}, {"window": 8}, {"mask": True}):
                problem = Problem(batch=1, heads=2, q_len=64, head_dim=32, dtype=dtype, device=device, **masking)
                try:
                    reason = variant.supports(problem)
                except Exception as exc:  # noqa: BLE001 - a broken supports() is the plugin's to fix; show it
                    reason = f"supports() raised {type(exc).__name__}"
                if reason is None:
                    return None
                first = first or reason
    return f"not on this machine ({', '.join(devices)}): {first}"


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output only.")
def plugins_command(as_json: bool) -> None:
    """Every plugin: its package and version, the variants it adds, and any load error."""
    from attn_tune.registry import catalog, plugin_records, pm

    cat = catalog()
    records = []
    for record in plugin_records():
        plugin = pm.get_plugin(record.name)
        records.append(
            {
                "name": record.name,
                "module": record.module,
                "package": record.package,
                "version": record.version,
                "builtin": record.builtin,
                "disabled": record.disabled,
                "hooks": sorted(c.name for c in pm.get_hookcallers(plugin) or []) if plugin is not None else [],
                "variants": [name for name, origin in cat.origin.items() if origin == record.name],
                "error": record.error or cat.errors.get(record.name),
            }
        )
    if as_json:
        echo_json(records)
        return
    rows = [
        (
            r["name"],
            r["package"] or "",
            r["version"] or "",
            ", ".join(r["variants"]),
            "disabled" if r["disabled"] else (f"ERROR {r['error']}" if r["error"] else "ok"),
        )
        for r in records
    ]
    click.echo(table(("PLUGIN", "PACKAGE", "VERSION", "VARIANTS", "STATUS"), rows))


@cli.command("bench")
@problem_options
@click.option("--variant", "variant_names", multiple=True, metavar="NAME", help="Only these variants (repeatable).")
@click.option("--min-time", type=click.FloatRange(min=0), default=0.2, show_default=True, help="Seconds of timed runs per cell.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output only.")
def bench_command(variant_names: tuple[str, ...], min_time: float, seed: int, as_json: bool, **options: Any) -> None:
    """Measure latency, peak memory and error of each variant on each problem."""
    from attn_tune.measurement.bench import bench
    from attn_tune.registry import get_variant, variants
    from attn_tune.registry.variant import DEFAULT_VARIANT

    chosen = [get_variant(name) for name in variant_names] if variant_names else variants()
    problems = problems_from_options(options)
    cells = len(problems) * len(chosen)
    if as_json:
        results = bench(problems, chosen, seed=seed, min_time_s=min_time)
        echo_json([r.to_dict() for r in results])
        return
    with click.progressbar(length=cells, label="measuring", file=sys.stderr, show_pos=True) as bar:
        results = bench(problems, chosen, seed=seed, min_time_s=min_time, on_result=lambda _: bar.update(1))
    for i, problem in enumerate(problems):
        click.echo(("\n" if i else "") + f"problem: {problem.describe()}")
        rows = []
        for r in results[i * len(chosen) : (i + 1) * len(chosen)]:
            m = r.measured
            rows.append(
                (
                    r.variant.name,
                    f"{m.latency_ms:.3f} ± {m.latency_iqr_ms:.3f}" if m else "",
                    f"{m.first_call_ms:.1f}" if m else "",
                    mib(m.peak_bytes) if m else "",
                    f"{m.rel_error:.1e}" if m else "",
                    f"{r.vs_baseline:.2f}x" if r.vs_baseline is not None else "",
                    "ok" if r.status == "ok" else f"{r.status}: {r.reason}",
                )
            )
        click.echo(
            table(("VARIANT", "LATENCY ms (IQR)", "FIRST CALL ms", "PEAK MiB", "REL ERR", f"vs {DEFAULT_VARIANT}", "STATUS"), rows)
        )


@cli.command("check")
@click.argument("variant_name", metavar="VARIANT")
@click.option("--device", default="cpu", show_default=True, help="Run the conformance problems on this device.")
@click.option("--check", "only", multiple=True, metavar="NAME", help="Only these checks (repeatable); default all.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output only.")
def check_command(variant_name: str, device: str, only: tuple[str, ...], as_json: bool) -> None:
    """Run the conformance kit on VARIANT: one line per finding; exit 1 if any, 0 if it conforms."""
    from attn_tune.problem import check_device
    from attn_tune.registry import get_variant
    from attn_tune.testing import CHECKS, check_variant, conformance_problems, runnable_problems

    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        raise click.BadParameter(f"unknown check {', '.join(unknown)}; the checks are {', '.join(CHECKS)}",
                                 param_hint="--check")
    variant = get_variant(variant_name)
    check_device(device)
    problems = conformance_problems(device)
    ran = len(runnable_problems(variant, problems, device))  # none: one line, exit 2, never "conforms"
    checks = only or CHECKS
    if as_json:
        findings = check_variant(variant, device, problems, checks)
    else:
        with click.progressbar(length=len(problems), label=f"checking {variant.name}", file=sys.stderr,
                               show_pos=True) as bar:
            findings = check_variant(variant, device, problems, checks, on_case=lambda _: bar.update(1))
    if as_json:
        echo_json({"variant": variant.name, "problems": len(problems),
                   "run": ran, "checks": list(checks),
                   "findings": [{"check": f.check, "problem": f.problem.to_dict() if f.problem else None,
                                 "message": f.message} for f in findings]})
    else:
        for finding in findings:
            click.echo(str(finding))
        verdict = counted(len(findings), "finding") if findings else "conforms"
        scope = f"{counted(ran, 'problem')}, {device}" if ran == len(problems) else \
            f"{ran} of {len(problems)} problems, {device}; it refuses the other {len(problems) - ran}"
        click.echo(f"{variant.name}: {verdict} ({len(checks)} checks on {scope})")
    if findings:
        sys.exit(1)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="attn-tune")

