"""The HTTP API (FastAPI) in front of an `ImageServer` (what `peftkit serve` runs for an image model).

    POST /v1/classify   {"adapter": NAME, "images": [{"base64": "..."} | {"path": "rel/to/image-root.png"}, ...]}
                        -> label, label id and probabilities per image
    GET  /v1/adapters   the adapter directory's runs and whether each is loaded
    GET  /health        liveness and requests answered

Errors are JSON in the text server's shape, `{"error": {"message", "type", "code", "param"}}`: 400 for a
path outside the image root (or paths without one) and bad adapter names, 404 for an unknown adapter,
409 for a folder that is not an image run, 413 for a body or an image list over the limits, 422 for a
malformed field or an image that cannot be decoded.
"""

from __future__ import annotations

import time

from peftkit.extras import require

require("fastapi", "peftkit serve (the HTTP API)")

from fastapi import FastAPI  # noqa: E402  (after the check above, which names the extra to install)
from fastapi.exceptions import RequestValidationError  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from peftkit.errors import PeftkitError  # noqa: E402
from peftkit.serve.app import BodySizeLimit, error_response  # noqa: E402
from peftkit.serve.cache import AdapterMismatchError, AdapterNameError, UnknownAdapterError  # noqa: E402
from peftkit.serve.images import ImagePathError, ImageServer  # noqa: E402
from peftkit.serve.server import RequestTooLargeError  # noqa: E402


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base64: str | None = Field(default=None, description="the image file's bytes, base64-encoded")
    path: str | None = Field(default=None, description="a file inside the server's --image-root")


class ClassifyImagesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(description="the adapter's folder name in the adapter directory")
    images: list[ImageItem] = Field(description="images to classify with that adapter")


_STATUS = [(ImagePathError, 400, "invalid_request_error"), (AdapterNameError, 400, "invalid_request_error"),
           (UnknownAdapterError, 404, "not_found_error"), (AdapterMismatchError, 409, "conflict_error"),
           (RequestTooLargeError, 413, "request_too_large"), (PeftkitError, 422, "invalid_request_error")]


def create_image_app(server: ImageServer) -> FastAPI:
    app = FastAPI(title="peftkit serve (images)", description="An image classifier and its adapters.")
    app.state.server = server
    app.add_middleware(BodySizeLimit, max_bytes=server.settings.max_body_bytes)
    started = time.time()

    @app.exception_handler(PeftkitError)
    async def peftkit_error(request, error: PeftkitError):
        status, kind = next((s, k) for cls, s, k in _STATUS if isinstance(error, cls))
        return error_response(status, str(error), kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in problem.get('loc', ()) if p != 'body')}: {problem.get('msg')}"
                 for problem in error.errors()[:10]]
        return error_response(422, "invalid request: " + "; ".join(parts), "invalid_request_error")

    @app.post("/v1/classify")
    async def classify(body: ClassifyImagesBody):
        items = [item.model_dump(exclude_none=True) for item in body.images]
        return await server.classify(body.adapter, items)

    @app.get("/v1/adapters")
    async def adapters():
        return {"adapters": server.list_adapters()}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "kind": "image", "requests": server.requests,
                "uptime_s": round(time.time() - started, 1)}

    return app


def run(server: ImageServer, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True) -> None:
    import uvicorn

    uvicorn.run(create_image_app(server), host=host, port=port, access_log=access_log, log_level="info")
