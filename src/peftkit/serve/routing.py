"""Automatic routing: the server picks the adapter for a request from its input (`"model": "auto"`).

Routing data lives with each adapter, so adding an adapter never retrains or rewrites anything else.
`routing.safetensors` in the adapter folder (written by `peftkit train`, or for an existing adapter by
`peftkit routing ADAPTER --task TASK`) holds:
  "examples"  (n, 2 * hidden) float16, L2-normalized embeddings of up to 256 of the adapter's training inputs
  "centroid"  (2 * hidden,) float32, the normalized mean of all the embedded inputs
  metadata    format, the base model it was computed with, pooling, how many texts, the task
An embedding is the base model's own output without any adapter: the hidden states of its middle layer
and of its last layer, each mean-pooled over the text's tokens and L2-normalized, side by side (then
normalized again, so a cosine similarity is the mean of the two layers' cosines). The last layer says
what a text is about; the middle one keeps more of its form (a question, a product review, a movie
review): on minilm, adding it took routing to the right kind of task from 95.6% to 98.5% on held-out
training texts of sst2, trec, cr and mr (docs/routing.md): trec's short definition questions ("What is
bandwidth ?") stopped going to the product-review adapter.
A server computes the same embedding for a request's text on its own model (slot 0, no adapter), so
routing costs one extra base forward per routed text and no extra model in memory.

Routers (`ROUTERS`), given the routable adapters' data:
  centroid  nearest centroid by cosine similarity (one dot product per adapter)
  knn       k nearest stored examples over all adapters (cosine); each neighbour votes for its adapter
            with its similarity; the most votes win (captures tasks whose inputs are not one blob)

`RoutingIndex` keeps the routable adapters of an `AdapterDirectory`; it rescans when the directory
changes (a new adapter folder changes the directory's modification time) and at least every
`rescan_s` seconds, reading only routing files that are new or changed.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from peftkit import io
from peftkit.errors import PeftkitError

ROUTING_NAME = "routing.safetensors"
ROUTING_FORMAT = "peftkit-routing/2"  # /1 held the last layer only
AUTO_ADAPTER = "auto"  # the name a request gives to let the server choose
ROUTED_HEADER = "X-Peftkit-Adapter"  # the response header naming the chosen adapter(s)
DEFAULT_EXAMPLES = 256
POOLING = "mean-middle+last"  # see embed_texts
EMBEDDING_PARTS = 2  # an embedding has EMBEDDING_PARTS * hidden_size values


# --- embeddings --------------------------------------------------------------------------------------


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 32,
                forward_options: Callable[[int], dict[str, Any]] | None = None) -> torch.Tensor:
    """(len(texts), 2 * hidden) float32 routing embeddings of `texts` on `model`: the mean-pooled hidden states
    of the middle layer and of the last, each L2-normalized, concatenated and normalized again.

    forward_options(rows) gives extra keyword arguments for each forward (a mixed-adapter model's
    `adapter_names=["__base__"] * rows`). The caller makes sure no adapter is active.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    pieces = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        encoded = tokenizer(chunk, truncation=True, max_length=max_length)
        ids = [list(row) or [pad_id] for row in encoded["input_ids"]]
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in ids], dtype=torch.long)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], dtype=torch.long)
        options = forward_options(len(chunk)) if forward_options else {}
        output = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, **options)
        states = output.hidden_states  # the embeddings' output, then one per layer
        weights = mask.to(states[-1].device).unsqueeze(-1).float()
        parts = [torch.nn.functional.normalize((states[i].float() * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1)
                 for i in ((len(states) - 1) // 2, -1)]
        pieces.append(torch.nn.functional.normalize(torch.cat(parts, dim=-1), dim=-1).cpu())
    return torch.cat(pieces) if pieces else torch.zeros(0, 0)


# --- routing data files ------------------------------------------------------------------------------


@dataclass
class RoutingData:
    """One adapter's routing data: normalized example embeddings (n, hidden) and their centroid (hidden,)."""

    examples: torch.Tensor
    centroid: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        return self.metadata.get("model")


def routing_data_from(embeddings: torch.Tensor, model: str, task: str | None = None,
                      max_examples: int = DEFAULT_EXAMPLES, seed: int = 0) -> RoutingData:
    """Routing data from the (n, hidden) normalized embeddings of an adapter's training inputs."""
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise PeftkitError("routing data needs at least one embedded training text")
    centroid = torch.nn.functional.normalize(embeddings.float().mean(0), dim=0)
    keep = list(range(embeddings.shape[0]))
    if len(keep) > max_examples:
        keep = sorted(random.Random(seed).sample(keep, max_examples))
    metadata = {"format": ROUTING_FORMAT, "model": model, "pooling": POOLING,
                "texts": str(embeddings.shape[0]), "task": task or ""}
    return RoutingData(examples=embeddings[keep].float(), centroid=centroid, metadata=metadata)


def sample_texts(texts: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """Up to `count` of `texts`, a seeded sample (all of them, in order, when there are few)."""
    texts = [t for t in texts if t]
    return list(texts) if len(texts) <= count else random.Random(seed).sample(list(texts), count)


def write_routing_data(folder: str | os.PathLike, data: RoutingData) -> Path:
    """Write `routing.safetensors` into the adapter folder (atomically)."""
    path = Path(folder) / ROUTING_NAME
    io.write_tensors(path, {"examples": data.examples.to(torch.float16), "centroid": data.centroid.float()},
                     metadata=data.metadata)
    return path


def read_routing_data(folder: str | os.PathLike) -> RoutingData | None:
    """The adapter folder's routing data, or None where it has none; a damaged file is a PeftkitError."""
    path = Path(folder) / ROUTING_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            examples = handle.get_tensor("examples").float()
            centroid = handle.get_tensor("centroid").float()
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise PeftkitError(f"{path} is not readable routing data ({error}); write it again with `peftkit routing`") from None
    if metadata.get("format") != ROUTING_FORMAT:
        raise PeftkitError(f"{path} is not in the {ROUTING_FORMAT} format; write it again with `peftkit routing`")
    if examples.dim() != 2 or centroid.shape != examples.shape[1:]:
        raise PeftkitError(f"{path}: examples {tuple(examples.shape)} and centroid {tuple(centroid.shape)} do not match")
    return RoutingData(examples=examples, centroid=centroid, metadata=metadata)


def model_reference(model: str | os.PathLike) -> str:
    """How routing data names its base model: a built-in name as is, a folder as its absolute path."""
    from peftkit import zoo

    text = os.fspath(model)
    return text if text in zoo.list_models() else str(zoo.resolve_model(text).resolve())  # as peftkit_run.json records it


# --- routers -----------------------------------------------------------------------------------------


@dataclass
class RouteChoice:
    """The adapter chosen for one text, its score, and the best candidates (adapter, score), best first."""

    adapter: str
    score: float
    candidates: list[tuple[str, float]]

    def to_dict(self, router: str) -> dict[str, Any]:
        return {"router": router, "adapter": self.adapter, "score": round(self.score, 4),
                "candidates": [{"adapter": name, "score": round(score, 4)} for name, score in self.candidates]}


@dataclass
class RoutingTable:
    """The routable adapters, stacked: names (A,), centroids (A, hidden), examples (N, hidden), owners (N,)."""

    names: list[str]
    centroids: torch.Tensor
    examples: torch.Tensor
    owners: torch.Tensor

    @classmethod
    def build(cls, data: dict[str, RoutingData]) -> RoutingTable:
        names = sorted(data)
        if not names:
            return cls([], torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
        centroids = torch.stack([data[n].centroid for n in names])
        examples = torch.cat([data[n].examples for n in names])
        owners = torch.cat([torch.full((data[n].examples.shape[0],), i, dtype=torch.long) for i, n in enumerate(names)])
        return cls(names, centroids, examples, owners)


def _choices(names: list[str], scores: torch.Tensor, top: int = 3) -> list[RouteChoice]:
    """scores (texts, adapters) -> the best adapter per text, with the top candidates."""
    values, indices = scores.topk(min(top, scores.shape[1]), dim=1)
    return [RouteChoice(names[int(row_i[0])], float(row_v[0]), [(names[int(i)], float(v)) for v, i in zip(row_v, row_i)])
            for row_v, row_i in zip(values, indices)]


class NearestCentroid:
    """The adapter whose training inputs' centroid is most similar (cosine) to the text."""

    name = "centroid"

    def choose(self, table: RoutingTable, embeddings: torch.Tensor) -> list[RouteChoice]:
        return _choices(table.names, embeddings @ table.centroids.T)


class NearestExamples:
    """k-NN: the `k` most similar stored training inputs vote for their adapters with their similarity;
    an adapter's score is its share of the votes."""

    name = "knn"

    def __init__(self, k: int = 16):
        self.k = k

    def choose(self, table: RoutingTable, embeddings: torch.Tensor) -> list[RouteChoice]:
        similarity = embeddings @ table.examples.T
        values, indices = similarity.topk(min(self.k, similarity.shape[1]), dim=1)
        votes = torch.zeros(embeddings.shape[0], len(table.names))
        votes.scatter_add_(1, table.owners[indices], values.clamp(min=0))
        votes = votes / votes.sum(1, keepdim=True).clamp(min=1e-12)
        return _choices(table.names, votes)


ROUTERS: dict[str, Callable[[], Any]] = {"centroid": NearestCentroid, "knn": NearestExamples}


def make_router(name: str):
    if name not in ROUTERS:
        raise PeftkitError(f"unknown router {name!r}; choose one of: {', '.join(ROUTERS)}")
    return ROUTERS[name]()


# --- the index a server keeps ------------------------------------------------------------------------


class RoutingIndex:
    """The routable adapters of an `AdapterDirectory` (those with routing data for this base model).

    `table()` returns the current `RoutingTable`, rescanning first when the directory's modification
    time changed (an adapter folder added or removed) or `rescan_s` passed since the last scan. Only
    new or changed routing files are read. `eligible(name)` may exclude adapters the server cannot serve.
    Thread-safe.
    """

    def __init__(self, directory, model: str, hidden_size: int | None = None,
                 eligible: Callable[[str], bool] | None = None, rescan_s: float = 5.0):
        self.directory = directory
        self.model = model
        self.hidden_size = hidden_size
        self.eligible = eligible or (lambda name: True)
        self.rescan_s = rescan_s
        self.problems: dict[str, str] = {}  # adapter -> why its routing data is not used
        self.without_data = 0  # adapters with no routing data at all
        self._files: dict[str, tuple[Path, int, RoutingData | None]] = {}  # name -> (file, mtime_ns, data)
        self._table = RoutingTable.build({})
        self._stamp: int | None = None
        self._scanned_at = 0.0
        self._lock = threading.Lock()
        self.scans = 0

    def table(self, force: bool = False) -> RoutingTable:
        stamp = self.directory.root.stat().st_mtime_ns
        with self._lock:
            if force or stamp != self._stamp or time.monotonic() - self._scanned_at > self.rescan_s:
                self._scan(stamp)
            return self._table

    def _scan(self, stamp: int) -> None:
        data: dict[str, RoutingData] = {}
        problems: dict[str, str] = {}
        files: dict[str, tuple[Path, int, RoutingData | None]] = {}
        without = 0
        for name in self.directory.names():
            try:
                path = self.directory.folder(name) / ROUTING_NAME
                mtime = path.stat().st_mtime_ns if path.is_file() else -1
                known = self._files.get(name)
                found = known[2] if known and known[0] == path and known[1] == mtime else (
                    read_routing_data(path.parent) if mtime >= 0 else None)
            except PeftkitError as error:
                problems[name] = str(error)
                continue
            files[name] = (path, mtime, found)
            if found is None:
                without += 1
                continue
            problem = self._problem(name, found)
            if problem:
                problems[name] = problem
            else:
                data[name] = found
        self._files, self.problems, self.without_data = files, problems, without
        self._table = RoutingTable.build(data)
        self._stamp, self._scanned_at = stamp, time.monotonic()
        self.scans += 1

    def _problem(self, name: str, found: RoutingData) -> str | None:
        if found.model != self.model:
            return (f"its routing data was computed with the base model {found.model!r}, but this server runs "
                    f"{self.model!r}; compute it again: peftkit routing ADAPTER --task TASK --model {self.model}")
        if self.hidden_size is not None and found.centroid.shape[0] != EMBEDDING_PARTS * self.hidden_size:
            return (f"its routing embeddings have {found.centroid.shape[0]} dimensions; this model's have "
                    f"{EMBEDDING_PARTS * self.hidden_size}; compute it again: peftkit routing ADAPTER --task TASK --model {self.model}")
        if not self.eligible(name):
            return "this server cannot serve it"
        return None

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"routable": list(self._table.names), "without_routing_data": self.without_data,
                    "problems": dict(self.problems), "scans": self.scans}


def compute_routing_data(adapter_folder: str | os.PathLike, task: str, model: str, split: str = "train",
                         max_texts: int = 1024, max_examples: int = DEFAULT_EXAMPLES, max_length: int = 128,
                         seed: int = 0, holdout: dict | None = None) -> Path:
    """Compute and write the routing data of an existing adapter from its task's inputs (`peftkit routing`).

    `task` is a built-in task (a classification task, or an `-instruct` chat task, whose user turns are
    embedded) or a data path; `model` the base model the adapter was trained on; `holdout` the
    validation split its run held out of a single data file (peftkit_run.json's), left out here too.
    """
    from peftkit import zoo

    folder = Path(adapter_folder)
    if (folder / "adapter" / io.CONFIG_NAME).is_file():
        folder = folder / "adapter"
    if not (folder / io.CONFIG_NAME).is_file():
        raise PeftkitError(f"{adapter_folder} is not an adapter folder (no {io.CONFIG_NAME}); give runs/NAME or runs/NAME/adapter")
    import json

    try:
        json.loads((folder / io.CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # no routing data beside an adapter no server can load
        raise PeftkitError(f"{folder / io.CONFIG_NAME} is not valid JSON ({error}); save the adapter again") from None
    texts = sample_texts(task_texts(task, split, holdout), max_texts, seed)
    kind = zoo.BUILTIN_MODELS[model].kind if model in zoo.BUILTIN_MODELS else None
    if kind == "causal" or (kind is None and _is_causal_folder(model)):
        base, tokenizer = zoo.load_causal_lm(model)
    else:
        base, tokenizer = zoo.load_classifier(model, num_labels=2)
    embeddings = embed_texts(base.eval(), tokenizer, texts, max_length=max_length)
    return write_routing_data(folder, routing_data_from(embeddings, model_reference(model), task=str(task),
                                                        max_examples=max_examples, seed=seed))


def task_texts(task: str, split: str = "train", holdout: dict | None = None) -> list[str]:
    """The input texts of a task's split: a classification task's texts, a chat task's user turns."""
    from peftkit import zoo

    if str(task).endswith("-instruct"):
        from peftkit.train.conversations import load_chat_task

        conversations = getattr(load_chat_task(task), split, None) or []
        return [next((m.content for m in reversed(c.prompt_messages) if m.role == "user"), "") for c in conversations]
    data = zoo.load_task(task)
    if holdout and not data.validation:  # the split a run held out of its single data file, rebuilt exactly
        from peftkit.train.data import hold_out_validation

        data = hold_out_validation(data, holdout["fraction"], holdout["seed"])
    examples = getattr(data, split, None)
    if not examples:
        raise PeftkitError(f"task {task!r} has no {split!r} split to compute routing data from")
    return [example.text for example in examples]


def _is_causal_folder(model: str) -> bool:
    import json

    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in architectures)


# --- in the server -----------------------------------------------------------------------------------


@dataclass
class EmbedWork:
    texts: list[str]


class EmbeddingRunner:
    """Runs batches of "embed" requests on a server's mixed-adapter model with no adapter (slot 0):
    one embedding (2 * hidden,) per text, a (texts, 2 * hidden) tensor per request."""

    def __init__(self, model, tokenizer, base_adapter: str, max_length: int = 128, causal: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.base_adapter = base_adapter
        self.max_length = max_length
        self.causal = causal  # a causal LM computes logits for the last position only (they are not used)

    def run_batch(self, requests) -> list[torch.Tensor]:
        texts = [text for request in requests for text in request.payload.texts]

        def options(rows: int) -> dict[str, Any]:
            return {"adapter_names": [self.base_adapter] * rows, **({"logits_to_keep": 1} if self.causal else {})}
        embeddings = embed_texts(self.model, self.tokenizer, texts, self.max_length, forward_options=options)
        results, start = [], 0
        for request in requests:
            results.append(embeddings[start:start + len(request.payload.texts)])
            start += len(request.payload.texts)
        return results


def routed_headers(result: dict[str, Any]) -> dict[str, str]:
    """The response header naming the adapter(s) routing chose (none when the request named its adapter)."""
    chosen = result.get("routed_to")
    return {ROUTED_HEADER: ",".join(dict.fromkeys(chosen))} if chosen else {}
