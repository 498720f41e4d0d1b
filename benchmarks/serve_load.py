"""Load test of `peftkit serve` on loopback: 16 adapters, 32 concurrent clients, mixed-adapter batching on and off.

    python benchmarks/serve_load.py                                   # ~3 minutes
    python benchmarks/serve_load.py --json benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --phase-s 10 --rounds 2           # quicker
    python benchmarks/serve_load.py --scale 1000 --json benchmarks/results/serve_scale.json   # 1,000 adapters

--scale N measures something else: N adapters against 16, each case in its own default `peftkit serve`
(mixed batching, 16 slots, --cache-bytes 256 MiB): 16 adapters (r=8 all-linear, as above) with uniform
popularity; N adapters of mixed ranks (4, 8, 16) and targets (q+v, q+k+v, FFN-in, all-linear) with
uniform popularity; the same N with Zipf(--zipf) popularity (ranks shuffled). Same clients, interleaved
phases. Reported besides throughput and latency: the adapter cache's hit rates over the timed phases
(slot hits, and slot-or-memory hits, per adapter use in a batch), disk loads, the cache's memory
against its budget, and each server's resident memory (now and peak). Targets: 0 failed requests,
N-adapter Zipf requests/s >= 0.8 x the 16-adapter figure, cache memory within the budget.

What runs. Three `peftkit serve --model minilm` processes on free loopback ports, started exactly as
a user starts them (the `peftkit` command, `--no-access-log`), differing only in how they batch:
  mixed              the default: requests for any adapters batch together; the batch's texts are
                     sorted by length and run as forwards of 8 rows, each mixing adapters
  mixed-one-forward  the same batches, each run as one forward (--forward-rows 0)
  per-adapter        --no-mixed-batching: each batch holds one adapter's requests (length-sorted
                     forwards of 8 rows too), the usual way to serve many adapters
Everything else is the same: --max-batch-size 32, --max-wait-ms 5, --max-queue 256, 16 slots (every
adapter stays loaded, so no variant pays to switch adapters).
The adapters are 16 LoRA adapters made here, not trained: r=8, alpha 16 on every linear layer of
minilm ("all-linear"), A and B drawn at random (init_lora_weights=False, seeded, so every adapter
changes the outputs), each with its own classification head of 2 to 6 classes (random, std 0.02),
saved with peftkit's save_pretrained (the peft layout) plus peftkit_run.json naming the labels.

The client is one asyncio process with --clients concurrent workers (httpx.AsyncClient, one
keep-alive connection each). Each worker loops: pick an adapter uniformly at random and 1 to 4
sentences of sst2's validation split at random, POST /v1/classify, record status and latency (from
send to the full response). The two servers are measured in interleaved phases (on, off, on, off,
...; --rounds rounds of --phase-s seconds each), so the machine's load falls on both alike; after a
phase's time is up, no new request starts and the ones in flight finish. Before the timed phases,
each server gets --warmup-s of the same traffic (not counted), which also loads every adapter.

Reported per variant, over all its phases: requests ok and failed (any status but 200, or a
connection error; target: 0 failed), throughput (requests/s and texts/s = completed / phase time),
latency p50 / p99, mean rows and adapters per model batch (from the server's /metrics, difference
over the timed phases), and from /v1/adapters the adapter cache's load time per adapter (disk ->
memory) and switch cost (memory -> slot).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import load_average, peftkit_command, write_results_json  # noqa: E402

VARIANTS = {  # name -> (label, extra `peftkit serve` arguments)
    "mixed": ("mixed adapters, length-sorted forwards of 8 rows (default)", []),
    "mixed-one-forward": ("mixed adapters, one forward per batch (--forward-rows 0)", ["--forward-rows", "0"]),
    "per-adapter": ("one adapter per batch (--no-mixed-batching)", ["--no-mixed-batching"]),
}


def make_adapters(folder: Path, count: int, rank: int, seed: int) -> list[str]:
    """`count` random LoRA adapters for minilm (r=`rank` all-linear, own head of 2-6 classes) in the peft layout."""
    import torch

    from peftkit import get_peft_model, io, zoo
    from peftkit.methods.lora import LoraConfig

    names = []
    for index in range(count):
        name = f"adapter-{index:02d}"
        labels = 2 + index % 5
        base, _ = zoo.load_classifier("minilm", num_labels=labels, seed=seed + index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1000 + index)
            wrapped = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                      init_lora_weights=False, task_type="SEQ_CLS"))
        wrapped.save_pretrained(folder / name)
        io.write_json(folder / name / "peftkit_run.json",
                      {"model": "minilm", "label_names": [f"class-{i}" for i in range(labels)], "kind": "random LoRA (load test)"})
        names.append(name)
    return names


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(adapters: Path, port: int, extra: list[str], args, log: Path) -> subprocess.Popen:
    command = [*peftkit_command(), "serve", "--model", "minilm", "--adapters", str(adapters), "--host", "127.0.0.1",
               "--port", str(port), "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(args.max_queue), "--max-texts", "4", "--no-access-log", *extra]
    if args.capacity:
        command += ["--capacity", str(args.capacity)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    handle = open(log, "wb")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_healthy(client, url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with code {process.returncode}; see its log")
        try:
            if (await client.get(f"{url}/health")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        await asyncio.sleep(0.25)
    raise RuntimeError(f"the server at {url} did not answer /health within {timeout:.0f} s")


async def drive(url: str, names: list[str], texts: list[str], clients: int, seconds: float, seed: int,
                request_budget: int | None, weights: list[float] | None = None) -> dict:
    """`clients` workers send /v1/classify for `seconds` (adapters drawn uniformly, or by `weights`);
    returns statuses and latencies."""
    import httpx

    rng = random.Random(seed)
    latencies, statuses, errors, text_count = [], {}, [], [0]
    started = time.perf_counter()
    deadline = started + seconds
    issued = [0]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        async def worker():
            while time.perf_counter() < deadline and (request_budget is None or issued[0] < request_budget):
                issued[0] += 1
                adapter = rng.choices(names, weights)[0] if weights else rng.choice(names)
                body = {"adapter": adapter, "texts": rng.sample(texts, rng.randint(1, 4))}
                sent = time.perf_counter()
                try:
                    response = await client.post("/v1/classify", json=body)
                    status = response.status_code
                    if status == 200:
                        answer = response.json()
                        if len(answer["results"]) != len(body["texts"]):
                            status = "wrong-count"
                except Exception as error:  # noqa: BLE001 - counted as a failure, with its kind
                    status = type(error).__name__
                    errors.append(repr(error)[:200])
                latencies.append(time.perf_counter() - sent)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status == 200:
                    text_count[0] += len(body["texts"])
        await asyncio.gather(*(worker() for _ in range(clients)))
    return {"seconds": time.perf_counter() - started, "latencies": latencies, "statuses": statuses,
            "texts": text_count[0], "errors": errors[:5]}


def metric_values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(peftkit_batch_(?:rows|adapters)_(?:sum|count)|peftkit_batch_seconds_total) (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


async def measure(args, adapters: Path, names: list[str], texts: list[str], workdir: Path) -> dict:
    cases = {variant: (adapters, names, None, extra) for variant, (_, extra) in VARIANTS.items()}
    return await measure_cases(args, cases, texts, workdir)


async def measure_cases(args, cases: dict, texts: list[str], workdir: Path) -> dict:
    """Start one server per case (name -> (adapter folder, names, popularity weights or None, extra server
    arguments)), warm each up, then measure them in interleaved phases."""
    import httpx

    processes, urls = {}, {}
    try:
        for case, (adapters, _, _, extra) in cases.items():
            port = free_port()
            processes[case] = start_server(adapters, port, extra, args, workdir / f"server-{case}.log")
            urls[case] = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=30.0) as probe:
            for case in cases:
                await wait_healthy(probe, urls[case], processes[case])
            for case, (_, names, weights, _) in cases.items():  # warm-up: loads adapters, fills caches; not counted
                await drive(urls[case], names, texts, args.clients, args.warmup_s, args.seed, None, weights)
            before = {c: metric_values((await probe.get(f"{urls[c]}/metrics")).text) for c in cases}
            cache_before = {c: (await probe.get(f"{urls[c]}/v1/adapters")).json()["cache"] for c in cases}
            phases = {case: [] for case in cases}
            budget = args.max_requests // (args.rounds * len(cases)) if args.max_requests else None
            for round_index in range(args.rounds):
                order = list(cases) if round_index % 2 == 0 else list(reversed(cases))
                for case in order:
                    _, names, weights, _ = cases[case]
                    phase = await drive(urls[case], names, texts, args.clients, args.phase_s,
                                        args.seed + 1 + round_index, budget, weights)
                    phases[case].append(phase)
                    ok = phase["statuses"].get("200", 0)
                    print(f"round {round_index + 1} {case:>11}: {ok} ok, {len(phase['latencies']) - ok} failed, "
                          f"{ok / phase['seconds']:.1f} req/s, p50 {1000 * percentile(phase['latencies'], 0.5):.0f} ms, "
                          f"load {load_average()}", file=sys.stderr, flush=True)
            after = {c: metric_values((await probe.get(f"{urls[c]}/metrics")).text) for c in cases}
            cache = {c: (await probe.get(f"{urls[c]}/v1/adapters")).json() for c in cases}
            health = {c: (await probe.get(f"{urls[c]}/health")).json() for c in cases}
            memory = {c: process_memory(processes[c].pid) for c in cases}
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    return {"phases": phases, "before": before, "after": after, "cache": cache, "health": health,
            "cache_before": cache_before, "memory": memory}


def process_memory(pid: int) -> dict[str, int]:
    """Resident memory of a process now and at its peak, in bytes (Linux /proc; empty elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except OSError:
        return {}
    return {key: int(fields[name].split()[0]) * 1024 for key, name in (("rss", "VmRSS"), ("peak_rss", "VmHWM")) if name in fields}


def summarize(variant: str, measured: dict) -> dict:
    phases = measured["phases"][variant]
    latencies = [x for phase in phases for x in phase["latencies"]]
    statuses: dict[str, int] = {}
    for phase in phases:
        for status, count in phase["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    seconds = sum(phase["seconds"] for phase in phases)
    ok = statuses.get("200", 0)
    before, after = measured["before"][variant], measured["after"][variant]
    batches = after["peftkit_batch_rows_count"] - before["peftkit_batch_rows_count"]
    rows = after["peftkit_batch_rows_sum"] - before["peftkit_batch_rows_sum"]
    adapters = after["peftkit_batch_adapters_sum"] - before["peftkit_batch_adapters_sum"]
    per_adapter = measured["cache"][variant]["adapters"]
    load_ms = [1000 * a["load_seconds"] for a in per_adapter if a.get("load_seconds")]
    switch_ms = [1000 * a["switch_seconds"] for a in per_adapter if a.get("switch_seconds")]
    return {
        "variant": variant, "requests": len(latencies), "ok": ok, "failed": len(latencies) - ok, "statuses": statuses,
        "seconds": seconds, "requests_per_s": ok / seconds, "texts_per_s": sum(p["texts"] for p in phases) / seconds,
        "latency_p50_ms": 1000 * percentile(latencies, 0.5), "latency_p99_ms": 1000 * percentile(latencies, 0.99),
        "batches": int(batches), "mean_batch_rows": rows / batches if batches else None,
        "mean_batch_adapters": adapters / batches if batches else None,
        "per_phase_requests_per_s": [p["statuses"].get("200", 0) / p["seconds"] for p in phases],
        "adapter_load_ms": load_ms, "adapter_switch_ms": switch_ms,
        "adapter_load_ms_median": statistics.median(load_ms) if load_ms else None,
        "adapter_switch_ms_median": statistics.median(switch_ms) if switch_ms else None,
        "cache": {k: v for k, v in measured["cache"][variant]["cache"].items() if k not in ("in_slots", "in_memory")},
        "errors": [e for p in phases for e in p["errors"]][:5],
    }


def _busy(load: str) -> bool:
    """Whether a load average line (\"1.08 1.66 1.88\") shows more runnable work than the machine has cores."""
    try:
        return float(load.split()[0]) > (os.cpu_count() or 1)
    except (ValueError, IndexError):
        return False


def markdown(rows: list[dict], args, names: list[str], load_before: str, load_after: str) -> str:
    by_name = {row["variant"]: row for row in rows}
    lines = [
        f"`peftkit serve --model minilm` on loopback, {len(names)} LoRA adapters (r={args.rank} all-linear, random, own "
        f"heads of 2-6 classes), {args.clients} concurrent clients sending /v1/classify with 1-4 sst2 sentences and a "
        f"random adapter; {args.rounds} interleaved rounds of {args.phase_s:g} s per variant after {args.warmup_s:g} s of "
        f"warm-up; --max-batch-size {args.max_batch_size}, --max-wait-ms {args.max_wait_ms:g}"
        f"{f', --threads {args.threads}' if args.threads else ''}{f', --capacity {args.capacity}' if args.capacity else ''}; "
        f"{os.cpu_count()}-core CPU, server and clients on the same cores (load average {load_before} before, "
        f"{load_after} after).",
        "",
        "| batching | requests ok | failed | requests/s | texts/s | p50 latency | p99 latency | rows per batch | "
        "adapters per batch | requests/s vs one adapter per batch | per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = by_name["per-adapter"]
    for row in rows:
        rounds = [a / b for a, b in zip(row["per_phase_requests_per_s"], baseline["per_phase_requests_per_s"])]
        lines.append(f"| {VARIANTS[row['variant']][0]} | {row['ok']:,} | {row['failed']} | {row['requests_per_s']:.1f} | "
                     f"{row['texts_per_s']:.1f} | {row['latency_p50_ms']:.0f} ms | {row['latency_p99_ms']:.0f} ms | "
                     f"{row['mean_batch_rows']:.1f} | {row['mean_batch_adapters']:.1f} | "
                     f"{row['requests_per_s'] / baseline['requests_per_s']:.2f}x | {min(rounds):.2f}x to {max(rounds):.2f}x |")
    load_ms = [x for row in rows for x in row.get("adapter_load_ms", [row["adapter_load_ms_median"]])]
    switch_ms = [x for row in rows for x in row.get("adapter_switch_ms", [row["adapter_switch_ms_median"]])]
    lines += ["", f"Adapter cache, each adapter's first use in each server: load time from disk (safetensors into memory) "
                  f"median {statistics.median(load_ms):.1f} ms (range {min(load_ms):.1f} to {max(load_ms):.1f}), switch "
                  f"cost (copy into a model slot) median {statistics.median(switch_ms):.1f} ms (range {min(switch_ms):.1f} "
                  f"to {max(switch_ms):.1f}); with every adapter in a slot, later requests pay neither. "
                  + ("Throughput is low in absolute terms because the machine was shared (load average above); the "
                     "variants ran interleaved under the same load, so the ratios are the comparison."
                     if _busy(load_before) else
                     "The variants ran interleaved, so the ratios are the comparison.")]
    return "\n".join(lines)


def render(path: Path) -> int:
    data = json.loads(path.read_text())
    settings = argparse.Namespace(**data["settings"])
    names = [f"adapter-{i:02d}" for i in range(settings.adapters)]
    data["markdown"] = markdown(data["rows"], settings, names, data["load_average"]["before"], data["load_average"]["after"])
    write_results_json(path, data)
    print(data["markdown"])
    return 0


# --- --scale: 1,000 adapters of mixed ranks and targets, uniform and Zipf popularity, against 16 -------------

SCALE_RANKS = (4, 8, 16)
SCALE_TARGETS = {"qv": ["query", "value"], "attention": ["query", "key", "value"], "ffn": ["intermediate.dense"],
                 "all-linear": "all-linear"}


def make_mixed_adapters(folder: Path, count: int, seed: int) -> list[str]:
    """`count` random LoRA adapters for minilm: rank 4, 8 or 16, targets from SCALE_TARGETS, own head of 2-6 classes.

    One template per (rank, targets) is saved by peftkit (get_peft_model + save_pretrained, the peft layout); every
    adapter is then that template's file layout and config with its own seeded random values, written by io.
    """
    import torch

    from peftkit import get_peft_model, io, zoo
    from peftkit.methods.lora import LoraConfig

    templates = {}
    base, _ = zoo.load_classifier("minilm", num_labels=2, seed=seed)
    for rank in SCALE_RANKS:
        for target_name, targets in SCALE_TARGETS.items():
            wrapped = get_peft_model(copy.deepcopy(base), LoraConfig(
                r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="SEQ_CLS"))
            template = folder.parent / f".template-{rank}-{target_name}"
            wrapped.save_pretrained(template)
            templates[(rank, target_name)] = (json.loads((template / io.CONFIG_NAME).read_text()),
                                              {k: tuple(v.shape) for k, v in io.read_tensors(template / io.WEIGHTS_NAME).items()})
            shutil.rmtree(template)
    generator = torch.Generator().manual_seed(seed)
    combos = list(templates)
    names = []
    for index in range(count):
        name = f"adapter-{index:04d}"
        config, shapes = templates[combos[index % len(combos)]]
        labels = 2 + index % 5
        tensors = {}
        for key, shape in shapes.items():
            if key.endswith("lora_A.weight"):
                tensors[key] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
            elif key.endswith("lora_B.weight"):
                tensors[key] = torch.randn(shape, generator=generator) * 0.02
            elif key.endswith("classifier.weight"):
                tensors[key] = torch.randn((labels, shape[1]), generator=generator) * 0.02
            elif key.endswith("classifier.bias"):
                tensors[key] = torch.zeros(labels)
            else:
                raise RuntimeError(f"unexpected tensor {key} in the template adapter")
        io.write_adapter_folder(folder / name, config, tensors, **{"peftkit_run.json": {
            "model": "minilm", "label_names": [f"class-{i}" for i in range(labels)], "kind": "random LoRA (load test)"}})
        names.append(name)
    return names


def zipf_weights(count: int, exponent: float, seed: int) -> list[float]:
    """Zipf popularity over `count` adapters, the ranks shuffled (seeded) so that popularity and size are unrelated."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    weights = [0.0] * count
    for rank, index in enumerate(order, start=1):
        weights[index] = 1.0 / rank ** exponent
    return weights


def summarize_scale(case: str, measured: dict) -> dict:
    row = summarize(case, measured)
    before, after = measured["cache_before"][case], measured["cache"][case]["cache"]
    delta = {k: after[k] - before[k] for k in ("slot_hits", "memory_hits", "disk_loads", "slot_evictions", "memory_evictions")}
    uses = delta["slot_hits"] + delta["memory_hits"] + delta["disk_loads"]
    row.update(cache_delta=delta, slot_hit_rate=delta["slot_hits"] / uses if uses else None,
               memory_or_slot_hit_rate=(delta["slot_hits"] + delta["memory_hits"]) / uses if uses else None,
               cache_memory_bytes=after["memory_bytes"], cache_budget_bytes=after["byte_budget"],
               adapters_used=sum(1 for a in measured["cache"][case]["adapters"] if a.get("requests")),
               adapters_listed=len(measured["cache"][case]["adapters"]), memory=measured["memory"][case])
    return row


def scale_markdown(rows: list[dict], args, sizes: dict, load_before: str, load_after: str) -> str:
    baseline = rows[0]
    mib = 2 ** 20
    lines = [
        f"`peftkit serve --model minilm` on loopback, {args.clients} concurrent clients sending /v1/classify with 1-4 sst2 "
        f"sentences; {args.rounds} interleaved rounds of {args.phase_s:g} s per case after {args.warmup_s:g} s of warm-up; "
        f"default server settings (16 slots, --cache-bytes {args.cache_bytes // mib} MiB){f', --threads {args.threads}' if args.threads else ''}. "
        f"16 adapters: r=8 all-linear ({sizes['16'] / mib:.0f} MiB on disk). {args.scale} adapters: ranks 4/8/16 x targets "
        f"q+v / q+k+v / FFN-in / all-linear ({sizes['scale'] / mib:.0f} MiB on disk), heads of 2-6 classes. Zipf exponent "
        f"{args.zipf}. {os.cpu_count()}-core CPU, servers and clients on the same cores (load average {load_before} before, "
        f"{load_after} after).",
        "",
        "| adapters, popularity | requests ok | failed | requests/s | vs 16 | p50 | p99 | rows per batch | adapters per batch | "
        "slot hit rate | slot or memory hit rate | disk loads | adapters used | cache memory / budget | server RSS (peak) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        memory = row["memory"]
        lines.append(
            f"| {row['variant']} | {row['ok']:,} | {row['failed']} | {row['requests_per_s']:.1f} | "
            f"{row['requests_per_s'] / baseline['requests_per_s']:.2f}x | {row['latency_p50_ms']:.0f} ms | {row['latency_p99_ms']:.0f} ms | "
            f"{row['mean_batch_rows']:.1f} | {row['mean_batch_adapters']:.1f} | {100 * (row['slot_hit_rate'] or 0):.1f}% | "
            f"{100 * (row['memory_or_slot_hit_rate'] or 0):.1f}% | {row['cache_delta']['disk_loads']:,} | {row['adapters_used']:,} | "
            f"{row['cache_memory_bytes'] / mib:.0f} / {row['cache_budget_bytes'] / mib:.0f} MiB | "
            f"{memory.get('rss', 0) / mib:.0f} MiB ({memory.get('peak_rss', 0) / mib:.0f}) |")
    return "\n".join(lines)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def scale_main(args, argv) -> int:
    from peftkit import zoo

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="serve-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    small, large = workdir / "adapters-16", workdir / f"adapters-{args.scale}"
    started = time.perf_counter()
    if not (small / "adapter-15").is_dir():
        shutil.rmtree(small, ignore_errors=True)
        make_adapters(small, 16, args.rank, args.seed)
    if not (large / f"adapter-{args.scale - 1:04d}").is_dir():
        shutil.rmtree(large, ignore_errors=True)
        make_mixed_adapters(large, args.scale, args.seed)
    small_names = [f"adapter-{i:02d}" for i in range(16)]
    large_names = [f"adapter-{i:04d}" for i in range(args.scale)]
    sizes = {"16": folder_size(small), "scale": folder_size(large)}
    print(f"adapters ready in {time.perf_counter() - started:.0f} s; logs in {workdir}", file=sys.stderr)
    texts = [example.text for example in zoo.load_task("sst2").validation]
    budget = ["--cache-bytes", str(args.cache_bytes)]
    cases = {
        "16, uniform": (small, small_names, None, budget),
        f"{args.scale:,}, uniform": (large, large_names, None, budget),
        f"{args.scale:,}, Zipf({args.zipf:g})": (large, large_names, zipf_weights(args.scale, args.zipf, args.seed), budget),
    }
    load_before = load_average()
    measured = asyncio.run(measure_cases(args, cases, texts, workdir))
    load_after = load_average()
    rows = [summarize_scale(case, measured) for case in cases]
    table = scale_markdown(rows, args, sizes, load_before, load_after)
    print(table)
    zipf, baseline = rows[2], rows[0]
    checks = [(f"0 failed requests ({sum(r['failed'] for r in rows)})", all(r["failed"] == 0 for r in rows)),
              (f"{args.scale:,} adapters, Zipf: {zipf['requests_per_s']:.1f} req/s >= 0.8 x {baseline['requests_per_s']:.1f} "
               f"(16 adapters)", zipf["requests_per_s"] >= 0.8 * baseline["requests_per_s"]),
              ("the adapter cache's memory within its budget in every server",
               all(r["cache_memory_bytes"] <= r["cache_budget_bytes"] for r in rows))]
    print()
    for text, ok in checks:
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    if args.json:
        write_results_json(args.json, {
            "command": ("python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
            "measured_at": time.strftime("%Y-%m-%d"), "markdown": table, "sizes_bytes": sizes,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "workdir", "render")},
            "rows": rows, "checks": [{"check": t, "pass": ok} for t, ok in checks],
            "load_average": {"before": load_before, "after": load_after}, "health": measured["health"],
        })
    return 0 if all(ok for _, ok in checks[:1]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per variant per round")
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--max-requests", type=int, default=None, help="cap on timed requests over all phases")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--capacity", type=int, default=None, help="adapter slots per server (default: one per adapter, "
                        "at most 16); fewer than --adapters makes the cache swap adapters in and out under load")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per server (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where adapters and server logs go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--scale", type=int, default=None, metavar="N",
                        help="instead of the batching variants: N adapters of mixed ranks and targets (e.g. 1000) under "
                             "uniform and Zipf popularity, against 16 adapters (default server settings)")
    parser.add_argument("--zipf", type=float, default=1.0, help="--scale: the Zipf exponent of adapter popularity")
    parser.add_argument("--cache-bytes", type=int, default=256 * 2**20, help="--scale: each server's --cache-bytes")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only rewrite the markdown of a results file this script wrote (no measuring)")
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.render))
    if args.scale:
        return scale_main(args, argv)

    from peftkit import zoo

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="serve-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    adapters = workdir / "adapters"
    shutil.rmtree(adapters, ignore_errors=True)
    started = time.perf_counter()
    names = make_adapters(adapters, args.adapters, args.rank, args.seed)
    texts = [example.text for example in zoo.load_task("sst2").validation]
    print(f"made {len(names)} adapters in {time.perf_counter() - started:.0f} s; servers' logs in {workdir}", file=sys.stderr)
    load_before = load_average()
    measured = asyncio.run(measure(args, adapters, names, texts, workdir))
    load_after = load_average()
    rows = [summarize(variant, measured) for variant in VARIANTS]
    table = markdown(rows, args, names, load_before, load_after)
    print(table)
    failed = sum(row["failed"] for row in rows)
    print(f"\n- {'PASS' if failed == 0 else 'FAIL'}: {failed} failed requests (target 0)")
    if args.json:
        command = "python benchmarks/serve_load.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        write_results_json(args.json, {
            "command": command.strip(), "measured_at": time.strftime("%Y-%m-%d"), "markdown": table,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "workdir", "render")},
            "rows": rows, "load_average": {"before": load_before, "after": load_after},
            "health": measured["health"],
        })
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
