"""The adapters a server can serve, and the cache that keeps the recently used ones ready.

`AdapterDirectory` is a folder with one subfolder per adapter (the name in URLs and request bodies is
the subfolder's name). A subfolder is either an adapter folder in the Hugging Face peft layout
(`adapter_config.json` + `adapter_model.safetensors`, as `peftkit train` writes to `<run>/adapter`) or
a whole run folder holding such an `adapter/`. Names are checked before any path is built: no
separators, no `..`, nothing that resolves outside the directory (a symlink pointing elsewhere too).

`AdapterCache` has two tiers, both least-recently-used:
  memory: adapter tensors read from disk, kept under a byte budget (`byte_budget`; 0 = keep none);
  slots:  the `capacity` slots of a mixed-adapter model, which a batch's adapters must occupy.
A batch asks for its adapters with `ensure_loaded`: an adapter already in a slot is a hit; one in
memory is copied into a slot (the switch cost); one on disk is read first (the load time). The cache
reports both times per adapter, plus hits, misses and evictions. The cache does not watch the files: an
adapter changed on disk is read again once it is unloaded (`unload`, DELETE /v1/adapters/{name}). Only the model's worker thread calls
`ensure_loaded` / `unload`; `snapshot` may be called from any thread.
"""

from __future__ import annotations

import difflib
import inspect
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftkit import io
from peftkit.errors import PeftkitError

RUN_INFO_NAME = "peftkit_run.json"  # as peftkit.train.job writes it (not imported: that pulls in training)


class AdapterNameError(PeftkitError):
    """A name that is not allowed (could leave the adapter directory): HTTP 400."""


class UnknownAdapterError(PeftkitError):
    """No adapter of that name in the directory: HTTP 404."""


class AdapterMismatchError(PeftkitError):
    """The adapter exists but this server cannot serve it (method, rank, labels, task): HTTP 409."""


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder says about itself, read from its small JSON files (no tensors)."""

    name: str
    folder: Path  # the folder holding adapter_config.json
    peft_type: str | None
    task_type: str | None
    rank: int | None  # largest rank of any layer (r and rank_pattern)
    label_names: list[str] | None  # from peftkit_run.json, in class-id order
    file_bytes: int  # size of adapter_model.safetensors
    config: dict[str, Any] = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "folder": str(self.folder), "peft_type": self.peft_type, "task_type": self.task_type,
                "rank": self.rank, "label_names": self.label_names, "file_bytes": self.file_bytes}


class AdapterDirectory:
    """A folder of adapters, one subfolder each; every lookup validates the name first."""

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise PeftkitError(f"the adapter directory {root} is not a folder; give the folder that holds one subfolder per adapter")
        self.root = root.resolve()
        self._described: dict[str, tuple[float, AdapterInfo]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every subfolder that holds an adapter (directly or as `adapter/`), sorted."""
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            if _adapter_subfolder(path) is not None and _inside(path.resolve(), self.root):
                found.append(path.name)
        return found

    def folder(self, name: str) -> Path:
        """The adapter folder (holding adapter_config.json) of `name`.

        Raises AdapterNameError for a name that could leave the directory, UnknownAdapterError for
        one that names no adapter here (the message lists the ones that exist).
        """
        if not isinstance(name, str) or len(name) > 200:
            raise AdapterNameError(f"adapter name must be a string of at most 200 characters, got {str(name)[:60]!r}")
        try:
            io.check_adapter_name(name)
        except PeftkitError:
            raise AdapterNameError(
                f"adapter name {name!r} is not allowed: a name is one folder in the adapter directory, so it may not "
                "be empty, start with '.', or hold '/', '\\' or NUL; use letters, digits, '-', '_'"
            ) from None
        path = self.root / name
        if path.exists() and not _inside(path.resolve(), self.root):
            raise AdapterNameError(f"adapter name {name!r} resolves outside the adapter directory {self.root} (a link?); refused")
        subfolder = _adapter_subfolder(path) if path.is_dir() else None
        if subfolder is None:
            known = self.names()
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            listed = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
            raise UnknownAdapterError(
                f"no adapter named {name!r} in {self.root}.{hint} Adapters: {listed or '(none)'}; "
                "an adapter is a subfolder holding adapter_config.json (or adapter/adapter_config.json)"
            )
        if not _inside(subfolder.resolve(), self.root):
            raise AdapterNameError(f"adapter {name!r} resolves outside the adapter directory {self.root} (a link?); refused")
        return subfolder

    def describe(self, name: str) -> AdapterInfo:
        """The adapter's config and labels; re-read only when its config file changes."""
        folder = self.folder(name)
        config_path = folder / io.CONFIG_NAME
        stamp = config_path.stat().st_mtime
        with self._lock:
            cached = self._described.get(name)
        if cached is not None and cached[0] == stamp and cached[1].folder == folder:
            return cached[1]
        info = _read_info(name, folder)
        with self._lock:
            self._described[name] = (stamp, info)
        return info


def _adapter_subfolder(path: Path) -> Path | None:
    if (path / io.CONFIG_NAME).is_file():
        return path
    if (path / "adapter" / io.CONFIG_NAME).is_file():
        return path / "adapter"
    return None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterMismatchError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise AdapterMismatchError(f"{path} does not hold a JSON object")
    return data


def _read_info(name: str, folder: Path) -> AdapterInfo:
    config = _read_json(folder / io.CONFIG_NAME)
    run = _read_json(folder / RUN_INFO_NAME) if (folder / RUN_INFO_NAME).is_file() else {}
    ranks = [config["r"]] if isinstance(config.get("r"), int) else []
    ranks += [r for r in (config.get("rank_pattern") or {}).values() if isinstance(r, int)]
    labels = run.get("label_names")
    weights = folder / io.WEIGHTS_NAME
    return AdapterInfo(
        name=name, folder=folder, peft_type=config.get("peft_type"), task_type=config.get("task_type"),
        rank=max(ranks) if ranks else None,
        label_names=[str(label) for label in labels] if isinstance(labels, list) and labels else None,
        file_bytes=weights.stat().st_size if weights.is_file() else 0, config=config,
    )


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class AdapterTimes:
    """Per adapter: how often and how long it was read from disk and copied into a slot."""

    disk_loads: int = 0
    load_seconds: float = 0.0  # last read from disk (safetensors -> tensors in memory)
    total_load_seconds: float = 0.0
    switches: int = 0  # copies into a slot
    switch_seconds: float = 0.0  # last copy into a slot
    total_switch_seconds: float = 0.0
    slot_hits: int = 0  # batches that found it in a slot already
    requests: int = 0  # batches that used it

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class AdapterCache:
    """Adapters of an `AdapterDirectory`, kept in memory (byte budget) and in model slots (capacity).

    `slots` is the mixed-adapter model (peftkit.mixed.MixedLoraModel): it must have
    `load_adapter(name, folder[, tensors=...]) -> slot`, `remove_adapter(name)` and `adapter_names`.
    `capacity` is its number of adapter slots: a batch may use at most that many adapters.
    """

    def __init__(self, directory: AdapterDirectory, slots, capacity: int, byte_budget: int,
                 check: Callable[[AdapterInfo], None] | None = None):
        if capacity < 1:
            raise PeftkitError(f"the cache needs at least one adapter slot, got capacity {capacity}")
        if byte_budget < 0:
            raise PeftkitError(f"the cache byte budget must be >= 0, got {byte_budget}")
        self.directory = directory
        self.slots = slots
        self.capacity = capacity
        self.byte_budget = byte_budget
        self._check = check  # raises AdapterMismatchError for an adapter the model cannot take
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # least recent first
        self._memory_bytes: dict[str, int] = {}
        self._in_slots: OrderedDict[str, None] = OrderedDict()  # least recent first
        self._folders: dict[str, Path] = {}
        self.times: dict[str, AdapterTimes] = {}
        self.counts = {"slot_hits": 0, "memory_hits": 0, "disk_loads": 0, "memory_evictions": 0, "slot_evictions": 0}
        self._lock = threading.Lock()
        # Copying tensors already in memory needs the engine to accept them; otherwise every slot miss re-reads the folder.
        self._slots_take_tensors = "tensors" in inspect.signature(slots.load_adapter).parameters

    # --- worker thread -----------------------------------------------------------------------------

    def ensure_loaded(self, names: Iterable[str]) -> dict[str, Exception]:
        """Put each adapter in `names` into a slot, evicting the least recently used others.

        Returns the adapters that could not be loaded, name -> error (the others are ready): a
        PeftkitError for a folder that is gone or does not fit, anything else for a failure inside the
        engine; either fails only the requests for that adapter. More
        distinct names than slots is a programming error (the batcher keeps batches within capacity).
        """
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.capacity:
            raise ValueError(f"a batch needs {len(wanted)} adapters but the model has {self.capacity} slots")
        failures: dict[str, Exception] = {}
        with self._lock:
            for name in wanted:
                self.times.setdefault(name, AdapterTimes()).requests += 1
                if name in self._in_slots:
                    self._in_slots.move_to_end(name)
                    self.times[name].slot_hits += 1
                    self.counts["slot_hits"] += 1
        for name in wanted:
            if name in self._in_slots:
                continue
            try:
                self._load_into_slot(name, keep=set(wanted))
            except Exception as error:  # noqa: BLE001 - one adapter's failure must not fail the others
                failures[name] = error
        return failures

    def unload(self, name: str) -> bool:
        """Drop `name` from its slot and from memory (its files stay on disk); False if it was not loaded."""
        with self._lock:
            was_loaded = name in self._in_slots or name in self._memory
            if name in self._in_slots:
                self.slots.remove_adapter(name)
                del self._in_slots[name]
            self._forget_memory(name)
        return was_loaded

    def _load_into_slot(self, name: str, keep: set[str]) -> None:
        folder = self.directory.folder(name)
        if self._check is not None:
            self._check(self.directory.describe(name))
        with self._lock:
            tensors = self._memory.get(name) if self._folders.get(name) == folder else None
            if tensors is not None:
                self._memory.move_to_end(name)
                self.counts["memory_hits"] += 1
        if tensors is None and self._slots_take_tensors:
            started = time.perf_counter()
            tensors = io.read_tensors(folder / io.WEIGHTS_NAME)
            elapsed = time.perf_counter() - started
            with self._lock:
                self._record_disk_load(name, elapsed)
                self._remember(name, folder, tensors)
        with self._lock:
            while len(self._in_slots) >= self.capacity:
                victim = next((n for n in self._in_slots if n not in keep), None)
                if victim is None:  # unreachable while len(keep) <= capacity
                    raise ValueError("every slot is held by the current batch")
                self.slots.remove_adapter(victim)
                del self._in_slots[victim]
                self.counts["slot_evictions"] += 1
            started = time.perf_counter()
            if self._slots_take_tensors:
                self.slots.load_adapter(name, folder, tensors=tensors)
                self._record_switch(name, time.perf_counter() - started)
            else:
                # Disk read and slot copy happen in one call: all of it counts as load time.
                self.slots.load_adapter(name, folder)
                self._record_disk_load(name, time.perf_counter() - started)
            self._in_slots[name] = None

    def _record_disk_load(self, name: str, seconds: float) -> None:
        times = self.times.setdefault(name, AdapterTimes())
        times.disk_loads += 1
        times.load_seconds = seconds
        times.total_load_seconds += seconds
        self.counts["disk_loads"] += 1

    def _record_switch(self, name: str, seconds: float) -> None:
        times = self.times.setdefault(name, AdapterTimes())
        times.switches += 1
        times.switch_seconds = seconds
        times.total_switch_seconds += seconds

    def _remember(self, name: str, folder: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Keep `tensors` in memory, evicting the least recently used until they fit the budget."""
        self._forget_memory(name)
        size = tensor_bytes(tensors)
        if size > self.byte_budget:
            return  # larger than the whole budget: served from its slot, re-read from disk after eviction
        while self._memory and sum(self._memory_bytes.values()) + size > self.byte_budget:
            victim, _ = self._memory.popitem(last=False)
            del self._memory_bytes[victim]
            self.counts["memory_evictions"] += 1
        self._memory[name] = tensors
        self._memory_bytes[name] = size
        self._folders[name] = folder

    def _forget_memory(self, name: str) -> None:
        self._memory.pop(name, None)
        self._memory_bytes.pop(name, None)
        self._folders.pop(name, None)

    # --- any thread ------------------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return sum(self._memory_bytes.values())

    def in_slots(self) -> list[str]:
        """Adapters in a slot, least recently used first."""
        with self._lock:
            return list(self._in_slots)

    def in_memory(self) -> list[str]:
        with self._lock:
            return list(self._memory)

    def memory_sizes(self) -> dict[str, int]:
        """Bytes of each adapter kept in memory."""
        with self._lock:
            return dict(self._memory_bytes)

    def state(self, name: str) -> str:
        """'slot' (ready), 'memory' (one copy away) or 'disk'."""
        with self._lock:
            return "slot" if name in self._in_slots else "memory" if name in self._memory else "disk"

    def snapshot(self) -> dict[str, Any]:
        """Counters and per-adapter times, for /v1/adapters and /metrics."""
        with self._lock:
            return {
                "capacity": self.capacity,
                "byte_budget": self.byte_budget,
                "memory_bytes": sum(self._memory_bytes.values()),
                "in_slots": list(self._in_slots),
                "in_memory": list(self._memory),
                **self.counts,
                "load_seconds_total": sum(t.total_load_seconds for t in self.times.values()),
                "switch_seconds_total": sum(t.total_switch_seconds for t in self.times.values()),
                "adapters": {name: times.to_dict() for name, times in self.times.items()},
            }
