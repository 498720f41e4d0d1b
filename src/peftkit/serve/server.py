"""One base model, a directory of LoRA adapters, and the batcher in front of them (no HTTP here).

`load_server(model, adapters, settings)` reads the adapter directory, sizes a
`peftkit.mixed.MixedLoraModel` for what it finds (targeted modules, largest rank, most labels), and
returns an `AdapterServer`. Its async methods (`classify`, `complete`, ...) check a request's limits,
queue it for the next batch and return the result; `peftkit.serve.app` puts HTTP in front of them.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from peftkit import io, zoo
from peftkit.errors import PeftkitError
from peftkit.serve.batching import DynamicBatcher, QueueFullError, Request
from peftkit.serve.cache import (
    AdapterCache,
    AdapterDirectory,
    AdapterInfo,
    AdapterMismatchError,
    AdapterNameError,
    UnknownAdapterError,
)
from peftkit.serve.inference import (
    BASE_ADAPTER,
    Classification,
    ClassificationRunner,
    ClassifyWork,
    Completion,
    GenerateWork,
    GenerationRunner,
)
from peftkit.serve.metrics import AdapterTraffic
from peftkit.serve.routing import AUTO_ADAPTER, ROUTERS, EmbeddingRunner, EmbedWork, RouteChoice, RoutingIndex, make_router, model_reference
from peftkit.targeting import CLASSIFIER_HEAD_NAMES


class RequestTooLargeError(PeftkitError):
    """A request over one of the server's size limits (HTTP 413)."""


class WrongEndpointError(PeftkitError):
    """A classification request to a causal model or the other way round (HTTP 400)."""


@dataclass
class ServeSettings:
    """Batching, cache and request limits of a server (the `peftkit serve` options)."""

    max_batch_size: int = 32  # rows (texts or prompts) per batch
    max_wait_ms: float = 5.0  # how long the oldest request waits for others to join its batch
    max_queue: int = 256  # waiting requests; more are refused with 503
    mixed_batching: bool = True  # False: each batch holds one adapter's requests
    capacity: int | None = None  # adapter slots in the model (default: min(adapters found, 16), at least 1)
    cache_bytes: int = 256 * 2**20  # adapters kept in memory after reading from disk
    max_rank: int | None = None  # largest LoRA rank servable (default: the largest found)
    max_labels: int | None = None  # most classes an adapter may have (default: the most found)
    target_modules: list[str] | str | None = None  # modules adapters may target (default: those found; all-linear if none)
    max_texts: int | None = None  # texts per /v1/classify request, prompts per /v1/completions (default: max_batch_size)
    max_text_chars: int = 4000  # characters per text, prompt or chat message
    max_length: int = 128  # tokens per text for classification (longer texts are truncated)
    forward_rows: int = 8  # classification: a batch runs as length-sorted forwards of this many rows (0: one forward)
    max_tokens: int = 256  # completion tokens per request
    max_prompt_tokens: int = 1024  # prompt tokens per completion request
    max_body_bytes: int = 1 * 2**20  # request body size
    router: str = "centroid"  # how "auto" chooses an adapter (peftkit.serve.routing.ROUTERS)
    routing_rescan_s: float = 5.0  # the routing index rescans the adapter directory at least this often

    def check(self) -> None:
        if self.max_texts is None:
            self.max_texts = self.max_batch_size
        for name in ("max_batch_size", "max_queue", "max_texts", "max_text_chars", "max_length", "max_tokens",
                     "max_prompt_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise PeftkitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.router not in ROUTERS:
            raise PeftkitError(f"--router {self.router!r} is not a router; choose one of: {', '.join(ROUTERS)}")
        if self.max_wait_ms < 0 or self.cache_bytes < 0 or self.forward_rows < 0:
            raise PeftkitError("--max-wait-ms, --cache-bytes and --forward-rows must be >= 0")
        if self.capacity is not None and self.capacity < 1:
            raise PeftkitError(f"--capacity must be at least 1 adapter slot, got {self.capacity}")
        if self.max_texts > self.max_batch_size:
            raise PeftkitError(f"--max-texts ({self.max_texts}) must not exceed --max-batch-size ({self.max_batch_size}): "
                               "a request runs within one batch")


@dataclass
class AdapterShape:
    """What an adapter's tensor file holds, read from its header only: targeted modules, ranks, head."""

    ranks: dict[str, int]  # module path -> rank
    head: str | None  # "classifier" / "score" when it saves its own classification head
    num_labels: int | None


def read_adapter_shape(info: AdapterInfo) -> AdapterShape:
    path = info.folder / io.WEIGHTS_NAME
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise AdapterMismatchError(f"{path} is not a readable safetensors file ({error})") from None
    ranks, head, labels = {}, None, None
    for key, shape in shapes.items():
        name = key[len(io.KEY_PREFIX):] if key.startswith(io.KEY_PREFIX) else key
        if name.endswith(".lora_A.weight"):
            ranks[name[: -len(".lora_A.weight")]] = shape[0]
        elif name.rsplit(".", 1)[0] in CLASSIFIER_HEAD_NAMES and name.endswith(".weight"):
            head, labels = name.rsplit(".", 1)[0], shape[0]
    return AdapterShape(ranks=ranks, head=head, num_labels=labels)


def model_kind(model: str | Path) -> str:
    """'causal' or 'encoder', from the built-in model's kind or the folder's config.json architectures."""
    if isinstance(model, str) and model in zoo.BUILTIN_MODELS:
        return zoo.BUILTIN_MODELS[model].kind
    folder = zoo.resolve_model(model)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    return "causal" if any(a.endswith("ForCausalLM") for a in architectures) else "encoder"


@dataclass
class ModelPlan:
    """How to size the mixed-adapter model for the adapters found at start-up."""

    target_modules: list[str] | str
    max_rank: int
    head: str | None
    max_labels: int | None
    capacity: int
    servable: list[str]
    problems: dict[str, str]  # adapter -> why it cannot be served


def plan_model(directory: AdapterDirectory, kind: str, settings: ServeSettings) -> ModelPlan:
    targets: set[str] = set()
    ranks, labels, heads, servable, problems = [], [], set(), [], {}
    for name in directory.names():
        try:
            if name == AUTO_ADAPTER:
                raise AdapterNameError(f"the name {AUTO_ADAPTER!r} is reserved: requests name it to let the server "
                                       "choose an adapter; rename the folder")
            info = directory.describe(name)
            if info.peft_type != "LORA":
                raise AdapterMismatchError(f"it is a {info.peft_type} adapter; the server runs LoRA adapters only")
            shape = read_adapter_shape(info)
            _check_kind(name, kind, shape)
        except PeftkitError as error:
            problems[name] = str(error)
            continue
        targets.update(shape.ranks)
        ranks += list(shape.ranks.values())
        if shape.head:
            heads.add(shape.head)
            labels.append(shape.num_labels)
        servable.append(name)
    if len(heads) > 1:
        raise PeftkitError(f"the adapters in {directory.root} save different classification heads ({sorted(heads)}); "
                           "one server runs one base model, so they cannot all fit it")
    capacity = settings.capacity or max(1, min(len(servable), 16))
    return ModelPlan(
        target_modules=settings.target_modules or (sorted(targets) if targets else "all-linear"),
        max_rank=settings.max_rank or max(ranks, default=8),
        head=next(iter(heads), "classifier" if kind == "encoder" else None),
        max_labels=settings.max_labels or (max(labels) if labels else None),
        capacity=capacity, servable=servable, problems=problems,
    )


def _check_kind(name: str, kind: str, shape: AdapterShape) -> None:
    if kind == "encoder" and shape.head is None:
        raise AdapterMismatchError(
            f"adapter {name!r} saves no classification head ({'/'.join(CLASSIFIER_HEAD_NAMES)}), so it cannot "
            "classify; train it with peftkit train (which saves the head) on this base model"
        )
    if kind == "causal" and shape.head is not None:
        raise AdapterMismatchError(f"adapter {name!r} is a classifier (it saves a {shape.head} head) but this server runs a causal LM")


class AdapterServer:
    """A base model serving the adapters of a directory, batching concurrent requests together.

    Call `await start()` inside the event loop before use and `await stop()` after (the FastAPI app's
    lifespan does both).
    """

    def __init__(self, model_name: str, kind: str, mixed_model, tokenizer, directory: AdapterDirectory,
                 settings: ServeSettings, plan: ModelPlan):
        self.model_name = model_name
        self.kind = kind
        self.model = mixed_model
        self.tokenizer = tokenizer
        # Prompts are encoded on the event loop while the worker decodes: a fast tokenizer's Rust object must not
        # be used from two threads at once ("Already borrowed"), so each side has its own copy.
        self.prompt_tokenizer = copy.deepcopy(tokenizer)
        self.directory = directory
        self.settings = settings
        self.plan = plan
        self.cache = AdapterCache(directory, mixed_model, capacity=plan.capacity, byte_budget=settings.cache_bytes,
                                  check=self._check_adapter)
        if kind == "encoder":
            self.runner = ClassificationRunner(mixed_model, tokenizer, self.cache, max_length=settings.max_length,
                                               forward_rows=settings.forward_rows)
        else:
            tokenizer.padding_side = "left"
            self.runner = GenerationRunner(mixed_model, tokenizer, self.cache)
        self.embedder = EmbeddingRunner(mixed_model, tokenizer, BASE_ADAPTER, max_length=settings.max_length,
                                        causal=kind == "causal")
        hidden = getattr(getattr(mixed_model.base_model, "config", None), "hidden_size", None)
        self.routing = RoutingIndex(directory, model_reference(model_name), hidden_size=hidden,
                                    eligible=lambda name: name not in plan.problems, rescan_s=settings.routing_rescan_s)
        self.router = make_router(settings.router)
        self.routing_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)  # newest last
        self.traffic = AdapterTraffic()
        self.batcher = DynamicBatcher(self._run_batch, max_batch_size=settings.max_batch_size,
                                      max_wait_s=settings.max_wait_ms / 1000, max_queue=settings.max_queue,
                                      max_adapters=plan.capacity, mixed=settings.mixed_batching)
        self.started_at = time.time()

    async def start(self) -> None:
        await self.batcher.start()

    def _run_batch(self, requests: Sequence[Request]) -> list[Any]:
        # A batch holds one kind of work (its batch key): routing embeddings, or the runner's.
        if requests and requests[0].kind == "embed":
            return self.embedder.run_batch(requests)
        return self.runner.run_batch(requests)

    async def stop(self) -> None:
        await self.batcher.stop()

    def _check_adapter(self, info: AdapterInfo) -> None:
        if info.peft_type != "LORA":
            raise AdapterMismatchError(f"adapter {info.name!r} is a {info.peft_type} adapter; the server runs LoRA adapters only")
        shape = read_adapter_shape(info)
        _check_kind(info.name, self.kind, shape)
        if info.label_names is not None and shape.num_labels is not None and len(info.label_names) != shape.num_labels:
            raise AdapterMismatchError(
                f"adapter {info.name!r}: its {io.CONFIG_NAME} folder names {len(info.label_names)} labels in "
                f"peftkit_run.json but its head has {shape.num_labels} outputs; the folder is inconsistent"
            )

    # --- adapters -----------------------------------------------------------------------------

    def check_adapter_name(self, name: str) -> AdapterInfo | None:
        """The adapter's info (None for the base model); raises the directory's 400/404 errors."""
        if name == BASE_ADAPTER:
            if self.kind == "encoder":
                raise WrongEndpointError(f"{BASE_ADAPTER!r} (no adapter) has no trained classification head; name an adapter")
            return None
        self.directory.folder(name)
        return self.directory.describe(name)

    def label_names(self, name: str, count: int) -> list[str]:
        names = self.directory.describe(name).label_names
        return names if names is not None and len(names) == count else [f"LABEL_{i}" for i in range(count)]

    def list_adapters(self) -> list[dict[str, Any]]:
        snapshot = self.cache.snapshot()
        listed = []
        for name in self.directory.names():
            entry: dict[str, Any] = {"name": name, "state": self.cache.state(name)}
            try:
                info = self.directory.describe(name)
                entry.update(peft_type=info.peft_type, task_type=info.task_type, rank=info.rank,
                             labels=info.label_names, file_bytes=info.file_bytes)
            except PeftkitError as error:
                entry["error"] = str(error)
            if name in self.plan.problems:
                entry["error"] = self.plan.problems[name]
            entry.update(snapshot["adapters"].get(name, {}))
            listed.append(entry)
        return listed

    async def load_adapter(self, name: str) -> dict[str, Any]:
        """Read `name` from disk (if needed) and copy it into a slot now; returns its times."""
        self.check_adapter_name(name)
        if name == BASE_ADAPTER:
            raise WrongEndpointError(f"{BASE_ADAPTER!r} is the base model; it needs no loading")
        failures = await self.batcher.run_exclusive(self.cache.ensure_loaded, [name])
        if name in failures:
            raise _as_adapter_error(name, failures[name])
        await asyncio.to_thread(self.routing.table, True)  # a new adapter's routing data counts at once
        times = self.cache.snapshot()["adapters"].get(name, {})
        return {"name": name, "state": self.cache.state(name), **times}

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        """Drop `name` from its slot and memory (files stay on disk)."""
        if name not in self.cache.in_slots() and name not in self.cache.in_memory():
            self.check_adapter_name(name)  # 400/404 for a bad or unknown name
        was_loaded = await self.batcher.run_exclusive(self.cache.unload, name)
        return {"name": name, "unloaded": was_loaded, "state": self.cache.state(name)}

    # --- requests -----------------------------------------------------------------------------

    async def classify(self, adapter: str, texts: Sequence[str]) -> dict[str, Any]:
        """Labels and probabilities of `texts` with `adapter`; "auto" routes each text to an adapter."""
        self._check_texts(texts)
        if adapter == AUTO_ADAPTER:
            return await self._classify_routed(list(texts))
        self.check_adapter_name(adapter)
        return await self._classify_with(adapter, texts)

    async def _classify_routed(self, texts: list[str]) -> dict[str, Any]:
        choices = await self.route(texts, "classify")
        groups: dict[str, list[int]] = {}
        for index, choice in enumerate(choices):
            groups.setdefault(choice.adapter, []).append(index)
        answers = await asyncio.gather(*(self._classify_with(name, [texts[i] for i in rows]) for name, rows in groups.items()))
        results: list[dict[str, Any] | None] = [None] * len(texts)
        for (name, rows), answer in zip(groups.items(), answers):
            for index, result in zip(rows, answer["results"]):
                results[index] = {**result, "adapter": name, "labels": answer["labels"],
                                  "routing": choices[index].to_dict(self.router.name)}
        return {"model": self.model_name, "adapter": AUTO_ADAPTER, "router": self.router.name,
                "routed_to": [c.adapter for c in choices], "results": results}

    def _check_texts(self, texts: Sequence[str]) -> None:
        if self.kind != "encoder":
            raise WrongEndpointError(f"this server runs the causal LM {self.model_name!r}; use /v1/completions or "
                                     "/v1/chat/completions (/v1/classify needs a classification model, e.g. minilm)")
        limits = self.settings
        if not texts:
            raise PeftkitError("texts is empty: give at least one text to classify")
        if len(texts) > limits.max_texts:
            raise RequestTooLargeError(f"{len(texts)} texts in one request; the limit is {limits.max_texts} (--max-texts): "
                                       "split them over several requests")
        for number, text in enumerate(texts):
            if len(text) > limits.max_text_chars:
                raise RequestTooLargeError(f"texts[{number}] has {len(text)} characters; the limit is "
                                           f"{limits.max_text_chars} (--max-text-chars)")

    async def _classify_with(self, adapter: str, texts: Sequence[str]) -> dict[str, Any]:
        request = Request(kind="classify", adapter=adapter, rows=len(texts), payload=ClassifyWork(list(texts)),
                          batch_key="classify")
        result: Classification = await self._run(request)
        count = len(result.probabilities[0])
        labels = self.label_names(adapter, count)
        return {
            "model": self.model_name, "adapter": adapter, "labels": labels,
            "results": [{"label": labels[label_id], "label_id": label_id, "probabilities": probabilities}
                        for label_id, probabilities in zip(result.label_ids, result.probabilities)],
        }

    # --- routing ------------------------------------------------------------------------------

    async def route(self, texts: Sequence[str], endpoint: str) -> list[RouteChoice]:
        """The adapter `self.router` chooses for each text, from the routable adapters' routing data."""
        started = time.perf_counter()
        table = await asyncio.to_thread(self.routing.table)
        if not table.names:
            problems = self.routing.summary()["problems"]
            detail = f" ({len(problems)} have routing data this server cannot use; see GET /v1/routing)" if problems else ""
            raise UnknownAdapterError(
                f"'{AUTO_ADAPTER}' found no adapter with routing data in {self.directory.root}{detail}; name an adapter, "
                "or write an adapter's routing data with: peftkit routing ADAPTER_FOLDER --task TASK")
        request = Request(kind="embed", adapter=BASE_ADAPTER, rows=len(texts), payload=EmbedWork(list(texts)),
                          batch_key="embed")
        embeddings = await self._run(request)
        choices = self.router.choose(table, embeddings)
        seconds = time.perf_counter() - started
        for text, choice in zip(texts, choices):
            self.routing_log.append({"time": time.time(), "endpoint": endpoint, "text": text[:160],
                                     "ms": round(1000 * seconds, 1), **choice.to_dict(self.router.name)})
        return choices

    async def resolve_adapters(self, name: str, texts: Sequence[str], endpoint: str) -> tuple[list[str], list[dict] | None]:
        """The adapter per text: `name` for each, or where `name` is "auto" the routed ones (and their routing)."""
        if name != AUTO_ADAPTER:
            return [name] * len(texts), None
        choices = await self.route(texts, endpoint)
        return [c.adapter for c in choices], [c.to_dict(self.router.name) for c in choices]

    def encode_prompt(self, prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> list[int]:
        """Token ids of a completion prompt, or of chat messages through the tokenizer's chat template."""
        if self.kind != "causal":
            raise WrongEndpointError(f"this server runs the classification model {self.model_name!r}; use /v1/classify "
                                     "(completions need a causal LM, e.g. smollm2)")
        limits = self.settings
        texts = [prompt] if messages is None else [m["content"] for m in messages]
        for text in texts:
            if len(text) > limits.max_text_chars:
                raise RequestTooLargeError(f"a prompt or message has {len(text)} characters; the limit is "
                                           f"{limits.max_text_chars} (--max-text-chars)")
        if messages is not None:
            from peftkit.train.chat import encode_chat_prompt

            ids = encode_chat_prompt(messages, self.prompt_tokenizer)
        else:
            ids = self.prompt_tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise PeftkitError("the prompt is empty: give some text to complete")
        if len(ids) > limits.max_prompt_tokens:
            raise RequestTooLargeError(f"the prompt is {len(ids)} tokens; the limit is {limits.max_prompt_tokens} "
                                       "(--max-prompt-tokens)")
        return ids

    def make_completion_request(self, adapter: str, prompt_ids: list[int], max_tokens: int, temperature: float,
                                top_p: float, stream: bool) -> Request:
        if max_tokens > self.settings.max_tokens:
            raise PeftkitError(f"max_tokens={max_tokens} is over this server's limit of {self.settings.max_tokens} (--max-tokens)")
        self.check_adapter_name(adapter)
        # Greedy requests batch with each other whatever their temperature field; sampling ones need equal settings.
        key = ("generate", "greedy") if temperature == 0 else ("generate", float(temperature), float(top_p))
        work = GenerateWork(prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        return Request(kind="generate", adapter=adapter, rows=1, payload=work, batch_key=key, stream=stream)

    async def complete(self, requests: Sequence[Request]) -> list[Completion]:
        """Run completion requests (one per prompt, all queued or none) and wait for all of them."""
        free = self.settings.max_queue - self.batcher.queue_depth
        if len(requests) > free:
            raise QueueFullError(f"{len(requests)} prompts do not fit the queue ({self.batcher.queue_depth} of "
                                 f"{self.settings.max_queue} places taken)")
        for request in requests:
            self.batcher.submit(request)
        return list(await asyncio.gather(*(self._result(request) for request in requests)))

    def submit(self, request: Request) -> Request:
        return self.batcher.submit(request)

    async def _run(self, request: Request):
        self.batcher.submit(request)
        return await self._result(request)

    async def _result(self, request: Request):
        try:
            result = await request.future
        except PeftkitError as error:
            self._observe(request, ok=False)
            raise _as_adapter_error(request.adapter, error) from None
        except Exception:
            self._observe(request, ok=False)
            raise
        self._observe(request, ok=True)
        return result

    def _observe(self, request: Request, ok: bool) -> None:
        if request.kind != "embed":
            self.traffic.observe(request.adapter, request.rows, time.perf_counter() - request.enqueued_at, ok)


def _as_adapter_error(name: str, error: Exception) -> Exception:
    """A load failure as the client should see it: an adapter that does not fit is a 409, not a 500."""
    if isinstance(error, PeftkitError) and type(error) is PeftkitError:
        return AdapterMismatchError(f"adapter {name!r} cannot be loaded into this server's model: {error}")
    return error


def load_server(model: str | Path, adapters: str | Path, settings: ServeSettings | None = None) -> AdapterServer:
    """Load `model` (built-in name or folder) and size its mixed-adapter model for the adapters in `adapters`."""
    from peftkit.mixed import MixedLoraModel

    settings = settings or ServeSettings()
    settings.check()
    directory = AdapterDirectory(adapters)
    kind = model_kind(model)
    plan = plan_model(directory, kind, settings)
    if kind == "encoder":
        with warnings.catch_warnings():
            # The checkpoint's own head is replaced by the adapters' stacked heads: its size does not matter.
            warnings.filterwarnings("ignore", message=r".*had another shape and were randomly initialized")
            base, tokenizer = zoo.load_classifier(model, num_labels=max(plan.max_labels or 2, 2))
    else:
        base, tokenizer = zoo.load_causal_lm(model)
    mixed = MixedLoraModel(base.eval(), plan.target_modules, capacity=plan.capacity, max_rank=plan.max_rank,
                           head=plan.head if kind == "encoder" else None, max_labels=plan.max_labels)
    return AdapterServer(str(model), kind, mixed.eval(), tokenizer, directory, settings, plan)


def settings_from(**options) -> ServeSettings:
    known = {f.name for f in dataclasses.fields(ServeSettings)}
    return ServeSettings(**{k: v for k, v in options.items() if k in known and v is not None})
