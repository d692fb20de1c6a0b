"""HTTP inference service on a run's model: ``sepal-serve [--model PATH]``.

``POST /predict`` ``{"texts": ["...", ...]}`` answers ``{"predictions": [{"label",
"label_id", "probability", "probabilities"}, ...]}`` in the order of the texts.
``GET /health`` answers once the model is loaded; ``GET /metadata`` names the labels, the
maximum input length, the run the model comes from, the limits, and the run's privacy
statement (``privacy.json`` in the run folder) when it has one.

Texts of concurrent requests share micro-batches of at most ``--batch-size`` texts. Limits:
``--max-body-bytes`` per request (413), ``--max-texts`` per request and
``--max-text-chars`` per text (422, naming the offending text).
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar

from sepal.inference import (
    PRECISIONS,
    Classifier,
    InferenceError,
    Prediction,
    latest_run,
    model_folder,
)

log = logging.getLogger("sepal.serve")


@dataclasses.dataclass(frozen=True)
class Limits:
    CONFIG_SOURCE: ClassVar[str] = "sepal-serve options"

    max_body_bytes: int = dataclasses.field(default=1_000_000, metadata={
        "help": "Largest request body; a larger one is answered 413."})
    max_texts: int = dataclasses.field(default=256, metadata={
        "help": "Most texts in one request; more are answered 422."})
    max_text_chars: int = dataclasses.field(default=10_000, metadata={
        "help": "Longest text in characters; a longer one is answered 422."})
    batch_size: int = dataclasses.field(default=32, metadata={
        "help": "Texts per micro-batch through the model, across concurrent requests."})

    def validate(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise InferenceError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


class MicroBatcher:
    """Runs the texts of concurrent requests through the model together. Whenever the model
    is free it takes every request waiting, up to ``batch_size`` texts, so batches form
    under load without delaying a lone request; the model runs in a worker thread so the
    event loop keeps accepting requests."""

    def __init__(self, classifier: Classifier, batch_size: int):
        self.classifier = classifier
        self.batch_size = batch_size
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future]] = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker

    async def predict(self, texts: list[str]) -> list[Prediction]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
        return await future

    async def _run(self) -> None:
        while True:
            pending = [await self.queue.get()]
            count = len(pending[0][0])
            while count < self.batch_size and not self.queue.empty():
                pending.append(self.queue.get_nowait())
                count += len(pending[-1][0])
            texts = [text for request, _ in pending for text in request]
            try:
                predictions = await asyncio.to_thread(self.classifier.predict, texts)
            except Exception as err:  # noqa: BLE001  (handed to every waiting request)
                for _, future in pending:
                    if not future.done():
                        future.set_exception(err)
                continue
            start = 0
            for request, future in pending:
                if not future.done():  # the client may have gone away
                    future.set_result(predictions[start:start + len(request)])
                start += len(request)


class BodyLimit:
    """ASGI middleware: refuses a request body over ``max_bytes`` with 413, whether or not
    the client declared its length."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        too_large = f"request body over the limit of {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=too_large)
            return message

        return await self.app(scope, limited_receive, send)


def create_app(classifier: Classifier, metadata: dict[str, Any], limits: Limits):
    """The FastAPI application serving ``classifier``."""
    from fastapi import FastAPI
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints

    Text = Annotated[str, StringConstraints(max_length=limits.max_text_chars)]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[Text] = Field(min_length=1, max_length=limits.max_texts)

    batcher = MicroBatcher(classifier, limits.batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="Sepal inference", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    async def model_metadata() -> dict[str, Any]:
        return metadata

    @app.post("/predict")
    async def predict(request: PredictRequest) -> dict[str, list[dict]]:
        predictions = await batcher.predict(request.texts)
        return {"predictions": [p.to_dict() for p in predictions]}

    return app


def describe(classifier: Classifier, folder: Path, limits: Limits) -> dict[str, Any]:
    """What ``GET /metadata`` answers; the run folder is the model folder's parent."""
    run = folder.resolve().parent
    privacy_path = run / "privacy.json"
    privacy = None
    if privacy_path.is_file():
        try:
            privacy = json.loads(privacy_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise InferenceError(f"{privacy_path}: not valid UTF-8 JSON ({err})") from err
    return {
        "label_names": classifier.label_names,
        "max_length": classifier.max_length,
        "format": classifier.format,
        "run": run.name,
        "run_folder": str(run),
        "model_folder": str(folder.resolve()),
        "privacy": privacy,
        "limits": dataclasses.asdict(limits),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a run folder or a model folder (default: the latest "
                                        "run under --outputs)")
    parser.add_argument("--outputs", default="outputs", help="where runs write their folders")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="for a run folder: int8 (model-int8/), fp32 (model/), or auto "
                             "(int8 when exported)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0: all cores)")
    defaults = Limits()
    for field in dataclasses.fields(Limits):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int,
                            default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    limits = Limits(**{field.name: getattr(args, field.name)
                       for field in dataclasses.fields(Limits)})
    try:
        limits.validate()
        folder = model_folder(args.model or latest_run(args.outputs), args.precision)
        classifier = Classifier.load(folder, limits.batch_size, args.threads)
        metadata = describe(classifier, folder, limits)
    except InferenceError as err:
        print(f"sepal-serve: {err}", file=sys.stderr)
        return 2
    import uvicorn

    log.info("serving %s (%s) on http://%s:%d", folder, classifier.format, args.host, args.port)
    uvicorn.run(create_app(classifier, metadata, limits), host=args.host, port=args.port,
                log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
