"""The reports of a comparison: results.md, results.csv, results.json, PNG plots and report.html.

Rows are dicts as `peftkit.bench.compare` makes them: ``method``, ``status`` (ok / skipped /
failed), ``reason``, and for finished runs ``accuracy``, ``trainable_share``, ``peak_rss_mib``,
``median_step_time_s``, ``adapter_bytes``, ... plus ``context`` (hardware and versions).
Plots are drawn with matplotlib's Agg canvas (no display, no global backend switch); every
file is written atomically, so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import csv
import html
import io as stdio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.io import atomic_path

PLOTS = {
    "accuracy_vs_trainable_share.png": "Accuracy against trainable share",
    "peak_memory.png": "Peak memory (RSS)",
    "time_per_step.png": "Time per optimizer step",
    "adapter_size.png": "Adapter file size",
}
SUMMARY_PLOT = "compare.png"  # the four plots in one figure, for a README

CSV_FIELDS = (
    "method", "status", "reason", "accuracy", "accuracy_metric", "trainable_parameters", "total_parameters",
    "trainable_share", "peak_rss_mib", "median_step_time_s", "steps", "stopped_by_time_limit", "wall_time_s",
    "cpu_seconds", "energy_kwh", "energy_note",
    "train_time_s", "adapter_bytes", "learning_rate", "seed", "budget", "measured_at", "load_average_before",
    "command", "cpu", "cores", "gpu", "platform", "python", "torch", "transformers", "accelerate", "peftkit",
    "git_commit", "config",
)
_CONTEXT_FIELDS = ("cpu", "cores", "gpu", "platform", "python", "torch", "transformers", "accelerate", "peftkit",
                   "git_commit")
_SHOWN_CONFIG_FIELDS = ("r", "lora_alpha", "alpha", "use_dora", "target_modules", "init_r", "target_r",
                        "num_virtual_tokens", "encoder_hidden_size", "prefix_projection", "bottleneck_size",
                        "placement", "budget", "importance", "last_k", "feedforward_modules")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def describe_config(config: dict) -> str:
    """The few config fields that tell methods apart, e.g. 'r=8 lora_alpha=16 target_modules=all-linear'."""
    parts = []
    for field in _SHOWN_CONFIG_FIELDS:
        value = config.get(field)
        if value in (None, False, [], {}):
            continue
        if field == "target_modules" and isinstance(value, list) and len(value) > 4:
            value = f"{len(value)} modules"
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        parts.append(f"{field}={value}")
    return " ".join(parts)


def write_reports(rows: Sequence[dict[str, Any]], settings: dict[str, Any], output_dir: str | os.PathLike) -> list[Path]:
    """Write results.md, results.csv, results.json, the plots and report.html into `output_dir`; return the paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    pngs = plot_images(rows)
    for name, data in pngs.items():
        written.append(_write_bytes(output_dir / name, data))
    written.append(_write_text(output_dir / "results.md", markdown_report(rows, settings, plot=SUMMARY_PLOT if pngs else None)))
    written.append(_write_text(output_dir / "results.csv", csv_text(rows)))
    written.append(_write_text(output_dir / "results.json", json.dumps(
        {"settings": settings, "rows": [dict(row) for row in rows]}, indent=2, default=str) + "\n"))
    written.append(_write_text(output_dir / "report.html", html_report(rows, settings, pngs)))
    return written


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as temporary:
        Path(temporary).write_bytes(data)
    return path


# --------------------------------------------------------------------------- table


def _full_accuracy(rows: Sequence[dict[str, Any]]) -> float | None:
    return next((row.get("accuracy") for row in rows if row["method"] == "full" and row["status"] == "ok"), None)


def _cells(row: dict[str, Any], full_accuracy: float | None = None) -> dict[str, str]:
    """The table's text for one row; empty strings where a run has no number. `full_accuracy`: full fine-tuning's."""
    ok = row["status"] == "ok"
    status = "ok" if ok else f"{row['status']}: {row.get('reason') or ''}"
    if ok and row.get("stopped_by_time_limit"):
        status = "ok (time budget)"

    def number(key: str, form) -> str:
        value = row.get(key)
        return "" if not ok or value is None else form(value)

    return {
        "method": row["method"],
        "status": status,
        "accuracy": number("accuracy", lambda v: f"{100 * v:.2f}%"),
        "vs_full": "" if full_accuracy is None or row["method"] == "full" else number(
            "accuracy", lambda v: f"{100 * (v - full_accuracy):+.2f}"),
        "trainable": number("trainable_parameters", lambda v: f"{v:,d}"),
        "share": number("trainable_share", lambda v: f"{100 * v:.3g}%"),
        "peak_rss": number("peak_rss_mib", lambda v: f"{v:,.0f} MiB"),
        "step_time": number("median_step_time_s", lambda v: f"{1000 * v:,.0f} ms"),
        "steps": number("steps", str),
        "wall": number("wall_time_s", lambda v: f"{v:,.0f} s"),
        "cpu": number("cpu_seconds", lambda v: f"{v:,.0f} s"),
        "energy": number("energy_kwh", lambda v: f"{1000 * v:,.3g} Wh"),
        "adapter": number("adapter_bytes", human_bytes),
        "lr": number("learning_rate", lambda v: f"{v:g}"),
        "config": describe_config(row.get("config") or {}) if ok else "",
    }


_HEADERS = (("method", "method"), ("status", "status"), ("accuracy", "accuracy"), ("vs_full", "vs full FT (points)"),
            ("trainable", "trainable params"),
            ("share", "trainable share"), ("peak_rss", "peak RSS"), ("step_time", "time / step (median)"),
            ("steps", "steps"), ("wall", "wall time"), ("cpu", "CPU time"), ("energy", "energy (estimate)"),
            ("adapter", "adapter file"), ("lr", "lr"), ("config", "config"))
_RIGHT_ALIGNED = {"accuracy", "vs_full", "trainable", "share", "peak_rss", "step_time", "steps", "wall", "cpu", "energy",
                  "adapter", "lr"}


def _accuracy_metric(rows: Sequence[dict[str, Any]]) -> str:
    return next((row["accuracy_metric"] for row in rows if row.get("accuracy_metric")), "validation accuracy")


def _contexts(rows: Sequence[dict[str, Any]]) -> list[tuple[dict, list[str]]]:
    """Each distinct measurement context with the methods measured in it (rows kept from earlier runs may differ)."""
    found: list[tuple[dict, list[str]]] = []
    for row in rows:
        context = row.get("context") or {}
        for known, methods in found:
            if known == context:
                methods.append(row["method"])
                break
        else:
            found.append((context, [row["method"]]))
    return found


def describe_context(context: dict) -> str:
    hardware = f"{context.get('cpu')} ({context.get('cores')} cores)"
    if context.get("gpu"):
        hardware += f", GPU: {context['gpu']}"
    versions = ", ".join(f"{name} {context.get(name)}" for name in ("python", "torch", "transformers", "accelerate", "peftkit"))
    commit = f", git {context['git_commit']}" if context.get("git_commit") else ""
    return f"{hardware}; {versions}{commit}; {context.get('platform')}"


def how_measured(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """Sentences that say what each column is and how it was measured."""
    metric = _accuracy_metric(rows)
    lines = [
        f"{settings['model']} / {settings['task']}, every method trained by `peftkit train` with its default config and "
        f"learning rate, budget: {settings['budget']}, seed {settings['seed']}"
        + (f", extra train options `{' '.join(settings['train_args'])}`" if settings.get("train_args") else "") + ".",
        f"accuracy: {metric} at the best evaluation (the weights the run keeps); trainable share: trainable parameters "
        "over all parameters of the wrapped model; peak RSS: the resident-set high-water mark of the training process "
        "(the kernel's ru_maxrss; weights, activations, optimizer state and the Python process itself, not GPU memory); "
        "time / step: median over the run's optimizer steps (forward, backward, optimizer; evaluation excluded); "
        "wall time: the whole process; CPU time: CPU-seconds of the training process (all threads) from its first "
        "step to its end; adapter file: the saved .safetensors (for full fine-tuning, the whole model).",
    ]
    notes = sorted({row["energy_note"] for row in rows if row.get("energy_note")})
    lines.append(f"energy: {'; '.join(notes)}." if notes else
                 'energy: not measured (codecarbon is not installed: pip install "peftkit[energy]").')
    for context, methods in _contexts(rows):
        which = "" if len(_contexts(rows)) == 1 else f" ({', '.join(methods)})"
        lines.append(f"Measured on{which}: {describe_context(context)}.")
    dates = sorted(row["measured_at"] for row in rows if row.get("measured_at"))
    if dates:
        lines.append(f"Runs started between {dates[0]} and {dates[-1]}.")
    loads = [float(row["load_average_before"].split()[0]) for row in rows if row.get("load_average_before")]
    cores = max(((row.get("context") or {}).get("cores") or 0 for row in rows), default=0)
    if loads:
        # Time per step and wall time are only comparable between runs on an equally quiet machine.
        busy = f" (busy: more runnable processes than {cores} cores, so times include waiting for a core)" if cores and max(loads) > cores else ""
        lines.append(f"Load average (1 min) before the runs: {min(loads):.1f} to {max(loads):.1f}{busy}; each run's is in results.csv.")
    return lines


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in _HEADERS) + " |",
             "|" + "|".join("---:" if key in _RIGHT_ALIGNED else "---" for key, _ in _HEADERS) + "|"]
    full_accuracy = _full_accuracy(rows)
    for row in rows:
        cells = _cells(row, full_accuracy)
        lines.append("| " + " | ".join(_markdown_cell(cells[key]) for key, _ in _HEADERS) + " |")
    return "\n".join(lines)


def _markdown_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown_section(rows: Sequence[dict[str, Any]], settings: dict[str, Any], plot: str | None = None) -> str:
    """The command, the table, how it was measured and (given its path) the summary figure: for a README."""
    parts = [f"`{settings['command']}`", "", markdown_table(rows), "", "\n\n".join(how_measured(rows, settings))]
    if plot:
        parts += ["", f"![accuracy against trainable share, peak memory, time per step and adapter size per method]({plot})"]
    return "\n".join(parts) + "\n"


def markdown_report(rows: Sequence[dict[str, Any]], settings: dict[str, Any], plot: str | None = None) -> str:
    parts = [f"# peftkit compare: {settings['model']} / {settings['task']}", "", markdown_section(rows, settings, plot)]
    parts += ["Commands run:", ""]
    parts += [f"- {row['method']}: `{row['command']}`" for row in rows if row.get("command")]
    return "\n".join(parts) + "\n"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {**{k: v for k, v in row.items() if k != "context"}, **{k: (row.get("context") or {}).get(k) for k in _CONTEXT_FIELDS}}
        flat["config"] = json.dumps(row["config"], sort_keys=True) if row.get("config") else ""
        writer.writerow({key: "" if flat.get(key) is None else flat[key] for key in CSV_FIELDS})
    return buffer.getvalue()


# --------------------------------------------------------------------------- plots


def _finished(rows: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [row for row in rows if row["status"] == "ok" and row.get(key) is not None]


def _bar(axes, rows, key: str, scale: float, title: str, unit: str, log: bool = False, label=None) -> None:
    names = [row["method"] for row in rows]
    values = [row[key] * scale for row in rows]
    colors = ["#7f7f7f" if name == "full" else "#1f77b4" for name in names]
    bars = axes.bar(names, values, color=colors)
    for bar, row, value in zip(bars, rows, values):
        axes.annotate(label(row) if label else f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value),
                      ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    if log:
        axes.set_yscale("log")
    axes.set_ylabel(unit)
    axes.set_title(title, fontsize=10)
    axes.tick_params(axis="x", labelrotation=45, labelsize=8)
    axes.margins(y=0.15)


def _draw_accuracy(axes, rows, metric: str) -> None:
    finished = _finished(rows, "accuracy")
    for row in finished:
        x, y = 100 * row["trainable_share"], 100 * row["accuracy"]
        full = row["method"] == "full"
        axes.scatter([x], [y], marker="*" if full else "o", s=120 if full else 40,
                     color="#7f7f7f" if full else "#1f77b4", zorder=3)
        # The full fine-tuning label sits left of its point, at the right edge of the plot.
        axes.annotate("full fine-tuning" if full else row["method"], (x, y), fontsize=8, xytext=(-6 if full else 4, 4),
                      textcoords="offset points", ha="right" if full else "left")
        if full:
            axes.axhline(y, color="#7f7f7f", linestyle="--", linewidth=1, zorder=1)
    axes.set_xscale("log")
    axes.margins(x=0.08, y=0.1)
    axes.set_xlabel("trainable parameters (% of the model, log scale)")
    axes.set_ylabel(f"{metric} (%)")
    axes.set_title(f"{metric[0].upper()}{metric[1:]} against trainable share", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)


def _draw(name: str, axes, rows) -> None:
    if name == "accuracy_vs_trainable_share.png":
        _draw_accuracy(axes, rows, _accuracy_metric(rows))
    elif name == "peak_memory.png":
        _bar(axes, _finished(rows, "peak_rss_mib"), "peak_rss_mib", 1.0, "Peak memory of the training process (RSS)", "MiB")
    elif name == "time_per_step.png":
        _bar(axes, _finished(rows, "median_step_time_s"), "median_step_time_s", 1000.0,
             "Time per optimizer step (median)", "ms")
    elif name == "adapter_size.png":
        _bar(axes, _finished(rows, "adapter_bytes"), "adapter_bytes", 1 / 2**20, "Adapter file size (log scale)", "MiB",
             log=True, label=lambda row: human_bytes(row["adapter_bytes"]))


def _png(figure) -> bytes:
    buffer = stdio.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def plot_images(rows: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes of each plot in PLOTS and of the 2x2 summary; empty when no run finished."""
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    if not _finished(rows, "trainable_share"):
        return {}
    images = {}
    for name in PLOTS:
        figure = Figure(figsize=(6.4, 4.4), layout="constrained")
        _draw(name, figure.add_subplot(), rows)
        images[name] = _png(figure)
    figure = Figure(figsize=(12, 8.4), layout="constrained")
    for index, name in enumerate(PLOTS):
        _draw(name, figure.add_subplot(2, 2, index + 1), rows)
    images[SUMMARY_PLOT] = _png(figure)
    return images


# --------------------------------------------------------------------------- HTML


def html_report(rows: Sequence[dict[str, Any]], settings: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """One self-contained page: the table, the plots as data URIs, how and where it was measured, the commands."""
    escape = html.escape
    header = "".join(f"<th>{escape(title)}</th>" for _, title in _HEADERS)
    body = []
    full_accuracy = _full_accuracy(rows)
    for row in rows:
        cells = _cells(row, full_accuracy)
        body.append("<tr class=\"{}\">".format(escape(row["status"])) + "".join(
            f"<td class=\"{'num' if key in _RIGHT_ALIGNED else ''}\">{escape(cells[key])}</td>" for key, _ in _HEADERS) + "</tr>")
    figures = "".join(
        f"<figure><img alt=\"{escape(title)}\" src=\"data:image/png;base64,{base64.b64encode(pngs[name]).decode('ascii')}\">"
        f"<figcaption>{escape(title)}</figcaption></figure>"
        for name, title in PLOTS.items() if name in pngs)
    notes = "".join(f"<p>{escape(line)}</p>" for line in how_measured(rows, settings))
    commands = "".join(f"<li><b>{escape(row['method'])}</b>: <code>{escape(row['command'])}</code></li>"
                       for row in rows if row.get("command"))
    title = f"peftkit compare: {settings['model']} / {settings['task']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.skipped td, tr.failed td {{ color: #888; }}
tr.failed td:nth-child(2) {{ color: #b00; }}
figure {{ display: inline-block; margin: 1em; }}
img {{ max-width: 640px; }}
code {{ font-size: 12px; }}
</style></head><body>
<h1>{escape(title)}</h1>
<p><code>{escape(settings['command'])}</code></p>
<table><thead><tr>{header}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>How it was measured</h2>
{notes}
<h2>Plots</h2>
{figures or '<p>No run finished, so there is nothing to plot.</p>'}
<h2>Commands</h2>
<ul>{commands}</ul>
</body></html>
"""
