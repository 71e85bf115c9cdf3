"""`headstart serve`: the fine-tuned model behind HTTP (FastAPI on uvicorn), loaded once.

    POST /predict[?top_k=K]  one or more images, as multipart/form-data (one file per part,
                             any field names) or as the raw bytes of one image (the body; an
                             `X-Filename` header names it). Returns what `headstart predict
                             --format json` prints: a list, one entry per image, in order,
                             with the calibrated top-k, `familiar` and `distance`.
    GET /health              {"status": "ok"} once the model is loaded.
    GET /model               what `headstart info --format json` says, plus the guard.

Bad requests get a 4xx and {"detail": one line}, and the server goes on: 400 nothing to
predict or a malformed form or too many files, 413 a body above the limit, 422 a bad `top_k`
or no usable image (the reason of each, as predict gives it: not_image, truncated, too_large
for a decompression bomb, ...). When some images of a request are usable they are predicted
(200) and the others carry their error, as in predict's JSON.

Each request reads and decodes its images in FastAPI's thread pool, so a slow decode holds up
only its own request; the model runs one batch at a time under a lock, since one batch already
uses every core torch is given.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from headstart.images import UnusableImage, decode_bytes
from headstart.io import utf8_safe
from headstart.prediction import Prediction, Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 << 20  # the whole request: every image of it together
    max_files: int = 64  # images in one multipart request


class Service:
    """The loaded model and what `/model` describes; `predict` is thread-safe."""

    def __init__(self, predictor: Predictor, description: dict[str, Any]):
        self.predictor = predictor
        self.description = description
        self._model_lock = threading.Lock()

    def predict(self, uploads: list[tuple[str, bytes]], top_k: int) -> list[Prediction]:
        """Decode (outside the lock) and score the uploads; unusable ones carry their reason."""
        import torch

        results = [Prediction(utf8_safe(name)) for name, _ in uploads]
        good, tensors = [], []
        for result, (name, data) in zip(results, uploads, strict=True):
            try:
                image = decode_bytes(data, name, self.predictor.decode_size).image
            except UnusableImage as error:
                result.reason, result.detail = error.reason, utf8_safe(error.detail)
                continue
            good.append(result)
            tensors.append(self.predictor.transform(image))
        if tensors:
            with self._model_lock:
                self.predictor.score(torch.stack(tensors), good, top_k)
        return results


class BodyLimit:
    """ASGI middleware: a request body above `max_bytes` gets a 413, whether it declares its
    length (refused before it is read) or streams it in chunks (refused once it passes)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (headstart serve --max-body-mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._detail()}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._detail())
            return message

        return await self.app(scope, limited_receive, send)


async def _uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request, in order."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        # Starlette answers a malformed form or more than max_files files with a 400.
        async with request.form(max_files=limits.max_files, max_fields=limits.max_files) as form:
            return [
                (value.filename or key, await value.read())
                for key, value in form.multi_items()
                if isinstance(value, UploadFile)
            ]
    body = await request.body()
    return [(request.headers.get("x-filename", "body"), body)] if body else []


def create_app(service: Service, limits: Limits = Limits()) -> BodyLimit:
    app = FastAPI(title="headstart", summary="image classification with the fine-tuned model")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return service.description

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 1) -> JSONResponse:
        if top_k < 1:
            raise HTTPException(422, f"top_k must be at least 1, got {top_k}")
        uploads = await _uploads(request, limits)
        if not uploads:
            raise HTTPException(
                400, "nothing to predict: send an image as the body or as multipart files"
            )
        results = await run_in_threadpool(service.predict, uploads, top_k)
        if not any(result.ok for result in results):
            reasons = "; ".join(f"{r.path}: {r.reason}: {r.detail}" for r in results)
            raise HTTPException(422, f"no usable image: {reasons}"[:500])
        return JSONResponse([result.as_json() for result in results])

    return BodyLimit(app, limits.max_body_bytes)


def serve(service: Service, host: str, port: int, limits: Limits) -> None:
    """Run until interrupted; uvicorn logs the address ("Uvicorn running on http://...")."""
    import uvicorn

    uvicorn.run(create_app(service, limits), host=host, port=port, log_level="info")
