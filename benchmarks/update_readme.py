"""Rewrite the results from the benchmark outputs in benchmarks/results/*.json:

- docs/results.md, between its <!-- results:start --> / <!-- results:end --> markers: every benchmark's
  full table, with the command that produced it and when;
- README.md, between <!-- summary:start --> / <!-- summary:end -->: a short summary built from the same
  files (figures read from their fields, never typed in), with a link to each full table.

    python benchmarks/update_readme.py

Each results file carries the markdown table its benchmark printed ("markdown"), the command that
produced it ("command") and when ("measured_at"); this script only assembles them, so the pages show
exactly what the benchmarks measured.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_PAGE = ROOT / "docs" / "results.md"
ORDER = ["default_job", "lora_vs_full", "lora_step_time", "methods", "methods_step_time", "instruct", "sft_step_time",
         "generation", "quantize", "lora_fused", "mixed_batch", "cotrain", "cotrain_passes", "interference",
         "serve_load", "compile_step_time", "scaling", "lora_vs_full_energy", "federated", "federated_trec_iid_16rounds", "routing", "serve_scale",
         "vision"]
TITLES = {
    "default_job": "The default job (`peftkit train`)",
    "lora_vs_full": "LoRA against full fine-tuning, same budget",
    "lora_step_time": "LoRA training step: peftkit, Hugging Face peft, full fine-tuning",
    "methods": "Every method on minilm / sst2",
    "instruct": "Instruction tuning smollm2 on trec-instruct: exact match, tuned against untuned",
    "methods_step_time": "Every method's training step: peftkit, Hugging Face peft, full fine-tuning",
    "sft_step_time": "Supervised fine-tuning step on smollm2: peftkit LoRA, Hugging Face peft, full fine-tuning, gradient checkpointing",
    "generation": "Decoding speed on smollm2: base model, LoRA merged and unmerged (peftkit, Hugging Face peft)",
    "quantize": "A quantized frozen base: base-weight memory, sst2 accuracy of LoRA on NF4 against float32, step time",
    "lora_fused": "Fused LoRA training step: peftkit fused and unfused, Hugging Face peft, full fine-tuning; activation memory",
    "mixed_batch": "Mixed-adapter batches: every example with its own adapter, against one adapter and against peft's adapter_names",
    "cotrain": "Co-training sst2 + trec + cr + mr in mixed batches, against four separate runs",
    "cotrain_passes": "Co-training, pass by pass: one mixed step against the same batches' separate steps",
    "interference": "Interference: task adapters merged by each method, against each task's own adapter",
    "serve_load": "Serving 16 adapters over HTTP (`peftkit serve`): mixed-adapter batches against one adapter per batch",
    "compile_step_time": "`torch.compile`: compiled and eager LoRA training step, peftkit and Hugging Face peft",
    "scaling": "Scaling from 135M to 7B parameters: peak memory, step time and energy, against peftkit's estimate",
    "lora_vs_full_energy": "Energy: LoRA against full fine-tuning at equal steps and at equal accuracy",
    "federated": "Federated LoRA on Flower: aggregation rules, IID and non-IID, against centralized and each client alone",
    "federated_trec_iid_16rounds": "Federated LoRA on trec, IID, over 16 rounds, against centralized training with the same doubled budget",
    "routing": "Automatic routing on mixed-task traffic, against the oracle and one merged adapter",
    "serve_scale": "Serving 1,000 adapters: uniform and Zipf popularity against 16 adapters",
    "vision": "Vision: LoRA against full fine-tuning on mnist-5k",
}


def _anchor(title: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _results() -> list[tuple[Path, dict]]:
    files = sorted(RESULTS.glob("*.json"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    return [(path, json.loads(path.read_text())) for path in files]


def _compare_results() -> list[tuple[Path, dict]]:
    return [(path, json.loads(path.read_text())) for path in sorted(RESULTS.glob("compare_*/results.json"))]


def full_section() -> str:
    """Every benchmark's table, for docs/results.md."""
    parts = []
    for path, data in _results():
        if "markdown" not in data:
            continue
        title = TITLES.get(path.stem, path.stem)
        when = f", measured {data['measured_at']}" if data.get("measured_at") else ""
        note = f"\n{data['note'].strip()}\n" if data.get("note") else ""
        parts.append(f"### {title}\n\n`{data.get('command', 'python benchmarks/' + path.stem + '.py')}`{when}\n\n"
                     f"{data['markdown'].strip()}\n{note}")
    from peftkit.bench.report import SUMMARY_PLOT, markdown_section

    for path, data in _compare_results():  # written by `peftkit compare --output-dir`
        settings, figure = data["settings"], path.parent / SUMMARY_PLOT
        plot = Path("..", figure.relative_to(ROOT)).as_posix() if figure.is_file() else None
        parts.append(f"### Methods side by side (`peftkit compare`): {settings['model']} / {settings['task']}\n\n"
                     f"{markdown_section(data['rows'], settings, plot)}")
    return "\n".join(parts) if parts else "(not measured yet)\n"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count} B"


def _headlines(results: dict[str, dict]) -> list[str]:
    """One line per headline figure, each read from its results file; a file that is missing is left out."""
    lines = []
    link = lambda key: f"[table](docs/results.md#{_anchor(TITLES[key])})"  # noqa: E731
    if "default_job" in results:
        job = results["default_job"]
        lines.append(f"- **The default job** (`peftkit train`: LoRA on minilm / sst2): {100 * job['validation_accuracy']:.2f}% "
                     f"validation accuracy, {100 * job['trainable_share']:.2f}% of the parameters trained, a "
                     f"{_size(job['adapter_bytes'])} adapter, {job['process_wall_time_s'] / 60:.1f} minutes on 2 CPU cores "
                     f"({link('default_job')}).")
    if "lora_vs_full" in results:
        gap = results["lora_vs_full"]["gap_points"]
        lines.append(f"- **LoRA against full fine-tuning**, same budget on sst2: {gap:.2f} points apart ({link('lora_vs_full')}).")
    if "cotrain" in results:
        cotrain = results["cotrain"]
        separate = statistics.mean(v["accuracy"] for v in cotrain["separate"].values())
        together = statistics.mean(v["accuracy"] for v in cotrain["cotrained"].values())
        walls = [(r["separate_wall_s"], r["cotrain_wall_s"]) for r in cotrain.get("repeats", [])]
        timing = ""
        if walls:
            ratio = statistics.median(c for _, c in walls) / statistics.median(s for s, _ in walls)
            timing = f" in {ratio:.2f}x the wall time of four separate runs (median of {len(walls)} repeats)"
        lines.append(f"- **Four tasks co-trained in mixed batches**{timing}: mean accuracy {100 * together:.2f}% against "
                     f"{100 * separate:.2f}% for separate runs ({link('cotrain')}).")
    if "serve_load" in results:
        row = results["serve_load"]["rows"][0]
        lines.append(f"- **Serving 16 adapters over HTTP**: {row['requests_per_s']:.1f} requests/s from 32 clients, "
                     f"{row['failed']} failed, p99 {row['latency_p99_ms']:.0f} ms on 2 CPU cores ({link('serve_load')}).")
    if "scaling" in results:
        rows = results["scaling"]["rows"]
        trained = [r for r in rows if r["setting"] in ("lora-nf4", "lora-nf4-gc") and r.get("status") == "ok"]
        if trained:
            largest = max(r["parameters"] for r in trained)
            nf4 = {r["setting"]: r for r in trained if r["parameters"] == largest}
            name = next(iter(nf4.values()))["model"]
            full = next((r for r in rows if r["model"] == name and r["setting"] == "full"), None)
            label = f"{largest / 1e9:.0f}B" if largest >= 1e9 else f"{largest / 1e6:.0f}M"
            plain, checkpointed = nf4.get("lora-nf4"), nf4.get("lora-nf4-gc")
            peak = f"a peak of {(plain or checkpointed)['peak_rss_bytes'] / 2**30:.1f} GiB"
            if plain and checkpointed:
                peak += f" ({checkpointed['peak_rss_bytes'] / 2**30:.1f} GiB with gradient checkpointing)"
            tail = f"; full fine-tuning would need {full['estimate_bytes'] / 2**30:.0f} GiB" if full else ""
            lines.append(f"- **A {label} model on a 24 GiB CPU machine**: {name} trains with LoRA on NF4 at {peak}{tail} "
                         f"({link('scaling')}).")
    if "federated" in results and results["federated"].get("baselines"):
        fed = results["federated"]
        share = max(r["share_of_whole_model"] for r in fed["runs"])
        lines.append(f"- **Federated LoRA on Flower**: each client's message is {100 * share:.2f}% of the whole model "
                     f"({link('federated')}).")
    if "routing" in results:
        rows = results["routing"]["rows"]
        routed = max((r for n, r in rows.items() if n.startswith("routed-")), key=lambda r: r["total"]["accuracy"])
        lines.append(f"- **Automatic routing** over four task adapters: {100 * routed['total']['accuracy']:.1f}% routed against "
                     f"{100 * rows['oracle']['total']['accuracy']:.1f}% with the right adapter named by hand ({link('routing')}).")
    if "serve_scale" in results:
        rows = {r["variant"]: r for r in results["serve_scale"]["rows"]}
        zipf, sixteen = rows.get("1,000, Zipf(1)"), rows.get("16, uniform")
        if zipf and sixteen:
            lines.append(f"- **1,000 adapters on one base**: {zipf['requests_per_s'] / sixteen['requests_per_s']:.2f}x the 16-adapter "
                         f"requests/s under Zipf popularity, {zipf['failed']} failed ({link('serve_scale')}).")
    return lines


def summary_section() -> str:
    """The README's short summary: headline figures and the compare table in brief."""
    results = {path.stem: data for path, data in _results()}
    parts = _headlines(results)
    for _path, data in _compare_results():
        settings = data["settings"]
        rows = [row for row in data["rows"] if row["status"] == "ok"]
        if not rows:
            continue
        parts += ["", f"Every method on {settings['model']} / {settings['task']}, one budget (`{settings['command']}`):", "",
                  "| method | accuracy | trainable share | adapter file | peak RSS | time / step |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in rows:
            parts.append(f"| {row['method']} | {100 * row['accuracy']:.2f}% | {100 * row['trainable_share']:.3g}% | "
                         f"{_size(row['adapter_bytes'])} | {row['peak_rss_mib']:,.0f} MiB | "
                         f"{1000 * row['median_step_time_s']:.0f} ms |")
    parts += ["", "Every table, with its command, machine load and how it was measured: [docs/results.md](docs/results.md)."]
    return "\n".join(parts).strip() + "\n"


def _replace(path: Path, start: str, end: str, content: str) -> None:
    text = path.read_text()
    pattern = re.compile(rf"({re.escape(start)}\n)(.*?)({re.escape(end)})", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {start} ... {end} block")
    path.write_text(pattern.sub(lambda m: m.group(1) + content + m.group(3), text))


def main() -> int:
    _replace(RESULTS_PAGE, "<!-- results:start -->", "<!-- results:end -->", full_section())
    _replace(ROOT / "README.md", "<!-- summary:start -->", "<!-- summary:end -->", summary_section())
    print(f"docs/results.md and the README summary rewritten from {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
