"""The web page `peftkit serve` shows at `/`, and the JSON it reads.

    GET /                 static/dashboard.html: plain HTML and JavaScript, no build step
    GET /v1/dashboard     the server, the cache, and per adapter: state, memory, traffic and latency
    GET /v1/routing       the router, the routable adapters, and the recent routing decisions (newest first)

The page polls both JSON endpoints every two seconds and has a playground that sends a text to a chosen
adapter or to "auto" (POST /v1/classify on a classification model, /v1/chat/completions on a causal LM).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from peftkit.errors import PeftkitError
from peftkit.serve.routing import AUTO_ADAPTER, ROUTERS

PAGE = Path(__file__).parent / "static" / "dashboard.html"
STATE_ORDER = {"slot": 0, "memory": 1, "disk": 2}


def dashboard_state(server, limit: int = 100) -> dict[str, Any]:
    """What the page shows: the `limit` busiest adapters (those in a slot or in memory first), and totals."""
    cache = server.cache.snapshot()
    traffic = server.traffic.snapshot()
    memory = server.cache.memory_sizes()
    entries = []
    for entry in server.list_adapters():
        name = entry["name"]
        try:
            slot_bytes = server.model.adapter_bytes(name) if entry["state"] == "slot" else None
        except PeftkitError:  # evicted by the worker since the state was read
            slot_bytes = None
        entries.append({
            "name": name, "state": entry["state"], "rank": entry.get("rank"), "labels": entry.get("labels"),
            "file_bytes": entry.get("file_bytes"), "memory_bytes": memory.get(name), "slot_bytes": slot_bytes,
            "error": entry.get("error"), **traffic.get(name, {"requests": 0, "rows": 0, "failed": 0}),
        })
    entries.sort(key=lambda e: (STATE_ORDER.get(e["state"], 3), -e["requests"], e["name"]))
    states = {state: sum(1 for e in entries if e["state"] == state) for state in STATE_ORDER}
    slot_tensors = sum(p.numel() * p.element_size() for p in server.model.slot_parameters())
    return {
        "model": server.model_name, "kind": server.kind, "uptime_s": round(time.time() - server.started_at, 1),
        "router": server.router.name, "queue_depth": server.batcher.queue_depth, "batches": server.batcher.batches_run,
        "adapter_count": len(entries), "states": states,
        "cache": {key: cache[key] for key in ("capacity", "byte_budget", "memory_bytes", "slot_hits", "memory_hits",
                                              "disk_loads", "memory_evictions", "slot_evictions")},
        "slot_tensor_bytes": slot_tensors,
        "adapters": entries[:limit], "shown": min(limit, len(entries)),
    }


def routing_state(server, recent: int = 50) -> dict[str, Any]:
    server.routing.table()  # rescans if the directory changed
    decisions = list(server.routing_log)[-recent:][::-1]
    return {"router": server.router.name, "routers": list(ROUTERS), "auto": AUTO_ADAPTER,
            **server.routing.summary(), "recent": decisions}


def add_dashboard_routes(app: FastAPI, server) -> None:
    """GET /, /v1/dashboard and /v1/routing on `app`."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        try:
            return HTMLResponse(PAGE.read_text(encoding="utf-8"))
        except OSError as error:
            raise PeftkitError(f"the dashboard page {PAGE} is missing from this install ({error}); reinstall peftkit") from None

    @app.get("/v1/dashboard")
    async def dashboard(limit: int = 100):
        if not 1 <= limit <= 10_000:
            raise PeftkitError(f"limit={limit}: give 1 to 10000 adapters to list")
        return await asyncio.to_thread(dashboard_state, server, limit)

    @app.get("/v1/routing")
    async def routing(recent: int = 50):
        if not 0 <= recent <= 200:
            raise PeftkitError(f"recent={recent}: give 0 to 200 decisions to list")
        return await asyncio.to_thread(routing_state, server, recent)
