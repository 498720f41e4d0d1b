"""`peftkit inspect`: what an adapter folder holds (peftkit's or Hugging Face peft's)."""

from __future__ import annotations

import json

from peftkit.bench.report import human_bytes


def add_parsers(commands) -> None:
    parser = commands.add_parser("inspect", help="show an adapter's config, targets, parameter count and size")
    parser.add_argument("adapter", help="adapter folder (peftkit's or Hugging Face peft's)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=_inspect, command_parser=parser)


def _inspect(args) -> int:
    from peftkit.inspect import inspect_adapter

    report = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"adapter      {report['folder']}")
    print(f"method       {report['peft_type']}")
    print(f"base model   {report['base_model'] or 'not recorded'}")
    print(f"parameters   {report['parameters']:,d} in {report['tensors']} tensors ({report['dtype']})")
    print(f"file size    {human_bytes(report['file_bytes'])}")
    print(f"modules      {len(report['modules'])}: " + ", ".join(report["modules"][:8]) + (" ..." if len(report["modules"]) > 8 else ""))
    ranks = report.get("ranks", {})
    if ranks and (len(set(ranks.values())) > 1 or report["peft_type"] == "ADALORA"):  # where AdaLoRA put its ranks
        shown = ", ".join(f"{m}: {r}" for m, r in list(ranks.items())[:8])
        print(f"ranks        {sum(ranks.values())} in total; {shown}" + (" ..." if len(ranks) > 8 else ""))
    print("config")
    for key, value in sorted(report["config"].items()):
        if key == "rank_pattern" and isinstance(value, dict) and any(isinstance(v, list) for v in value.values()):
            continue  # AdaLoRA's kept-triplet masks: the ranks line above sums them up
        if value not in (None, {}, [], False) or key in ("r", "lora_alpha"):
            print(f"  {key}: {value}")
    for name, sub in report.get("other_adapters", {}).items():
        print(f"other adapter {name!r}: {sub['peft_type']}, {sub['parameters']:,d} parameters, {human_bytes(sub['file_bytes'])}")
    return 0
