"""Serving one base model with a directory of LoRA adapters over HTTP (`peftkit serve`).

    from peftkit.serve import ServeSettings, load_server, create_app
    server = load_server("minilm", "adapters/", ServeSettings(max_batch_size=32, max_wait_ms=5))
    app = create_app(server)            # FastAPI; run with uvicorn, or peftkit.serve.run(server)

Pieces: `cache` (adapter directory + two-tier LRU cache: memory under a byte budget, model slots),
`batching` (bounded queue, dynamic batches, one worker thread), `inference` (what a batch does on the
mixed-adapter model), `server` (sizing the model for the adapters, request limits), `app` (HTTP),
`metrics` (Prometheus text), `command` (the CLI subcommand).
"""

from peftkit.serve.app import create_app, run
from peftkit.serve.batching import BatchError, DynamicBatcher, QueueFullError, Request
from peftkit.serve.cache import AdapterCache, AdapterDirectory
from peftkit.serve.server import AdapterServer, ServeSettings, load_server

__all__ = ["AdapterCache", "AdapterDirectory", "AdapterServer", "BatchError", "DynamicBatcher", "QueueFullError",
           "Request", "ServeSettings", "create_app", "load_server", "run"]
