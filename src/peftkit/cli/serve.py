"""`peftkit serve`: one base model and a folder of LoRA adapters over HTTP (needs the serve extra to run)."""

from __future__ import annotations

import sys

from peftkit.cli.options import DefaultsHelpFormatter, byte_count
from peftkit.errors import PeftkitError


def add_parsers(commands) -> None:
    from peftkit import zoo
    from peftkit.serve.routing import ROUTERS
    from peftkit.serve.server import ServeSettings

    defaults = ServeSettings()
    parser = commands.add_parser(
        "serve", help="serve a base model and a directory of LoRA adapters over HTTP (mixed-adapter batches)",
        description="An HTTP server (FastAPI + uvicorn) for one base model and a folder of LoRA adapters, one subfolder "
                    "each (what peftkit train writes to <run>/adapter, or whole run folders). Classification models answer "
                    "POST /v1/classify; causal LMs answer OpenAI-compatible /v1/completions and /v1/chat/completions with "
                    "model = adapter name. Requests for different adapters that arrive together run as one batch. "
                    "Naming the adapter \"auto\" lets the server choose it from the text; the page at / shows the "
                    "adapters, their traffic and the routing decisions, with a playground.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="minilm", help=f"built-in model ({', '.join(zoo.list_models())}) or a local Hugging Face model folder")
    parser.add_argument("--adapters", required=True, help="folder with one subfolder per adapter")
    parser.add_argument("--image-root", default=None, help="image models: the folder whose files /v1/classify may name by "
                        "path (relative to it; paths that leave it are refused); without it, images come as base64 only")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="rows (texts or prompts) per batch")
    batching.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                          help="how long the oldest waiting request waits for others to join its batch")
    batching.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests before answering 503")
    batching.add_argument("--forward-rows", type=int, default=defaults.forward_rows,
                          help="classification: run a batch as forwards of this many rows, its texts sorted by length "
                               "(less padding, faster on CPU); 0 = the whole batch in one forward (for a GPU)")
    batching.add_argument("--no-mixed-batching", action="store_true",
                          help="each batch holds requests for one adapter only (for comparison)")
    cache = parser.add_argument_group("adapter cache")
    cache.add_argument("--capacity", type=int, default=None, help="adapter slots in the model (default: adapters found, at most 16)")
    cache.add_argument("--cache-bytes", type=byte_count, default=defaults.cache_bytes,
                       help="adapters kept in memory after reading from disk, e.g. 256MiB (0 = re-read on every slot miss)")
    cache.add_argument("--max-rank", type=int, default=None, help="largest LoRA rank servable (default: the largest found)")
    cache.add_argument("--max-labels", type=int, default=None, help="most classes an adapter may have (default: the most found)")
    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max-texts", type=int, default=defaults.max_texts,
                        help="texts per classify request, prompts per completion request (default: --max-batch-size)")
    limits.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars, help="characters per text, prompt or message")
    limits.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per text for classification (truncated)")
    limits.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="completion tokens per request")
    limits.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    limits.add_argument("--max-body-bytes", type=byte_count, default=defaults.max_body_bytes)
    routing = parser.add_argument_group("routing (requests that name the adapter \"auto\")")
    routing.add_argument("--router", default=defaults.router, choices=sorted(ROUTERS),
                         help="centroid: the adapter whose training inputs' mean embedding is nearest; knn: the k nearest "
                              "stored training inputs vote. Adapters need routing data (peftkit train writes it; "
                              "peftkit routing computes it for an existing adapter)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the model (default: torch's, one per core); 1 is faster on a busy machine")
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")
    parser.set_defaults(handler=_serve, command_parser=parser)


def _serve(args) -> int:
    from peftkit.extras import require

    require("fastapi", "peftkit serve")  # before loading the model: the missing extra is named at once
    require("uvicorn", "peftkit serve")
    from peftkit.serve.app import run
    from peftkit.serve.server import load_server, settings_from

    settings = settings_from(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        mixed_batching=not args.no_mixed_batching, capacity=args.capacity, cache_bytes=args.cache_bytes,
        max_rank=args.max_rank, max_labels=args.max_labels, max_texts=args.max_texts, max_text_chars=args.max_text_chars,
        max_length=args.max_length, forward_rows=args.forward_rows, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=args.max_body_bytes, router=args.router,
    )
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise PeftkitError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from peftkit import zoo

    if zoo.model_kind(args.model) == "image":
        return _serve_images(args, settings)
    if args.image_root is not None:
        raise PeftkitError("--image-root applies to image models (e.g. --model efficientnet-lite0)")
    server = load_server(args.model, args.adapters, settings)
    plan = server.plan
    print(f"peftkit serve: {server.model_name} ({server.kind}), {len(plan.servable)} adapters in {server.directory.root}, "
          f"{plan.capacity} slots (max rank {plan.max_rank}), mixed batching {'on' if settings.mixed_batching else 'off'}, "
          f"batches of up to {settings.max_batch_size} rows after at most {settings.max_wait_ms:g} ms, "
          f"{__import__('torch').get_num_threads()} torch threads",
          file=sys.stderr, flush=True)
    for name, problem in plan.problems.items():
        print(f"peftkit serve: not serving {name!r}: {problem}", file=sys.stderr, flush=True)
    run(server, host=args.host, port=args.port, access_log=not args.no_access_log)
    return 0


def _serve_images(args, settings) -> int:
    from peftkit.serve.image_app import run
    from peftkit.serve.images import load_image_server

    server = load_image_server(args.model, args.adapters, settings, image_root=args.image_root)
    print(f"peftkit serve: {server.model_name} (image), {len(server.directory.names())} adapters in {server.directory.root}, "
          f"image paths {'under ' + str(server.image_root) if server.image_root else 'refused (base64 only)'}",
          file=sys.stderr, flush=True)
    run(server, host=args.host, port=args.port, access_log=not args.no_access_log)
    return 0
