"""Serving one base model with a directory of LoRA adapters over HTTP (`peftkit serve`).

    from peftkit.serve import ServeSettings, load_server, create_app
    server = load_server("minilm", "adapters/", ServeSettings(max_batch_size=32, max_wait_ms=5))
    app = create_app(server)            # FastAPI; run with uvicorn, or peftkit.serve.run(server)

Pieces: `cache` (adapter directory + two-tier LRU cache: memory under a byte budget, model slots),
`batching` (bounded queue, dynamic batches, one worker thread), `inference` (what a batch does on the
mixed-adapter model), `server` (sizing the model for the adapters, request limits), `app` (HTTP),
`metrics` (Prometheus text). The command line is peftkit.cli.serve.

Only `app` needs the serve extra (FastAPI, uvicorn); the names are imported when first used, so the
rest of peftkit (and `peftkit serve --help`) works on a core install.
"""

import importlib

_HOMES = {
    "create_app": "app", "run": "app",
    "BatchError": "batching", "DynamicBatcher": "batching", "QueueFullError": "batching", "Request": "batching",
    "AdapterCache": "cache", "AdapterDirectory": "cache",
    "AdapterServer": "server", "ServeSettings": "server", "load_server": "server",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'peftkit.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"peftkit.serve.{_HOMES[name]}"), name)

__all__ = ["AdapterCache", "AdapterDirectory", "AdapterServer", "BatchError", "DynamicBatcher", "QueueFullError",
           "Request", "ServeSettings", "create_app", "load_server", "run"]
