"""The HTTP app: OpenAI's images API over one fastsd Pipeline, with dynamic batching.

`create_app(options)` returns an ASGI app (FastAPI). uvicorn runs it for `fastsd serve`
(fastsd/serve/server.py); Ray Serve runs one per replica (fastsd/serve/ray_serve.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FastSDError, ImageError, InvalidArgumentError
from ..status import said
from ..version import __version__
from .a1111 import ENDPOINTS as A1111_ENDPOINTS
from .a1111 import register as register_a1111
from .access import Pace, access_line, request_id, warn_if_large
from .api import (
    APIError,
    ImageRequest,
    Limits,
    argument_error,
    bad,
    edit_inputs,
    encode_image,
    parse_request,
    read_upload,
)
from .auth import Auth, refusal
from .batcher import Batcher, Cancelled, DrainingError, Job, QueueFullError, Slot
from .progress import Progress

log = logging.getLogger("fastsd.serve")

DISCONNECT_POLL_S = 0.2  # how often a waiting request checks that its client is still there
DRAIN_LIMIT = 256 * 2**20  # an oversized body is read (and dropped) up to this, so its client sees the 413
CLIENT_CLOSED = 499  # nginx's status for "client closed the request" (never reaches the client)


@dataclass(frozen=True)
class ServeOptions:
    """What `fastsd serve` runs: the model as Pipeline.from_pretrained loads it, batching and limits."""

    model: str
    backend: str = "auto"
    fallback: bool = False  # an engine kind by name with no engine here: eager PyTorch (True) or an error
    device: str | None = None
    dtype: str | None = None
    engine_dir: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    max_batch: int = 4  # images per UNet batch
    batch_window_ms: float = 10.0  # how long a batch waits for more requests to join
    max_queue: int = 64  # requests waiting; beyond: 429
    limits: Limits = field(default_factory=Limits)
    model_name: str | None = None  # the id clients pass as `model` (default: the model's name)
    loras: tuple[tuple[str, str], ...] = ()  # (name, file) of the LoRAs requests may name
    lora_dir: str | None = None  # the folder <lora:NAME:W> prompt tags name files of
    controlnets: tuple[str, ...] = ()  # ControlNets: requests may pass a control_image (one per ControlNet)
    ip_adapters: tuple[str, ...] = ()  # IP-Adapters: requests may pass an ip_adapter_image (one per adapter)
    embeddings_dir: str | None = None  # textual inversions loaded at start, each FILE as the token FILE's stem
    upscaler_dir: str | None = None  # model upscalers (ESRGAN, ...) the hires fix may name
    preview_vae: str | None = None  # a TAESD: /sdapi/v1/progress then shows the running batch's image
    preview_every: int = 5  # steps between previews (the web UI's show_progress_every_n_steps)
    output_dir: str | None = None  # A1111's save_images writes PNGs here (the web UI's samples_save)
    auth: Auth = field(default_factory=Auth)  # API keys (Bearer) and users (HTTP Basic); none: open

    @property
    def lora_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.loras)

    @property
    def served_names(self) -> tuple[str, ...]:
        default = self.model.split(":", 1)[1] if self.model.startswith("synthetic:") else Path(self.model).name
        names = (self.model_name,) if self.model_name else (default or self.model, self.model)
        return tuple(dict.fromkeys(names))

    def load(self):
        from ..lora import read_lora
        from ..pipeline import Pipeline

        pipe = Pipeline.from_pretrained(self.model, backend=self.backend, device=self.device, dtype=self.dtype,
                                        engine_dir=self.engine_dir, variant=self.variant,
                                        allow_pickle=self.allow_pickle, controlnet=list(self.controlnets) or None,
                                        max_side=self.limits.max_side, lora_dir=self.lora_dir,
                                        upscaler_dir=self.upscaler_dir, preview_vae=self.preview_vae,
                                        fallback=True if self.fallback else None)
        if self.ip_adapters:
            log.info("fastsd serve: loading IP-Adapters %s", ", ".join(self.ip_adapters))
            pipe.load_ip_adapter(list(self.ip_adapters), allow_pickle=self.allow_pickle)
        modules = pipe.family.modules(pipe.ckpt)
        if self.loras:
            log.info("fastsd serve: checking LoRAs %s against the model", ", ".join(n for n, _ in self.loras))
        for name, path in self.loras:  # a LoRA that does not fit the model fails the start, not a request
            read_lora(path, modules, name, 1.0)
        for path in embedding_files(self.embeddings_dir, self.allow_pickle):
            pipe.load_textual_inversion(str(path), allow_pickle=self.allow_pickle)
            log.info("fastsd serve: embedding %s from %s", path.stem, path.name)
        return pipe


def embedding_files(folder: str | None, allow_pickle: bool) -> list[Path]:
    """The textual inversion files of --embeddings-dir (pickles only with --allow-pickle)."""
    if folder is None:
        return []
    suffixes = (".safetensors", ".pt", ".bin") if allow_pickle else (".safetensors",)
    return [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.suffix.lower() in suffixes]


class _Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, batcher: Batcher, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fastsd_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.images = Counter("fastsd_images", "images generated", registry=r)
        self.cancelled = Counter("fastsd_cancelled", "requests whose client went away before the images were "
                                 "ready (their work is dropped)", registry=r)
        queue = Gauge("fastsd_queue_depth", "requests waiting for a UNet batch", registry=r)
        queue.set_function(lambda: batcher.queued_requests)
        queued_images = Gauge("fastsd_queue_images", "images waiting for a UNet batch", registry=r)
        queued_images.set_function(lambda: batcher.queued_images)
        running = Gauge("fastsd_running_images", "images in the UNet batch running now", registry=r)
        running.set_function(lambda: batcher.running_images)
        buckets = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, max_batch})
        self.batch_size = Histogram("fastsd_batch_size", "images per UNet batch", buckets=buckets, registry=r)
        self.stage = Histogram("fastsd_stage_seconds", "seconds per stage: queue (waiting for a batch), "
                               "text_encoder, unet, vae, batch (one batch's pipeline call), request (end to end), "
                               "lora (switching the fused LoRAs between batches)",
                               ["stage"], registry=r,
                               buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60, 120, 300))


class _State:
    def __init__(self, options: ServeOptions, pipeline, on_fatal: Callable[[BaseException], None] | None):
        self.options, self.pipe, self.on_fatal = options, pipeline, on_fatal
        self.error: BaseException | None = None
        self.draining = False  # requests get 503 (the app is shutting down)
        self.stopping = False  # a stop signal came: /healthz says draining, received requests still run
        self.replica: str | None = None
        self.started = time.time()
        self.batcher = Batcher(self._run_batch, options.max_batch, options.batch_window_ms / 1000.0,
                               options.max_queue, on_batch=self._on_batch)
        self.metrics = _Metrics(self.batcher, options.max_batch)
        self.progress = Progress()
        self.pace = Pace()  # seconds per UNet step, measured on the batches: estimates a large request's time
        self.a1111 = None  # the web UI's options (fastsd/serve/a1111.py), once the model is loaded

    # ---- model -----------------------------------------------------------------------

    async def load(self, background: bool) -> None:
        t0 = time.perf_counter()
        log.info("fastsd serve: loading %s (backend %s); requests get 503 \"model_loading\" until it is ready",
                 self.options.model, self.options.backend)
        said()  # the loading is said: fastsd's own "loading ..." line only after 2 s more of silence
        try:
            self.pipe = await asyncio.to_thread(self.options.load)
            log.info("fastsd serve: %s loaded in %.1fs (backends: %s)", self.options.model, time.perf_counter() - t0,
                     ", ".join(f"{k}={v}" for k, v in self.pipe.backend.backends.items()))
        except BaseException as e:  # noqa: BLE001 - reported on /healthz and to the runner
            self.error = e
            if not background:
                raise
            log.error("fastsd serve: the model failed to load: %s", e)
            if self.on_fatal is not None:
                self.on_fatal(e)

    def check_ready(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.error is not None:
            raise APIError(503, f"the model failed to load: {self.error}", code="model_failed")
        if self.pipe is None:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading")

    # ---- requests ----------------------------------------------------------------------

    def key(self, req: ImageRequest) -> tuple:
        """What must match for requests to share a UNet batch: the call arguments the table
        marks as batch keys, the size they resolve to, the LoRAs (a batch runs on one set of
        weights), how many control images and the image prompts."""
        w, h = self.given_size(req)
        return (req.mode, w, h, req.settings, req.loras, req.lora_tags, len(req.control_image), req.hires,
                req.ip_key)

    @staticmethod
    def given_size(req: ImageRequest) -> tuple[int | None, int | None]:
        """The (width, height) a request asks for, or its image's (None, None: the checkpoint's)."""
        if req.image is not None and req.width is None:
            return req.image.size
        if req.control_image and req.width is None:  # txt2img with a ControlNet: the control image's size
            return req.control_image[0].size
        return req.width, req.height

    def size(self, req: ImageRequest) -> tuple[int, int]:
        w, h = self.given_size(req)
        native = self.pipe.info.default_size
        return (w or native, h or native)

    def check(self, req: ImageRequest) -> None:
        """The pipeline's own checks, on the batch this request may be part of."""
        try:
            self.pipe.check_call(req.prompt, negative_prompt=req.negative_prompt, image=req.image,
                                 mask_image=req.mask, num_images_per_prompt=min(req.n, self.options.max_batch),
                                 seed=req.seed, **req.call_kwargs(), **req.control_kwargs(), **req.ip_kwargs())
        except InvalidArgumentError as e:
            raise argument_error(e) from None
        except ImageError as e:
            where = next((n for n in ("control_image", "ip_adapter_image") if n in str(e)), "image")
            raise bad(str(e), where, "invalid_image") from None
        except FastSDError as e:
            raise bad(str(e), code="invalid_value") from None

    async def generate(self, request: Request, req: ImageRequest) -> dict:
        """Queue a checked request (its handler has called check_ready) and answer it."""
        t0 = time.perf_counter()
        images = await self.images(request, req)
        if any(im is None for im in images):
            raise APIError(400, "the request was interrupted (POST /sdapi/v1/interrupt or skip) before its images "
                                "were done", code="interrupted")  # a 400: clients do not resend it by themselves
        blobs = await asyncio.to_thread(lambda: [encode_image(im, req.output_format, req.output_compression)
                                                 for im in images])
        self.metrics.stage.labels("request").observe(time.perf_counter() - t0)
        self.metrics.images.inc(len(blobs))
        w, h = images[0].size
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(b).decode("ascii"), "revised_prompt": None,
                          "seed": req.seed + i} for i, b in enumerate(blobs)],
                "output_format": req.output_format, "size": f"{w}x{h}", "background": "opaque"}

    async def images(self, request: Request, req: ImageRequest) -> list:
        """Check and queue a request, wait for its images (None for any an interrupt or skip
        dropped); a client that goes away cancels it."""
        self.check(req)
        (w, h), steps = self.size(req), self._steps(req)
        facts = request.scope.setdefault("fastsd", {})  # the access line's (fastsd/serve/access.py)
        facts.update(size=(w, h), n=req.n, steps=steps)
        warn_if_large(w, h, self.pipe.info.default_size, steps, req.n, self.pace)
        job = Job(self.key(req), req.n, req)
        task = asyncio.ensure_future(self.batcher.submit(job))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    task.cancel()
                    self.metrics.cancelled.inc()
                    log.info("fastsd serve: client went away; its request is cancelled")
                    raise _ClientGone()
        except asyncio.CancelledError:  # Ray Serve cancels the handler when its client goes
            task.cancel()
            self.metrics.cancelled.inc()
            raise
        try:
            images = task.result()
        except QueueFullError as e:
            raise APIError(429, str(e), code="queue_full", kind="rate_limit_exceeded") from None
        except DrainingError as e:
            raise APIError(503, str(e), code="shutting_down") from None
        except FastSDError as e:  # found while running (NaN latents, ...): the request's settings
            raise bad(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a fault of the server's, answered as OpenAI's 500
            log.error("fastsd serve: a batch failed", exc_info=e)
            raise APIError(500, f"the server failed to generate the images ({type(e).__name__}: {e})",
                           code="internal_error") from None
        if job.started is not None:
            self.metrics.stage.labels("queue").observe(job.started - job.arrival)
            facts.update(queue=job.started - job.arrival, run=time.monotonic() - job.started)
        return images

    def _run_batch(self, slots: list[Slot], stopped: Callable[[], bool]) -> tuple[list, dict]:
        """Runs on the worker thread: one pipeline call for the batch, image i from its own
        generator seeded with its request's seed + its index, so a request gets the images it
        would get alone."""
        import torch

        reqs: list[ImageRequest] = [s.job.payload for s in slots]
        first = reqs[0]

        self._use_loras(first.loras)
        progress = self.progress.begin(slots, self._steps(first))

        def step(k, t, latents):
            progress.step()

        def on_step_end(_pipe, k, t, kwargs):  # after every UNet call (Heun's half steps too)
            if stopped():  # every client of the batch went away: stop before the next UNet call or the decode
                log.info("fastsd serve: a batch whose clients all went away stopped after %d UNet call(s), %.1fs "
                         "in", k + 1, time.time() - progress.started)
                raise Cancelled()
            if "preview" in kwargs:
                progress.preview = kwargs["preview"][0]
            return {}

        previews = {"callback_on_step_end": on_step_end}
        if self.pipe.preview_vae is not None:
            previews["preview_every"] = self.options.preview_every
        run = self.pipe if first.hires is None else partial(self.pipe.hires_fix, **first.hires.call_kwargs(len(reqs)))
        try:  # from here on the progress is this batch's until it ends, however it ends
            out = run([r.prompt for r in reqs], negative_prompt=[r.negative_prompt or "" for r in reqs],
                      image=None if first.image is None else [r.image for r in reqs],
                      mask_image=None if first.mask is None else [r.mask for r in reqs],
                      generator=[torch.Generator().manual_seed(s.job.payload.seed + s.index) for s in slots],
                      callback=step, output_type="pil", **first.call_kwargs(),
                      **first.control_kwargs([r.control_image for r in reqs]), **first.ip_kwargs(), **previews)
        finally:
            self.progress.end()
        if out.images and "unet_per_step" in out.timings:
            self.pace.record(out.timings["unet_per_step"], len(slots), *out.images[0].size)
        return out.images, out.timings

    def _steps(self, req: ImageRequest) -> int:
        """The denoising steps a request's batch runs (both passes of a hires fix)."""
        steps = dict(req.settings).get("num_inference_steps", 50)
        if req.hires is None:
            return steps if req.image is None else max(int(steps * dict(req.settings).get("strength", 0.8)), 1)
        return steps + max(int((req.hires.steps or steps) * req.hires.strength), 1)

    def _use_loras(self, wanted: tuple[tuple[str, float], ...]) -> None:
        """Make the pipeline's fused LoRAs the batch's (same names in order: only scales change)."""
        have = tuple((lora["name"], lora["scale"]) for lora in self.pipe.loras)
        if have == wanted:
            return
        t0 = time.perf_counter()
        if [n for n, _ in have] == [n for n, _ in wanted]:
            for (name, scale), (_, old) in zip(wanted, have, strict=True):
                if scale != old:
                    self.pipe.set_lora_scale(name, scale)
        else:
            self.pipe.unload_lora()
            paths = dict(self.options.loras)
            for name, scale in wanted:
                self.pipe.load_lora(paths[name], scale=scale, name=name)
        seconds = time.perf_counter() - t0
        self.metrics.stage.labels("lora").observe(seconds)
        log.info("fastsd serve: LoRAs %s -> %s in %.2fs", list(have) or "none", list(wanted) or "none", seconds)

    def _on_batch(self, slots: list[Slot], timings: dict) -> None:
        self.metrics.batch_size.observe(len(slots))
        for stage in ("text_encoder", "unet", "vae"):
            if stage in timings:
                self.metrics.stage.labels(stage).observe(timings[stage])
        if "total" in timings:
            self.metrics.stage.labels("batch").observe(timings["total"])


def _unterminated(body: bytes, content_type: str) -> str | None:
    """Why a multipart body is not whole (None: it is): no boundary, or no closing delimiter
    ("--boundary--"). A body cut off inside its last part parses as a form without that part
    (an inpaint edit without its mask would run as img2img), so it is refused instead."""
    try:
        from python_multipart.multipart import parse_options_header
    except ImportError:  # python-multipart < 0.0.13
        from multipart.multipart import parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        return "its content-type has no boundary"
    close = b"--" + boundary + b"--"
    at = body.find(close)
    while at > 0 and body[at - 1:at] != b"\n":  # the delimiter starts a line
        at = body.find(close, at + 1)
    if at < 0:
        return "it ends before its closing boundary: the body is cut off"
    return None


class _ClientGone(Exception):
    pass


class _TooLarge(Exception):
    def __init__(self, limit: int, size: int | None = None):
        self.limit, self.size = limit, size


class _Guard:
    """ASGI middleware: caps request bodies (413 before reading one whose Content-Length is
    over the limit, or as soon as a streamed one passes it) and counts responses by endpoint
    and status for /metrics."""

    def __init__(self, app, state: _State, endpoints: tuple[str, ...]):
        self.app, self.state, self.endpoints = app, state, endpoints

    def _limit(self, path: str) -> int:
        lim = self.state.options.limits
        return lim.max_upload_bytes if path.endswith(("/edits", "/img2img")) else lim.max_json_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0 = scope["path"], time.perf_counter()
        endpoint = path if path in self.endpoints else "other"
        status = {"code": 500}
        headers = dict(scope.get("headers") or [])
        facts = scope.setdefault("fastsd", {})
        facts["id"] = request_id(headers)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-request-id", facts["id"].encode())]
                if self.state.replica:
                    extra.append((b"x-fastsd-replica", self.state.replica.encode()))
                message = dict(message, headers=[*message.get("headers", []), *extra])
            await send(message)

        limit = self._limit(path)
        length = headers.get(b"content-length")
        auth = self.state.options.auth
        try:
            if auth.protects(path) and not auth.allows(headers.get(b"authorization")):
                await _drain(receive, limit)  # no more than an allowed body is read for a stranger
                code, body, extra = refusal(path)
                await JSONResponse(body, status_code=code, headers={k.decode(): v.decode() for k, v in extra})(
                    scope, receive, send_counted)
                return
            if length is not None and length.isdigit() and int(length) > limit:
                await _drain(receive, DRAIN_LIMIT)  # so that the client reads the 413 (not a reset)
                await _too_large(_TooLarge(limit, int(length)))(scope, receive, send_counted)
                return
            seen = {"bytes": 0}

            async def receive_capped():
                message = await receive()
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    if seen["bytes"] > limit:
                        if message.get("more_body"):
                            await _drain(receive, DRAIN_LIMIT)
                        raise _TooLarge(limit)
                return message

            await self.app(scope, receive_capped, send_counted)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status["code"])).inc()
            access_line(scope.get("method", "-"), path, status["code"], time.perf_counter() - t0, facts)


async def _drain(receive, budget: int) -> None:
    """Read and drop the rest of a request body (at most `budget` bytes; past that the
    connection is simply closed after the response)."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


def _too_large(e: _TooLarge) -> JSONResponse:
    size = f"{e.size} bytes" if e.size is not None else "over the limit"
    err = APIError(413, f"the request body is {size}; this server takes at most {e.limit} bytes", code="too_large")
    return JSONResponse(err.body(), status_code=413)


def create_app(options: ServeOptions, *, pipeline=None, load_in_background: bool = True,
               on_fatal: Callable[[BaseException], None] | None = None, replica: str | None = None) -> FastAPI:
    """The images API over `options`' model. `pipeline`: one already loaded (else it loads at
    startup: in the background, answering 503 until ready, or before the app takes requests
    when `load_in_background` is False, as a Ray replica does). `on_fatal(error)` is called if
    a background load fails (fastsd serve then exits). `replica`: a name every response carries
    in an `x-fastsd-replica` header (Ray Serve replicas)."""
    state = _State(options, pipeline, on_fatal)
    state.replica = replica

    @asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        loader = None
        if state.pipe is None:
            if load_in_background:
                loader = asyncio.get_running_loop().create_task(state.load(background=True))
            else:
                await state.load(background=False)
        yield
        state.draining = True
        if loader is not None and not loader.done():
            loader.cancel()
        await state.batcher.close()

    app = FastAPI(title="fastsd", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.fastsd = state
    _error_handlers(app)
    _status_routes(app, state, options)
    _image_routes(app, state, options)
    register_a1111(app, state)
    endpoints = ("/v1/images/generations", "/v1/images/edits", "/healthz", "/metrics", "/v1/models",
                 *A1111_ENDPOINTS)
    app.add_middleware(_Guard, state=state, endpoints=endpoints)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error JSON."""
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, e: _TooLarge):
        return _too_large(e)

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, e: _ClientGone):
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = (f"Invalid URL ({request.method} {request.url.path})" if e.status_code in (404, 405)
                   else str(e.detail))
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)



def _status_routes(app: FastAPI, state: _State, options: ServeOptions) -> None:
    """/healthz, /metrics and /v1/models."""
    @app.get("/healthz")
    async def healthz():
        status, code = "ok", 200
        if state.draining or state.stopping:
            status, code = "draining", 503
        elif state.error is not None:
            status, code = "failed", 503
        elif state.pipe is None:
            status, code = "loading", 503
        body = {"status": status, "model": options.served_names[0], "queue": state.batcher.queued_requests}
        if state.error is not None:
            body["error"] = str(state.error)
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(state.started),
                                            "owned_by": "fastsd"} for name in options.served_names]}



def _image_routes(app: FastAPI, state: _State, options: ServeOptions) -> None:
    """The images API: generations (JSON) and edits (multipart)."""
    limits = options.limits

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        state.check_ready()
        raw = await request.body()
        try:
            data = json.loads(raw)
        except RecursionError:
            raise bad("the request body is JSON nested too deeply to read", code="invalid_json") from None
        except ValueError as e:
            raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
        req = parse_request(data, form=False, limits=limits, factor=state.pipe.info.vae_factor,
                            model_names=options.served_names, loras=options.lora_names)
        return await state.generate(request, req)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        state.check_ready()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad("an edits request is multipart/form-data with an 'image' file (and optionally a 'mask')",
                      code="invalid_content_type")
        unterminated = _unterminated(await request.body(), request.headers["content-type"])
        if unterminated:
            raise bad(f"the multipart body could not be read ({unterminated})", code="invalid_multipart")
        image, mask, fields, uploads = await _read_edits(request, limits)
        image, mask = edit_inputs(image, mask)
        req = parse_request(fields, form=True, limits=limits, factor=state.pipe.info.vae_factor,
                            model_names=options.served_names, image=image, mask=mask, loras=options.lora_names,
                            control_uploads=uploads["control_image"], ip_uploads=uploads["ip_adapter_image"])
        return await state.generate(request, req)



async def _read_edits(request: Request, limits: Limits):
    """An edits body's uploads decoded (image, mask), its text fields, and its control_image and
    ip_adapter_image files (by name)."""
    try:
        form = await request.form(max_files=10, max_fields=64, max_part_size=limits.max_upload_bytes)
    except _TooLarge:
        raise
    except Exception as e:  # noqa: BLE001 - starlette's multipart errors: a malformed body
        raise bad(f"the multipart body could not be read ({e})", code="invalid_multipart") from None
    try:
        fields, files, listed = {}, {}, {"control_image": [], "ip_adapter_image": []}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            else:
                key = name[:-2] if name.endswith("[]") else name
                if key in listed:  # one per ControlNet / IP-Adapter, in order
                    listed[key].append(await value.read())
                    continue
                if key in files:
                    raise bad(f"one '{key}' file per request, please (got several)", key)
                files[key] = await value.read()
        if "image" not in files:
            raise bad("'image' is required (a PNG, JPEG or WebP file)", "image", "missing_required_parameter")
        for name in fields:
            if name in ("image", "mask"):
                raise bad(f"'{name}' must be a file upload", name, "invalid_type")
        unknown_files = [k for k in files if k not in ("image", "mask")]
        if unknown_files:
            raise bad(f"Unrecognized request argument supplied: {unknown_files[0]}", unknown_files[0],
                      "unknown_parameter")
        image = read_upload(files["image"], "image", limits)
        mask = read_upload(files["mask"], "mask", limits) if "mask" in files else None
    finally:
        await form.close()
    return image, mask, fields, listed
