"""Load test of `peftkit serve` on loopback: 16 adapters, 32 concurrent clients, mixed-adapter batching on and off.

    python benchmarks/serve_load.py                                   # ~3 minutes
    python benchmarks/serve_load.py --json benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --phase-s 10 --rounds 2           # quicker

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
                request_budget: int | None) -> dict:
    """`clients` workers send /v1/classify for `seconds`; returns statuses and latencies."""
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
                body = {"adapter": rng.choice(names), "texts": rng.sample(texts, rng.randint(1, 4))}
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
    import httpx

    processes, urls = {}, {}
    try:
        for variant, (_, extra) in VARIANTS.items():
            port = free_port()
            processes[variant] = start_server(adapters, port, extra, args, workdir / f"server-{variant}.log")
            urls[variant] = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=10.0) as probe:
            for variant in VARIANTS:
                await wait_healthy(probe, urls[variant], processes[variant])
            for variant in VARIANTS:  # warm-up: loads every adapter, fills caches; not counted
                await drive(urls[variant], names, texts, args.clients, args.warmup_s, args.seed, None)
            before = {v: metric_values((await probe.get(f"{urls[v]}/metrics")).text) for v in VARIANTS}
            phases = {variant: [] for variant in VARIANTS}
            budget = args.max_requests // (args.rounds * len(VARIANTS)) if args.max_requests else None
            for round_index in range(args.rounds):
                order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
                for variant in order:
                    phase = await drive(urls[variant], names, texts, args.clients, args.phase_s,
                                        args.seed + 1 + round_index, budget)
                    phases[variant].append(phase)
                    ok = phase["statuses"].get("200", 0)
                    print(f"round {round_index + 1} {variant:>11}: {ok} ok, {len(phase['latencies']) - ok} failed, "
                          f"{ok / phase['seconds']:.1f} req/s, p50 {1000 * percentile(phase['latencies'], 0.5):.0f} ms, "
                          f"load {load_average()}", file=sys.stderr, flush=True)
            after = {v: metric_values((await probe.get(f"{urls[v]}/metrics")).text) for v in VARIANTS}
            cache = {v: (await probe.get(f"{urls[v]}/v1/adapters")).json() for v in VARIANTS}
            health = {v: (await probe.get(f"{urls[v]}/health")).json() for v in VARIANTS}
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    return {"phases": phases, "before": before, "after": after, "cache": cache, "health": health}


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
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only rewrite the markdown of a results file this script wrote (no measuring)")
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.render))

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
