"""Rewrite the README's results section from the benchmark outputs in benchmarks/results/*.json.

    python benchmarks/update_readme.py

Each results file carries the markdown table its benchmark printed ("markdown"), the command that
produced it ("command") and when ("measured_at"); this script only assembles them, so the README
shows exactly what the benchmarks measured.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ["default_job", "lora_vs_full", "lora_step_time", "methods", "methods_step_time", "instruct", "sft_step_time",
         "generation", "quantize", "lora_fused", "mixed_batch", "cotrain", "cotrain_passes", "interference",
         "serve_load"]
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
}


def section() -> str:
    parts = []
    files = sorted(RESULTS.glob("*.json"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    for path in files:
        data = json.loads(path.read_text())
        if "markdown" not in data:
            continue
        title = TITLES.get(path.stem, path.stem)
        when = f", measured {data['measured_at']}" if data.get("measured_at") else ""
        note = f"\n{data['note'].strip()}\n" if data.get("note") else ""
        parts.append(f"### {title}\n\n`{data.get('command', 'python benchmarks/' + path.stem + '.py')}`{when}\n\n"
                     f"{data['markdown'].strip()}\n{note}")
    from peftkit.bench.report import SUMMARY_PLOT, markdown_section

    for path in sorted(RESULTS.glob("compare_*/results.json")):  # written by `peftkit compare --output-dir`
        data = json.loads(path.read_text())
        settings, figure = data["settings"], path.parent / SUMMARY_PLOT
        plot = figure.relative_to(ROOT).as_posix() if figure.is_file() else None
        parts.append(f"### Methods side by side (`peftkit compare`): {settings['model']} / {settings['task']}\n\n"
                     f"{markdown_section(data['rows'], settings, plot)}")
    return "\n".join(parts) if parts else "(not measured yet)\n"


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(r"(<!-- results:start -->\n)(.*?)(<!-- results:end -->)", re.S)
    if not pattern.search(text):
        print("README.md has no <!-- results:start --> ... <!-- results:end --> block", file=sys.stderr)
        return 1
    readme.write_text(pattern.sub(lambda m: m.group(1) + section() + m.group(3), text))
    print(f"README.md results rewritten from {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
