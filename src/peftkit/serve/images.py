"""Serving image classifiers: one image base model (efficientnet-lite0 or a folder) and a directory of image runs.

`ImageServer` answers `classify(adapter, images)`, where each image is `{"base64": ...}` (the encoded file's
bytes) or `{"path": ...}`, a file inside the server's image root (`peftkit serve --image-root FOLDER`): the
path is resolved, links included, and refused unless it stays inside that folder. Adapters are the
adapter folders `peftkit train` writes for an image model (any method, LoRA or not), loaded on first use
and kept, at most `capacity` of them (the least recently used is dropped). One forward runs at a time,
in a worker thread, so the event loop stays free; there is no mixed-adapter batching for images.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io as bytes_io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.serve.cache import AdapterDirectory, AdapterMismatchError
from peftkit.serve.server import RequestTooLargeError, ServeSettings


class ImagePathError(PeftkitError):
    """An image path outside the server's image root, or no image root to read paths from (HTTP 400)."""


class ImageServer:
    """An image base model serving the image runs of a directory (see the module docstring)."""

    kind = "image"

    def __init__(self, model_name: str, directory: AdapterDirectory, settings: ServeSettings,
                 image_root: str | Path | None = None, capacity: int = 4):
        self.model_name = model_name
        self.directory = directory
        self.settings = settings
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        if self.image_root is not None and not self.image_root.is_dir():
            raise PeftkitError(f"--image-root {image_root} is not a folder")
        self.capacity = max(1, capacity)
        self.loaded: OrderedDict[str, tuple[Any, Any, list[str]]] = OrderedDict()
        self.lock = threading.Lock()  # one forward (or adapter load) at a time
        self.requests = 0

    # --- adapters -----------------------------------------------------------------------------
    def list_adapters(self) -> list[dict[str, Any]]:
        from peftkit.train.image_job import is_image_run

        listed = []
        for name in self.directory.names():
            folder = self.directory.folder(name)
            entry: dict[str, Any] = {"name": name, "state": "memory" if name in self.loaded else "disk"}
            if not is_image_run(folder):
                entry["error"] = "not an image run (its peftkit_run.json does not say kind 'image')"
            listed.append(entry)
        return listed

    def _model(self, name: str):
        from peftkit.train.image_job import is_image_run, load_image_run

        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        folder = self.directory.folder(name)  # 400 for a bad name, 404 for an unknown one
        if not is_image_run(folder):
            raise AdapterMismatchError(f"adapter {name!r} is not an image run (peftkit train on an image model writes one)")
        model, preprocessor, info = load_image_run(folder, model=self.model_name)
        labels = info.get("label_names") or [str(i) for i in range(model.config.num_labels)]
        self.loaded[name] = (model, preprocessor, labels)
        while len(self.loaded) > self.capacity:
            self.loaded.popitem(last=False)
        return self.loaded[name]

    # --- images -------------------------------------------------------------------------------
    def decode(self, images: list[dict[str, str]]) -> list:
        """PIL RGB images from the request's `{"base64": ...}` / `{"path": ...}` items (errors name the item)."""
        from peftkit.vision.images import read_image, to_rgb

        if not images:
            raise PeftkitError("images is empty: give at least one image to classify")
        if len(images) > self.settings.max_texts:
            raise RequestTooLargeError(f"{len(images)} images in one request; the limit is {self.settings.max_texts} (--max-texts)")
        decoded = []
        for number, item in enumerate(images):
            where = f"images[{number}]"
            if set(item) == {"base64"}:
                decoded.append(self._from_base64(item["base64"], where, to_rgb))
            elif set(item) == {"path"}:
                decoded.append(read_image(self.resolve_path(item["path"], where)))
            else:
                raise PeftkitError(f"{where}: give exactly one of {{\"base64\": ...}} and {{\"path\": ...}}")
        return decoded

    @staticmethod
    def _from_base64(text: str, where: str, to_rgb):
        from PIL import Image, UnidentifiedImageError

        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise PeftkitError(f"{where}: base64 is not valid base64 (standard alphabet, padded)") from None
        try:
            with Image.open(bytes_io.BytesIO(data)) as image:
                image.load()
                return to_rgb(image, where)
        except UnidentifiedImageError:
            raise PeftkitError(f"{where}: the decoded bytes are not an image Pillow can read") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise PeftkitError(f"{where}: the image cannot be decoded ({error})") from None

    def resolve_path(self, path: str, where: str) -> Path:
        """`path` inside the image root (relative to it, or absolute), links resolved; refused if it leaves it."""
        if self.image_root is None:
            raise ImagePathError(f"{where}: this server reads no image paths (start it with --image-root FOLDER); "
                                 "send the image as base64 instead")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise ImagePathError(f"{where}: path must be a non-empty string")
        resolved = (self.image_root / path).resolve()
        if not resolved.is_relative_to(self.image_root):
            raise ImagePathError(f"{where}: {path!r} is outside the server's image root; refused")
        return resolved

    # --- requests -----------------------------------------------------------------------------
    def classify_now(self, adapter: str, images: list[dict[str, str]]) -> dict[str, Any]:
        from peftkit.train.image_job import predict_images

        pictures = self.decode(images)
        with self.lock:
            model, preprocessor, labels = self._model(adapter)
            probabilities = predict_images(model, preprocessor, pictures)
        self.requests += 1
        return {
            "model": self.model_name, "adapter": adapter, "labels": labels,
            "results": [{"label": labels[int(row.argmax())], "label_id": int(row.argmax()),
                         "probabilities": [round(float(p), 6) for p in row]} for row in probabilities],
        }

    async def classify(self, adapter: str, images: list[dict[str, str]]) -> dict[str, Any]:
        return await asyncio.to_thread(self.classify_now, adapter, images)


def load_image_server(model: str, adapters: str | Path, settings: ServeSettings | None = None,
                      image_root: str | Path | None = None) -> ImageServer:
    settings = settings or ServeSettings()
    settings.check()
    return ImageServer(model, AdapterDirectory(adapters), settings, image_root=image_root,
                       capacity=settings.capacity or 4)
