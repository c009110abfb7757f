"""fastsd serve: the official `openai` client against the server on a tiny checkpoint.

Most tests run the app under uvicorn in a thread of this process, over the session's tiny
pipeline; SIGTERM and the CLI run `fastsd serve` as a real process."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

from fastsd.serve import Limits, ServeOptions, create_app  # noqa: E402
from fastsd.serve.server import uvicorn_config  # noqa: E402

STEPS = 3  # every request: a few steps keep the tiny model quick


# ---- helpers -------------------------------------------------------------------------------


class Running:
    """An app under uvicorn in a thread: .url, .stop()."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, "warning"))  # as `fastsd serve` runs it
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) without raising for 4xx/5xx."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("content-type", "")
    return status, (json.loads(raw) if "json" in ctype else raw.decode())


def post_json(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http(url + "/v1/images/generations", "POST", data, {"content-type": "application/json"})


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "fastsd-test-boundary"
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def post_edit(url: str, fields: dict, files: dict) -> tuple[int, dict]:
    body, ctype = multipart(fields, files)
    return http(url + "/v1/images/edits", "POST", body, {"content-type": ctype})


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def decoded(item) -> np.ndarray:
    b64 = item.b64_json if hasattr(item, "b64_json") else item["b64_json"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def alone(pipe, prompt, seed, **kw) -> np.ndarray:
    """What the pipeline gives for one image with this seed, called directly (uint8)."""
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
               output_type="np", **kw)
    return (out.images[0] * 255).round().astype(np.uint8)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding: batched and unbatched matmuls sum in different orders
    (~1e-6 apart), which can move a pixel across a rounding boundary, never further."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def metric(url: str, name: str, **labels) -> float:
    _, text = http(url + "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else "")) and (not labels or want in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(pipes):
    return pipes("eps")


@pytest.fixture(scope="module")
def server(ckpts, pipe):
    """The app over the session's tiny pipeline: batches of up to 4 images, a 150 ms window
    (long, so that concurrent test requests surely meet), small upload limit."""
    options = ServeOptions(model=str(ckpts["eps"]), max_batch=4, batch_window_ms=150, max_queue=32,
                           limits=Limits(max_upload_bytes=256 * 1024))
    running = Running(create_app(options, pipeline=pipe))
    yield running
    running.stop()


# ---- the openai client -------------------------------------------------------------------------


def test_generations_with_the_openai_client(server, pipe):
    c = client(server.url)
    r = c.images.generate(prompt="a red barn", n=2, size="40x32",
                          extra_body={"seed": 11, "num_inference_steps": STEPS, "negative_prompt": "fog"})
    assert len(r.data) == 2 and r.size == "40x32" and r.output_format == "png"
    for k, item in enumerate(r.data):
        raw = base64.b64decode(item.b64_json)
        assert raw.startswith(b"\x89PNG")
        im = Image.open(io.BytesIO(raw))
        assert im.size == (40, 32) and im.mode == "RGB"
        assert item.model_extra["seed"] == 11 + k
        # image k is the one seed 11 + k gives alone, as the pipeline's own call gives it
        assert close(decoded(item), alone(pipe, "a red barn", 11 + k, negative_prompt="fog", width=40, height=32))
    assert not np.array_equal(decoded(r.data[0]), decoded(r.data[1]))


def test_same_seed_same_bytes_and_other_formats(server):
    c = client(server.url)
    kw = {"prompt": "a lighthouse", "extra_body": {"seed": 5, "num_inference_steps": STEPS}}
    a, b = c.images.generate(**kw), c.images.generate(**kw)
    assert a.data[0].b64_json == b.data[0].b64_json
    other = c.images.generate(prompt="a lighthouse", extra_body={"seed": 6, "num_inference_steps": STEPS})
    assert other.data[0].b64_json != a.data[0].b64_json
    jpeg = c.images.generate(prompt="a lighthouse", output_format="jpeg",
                             extra_body={"seed": 5, "num_inference_steps": STEPS})
    assert base64.b64decode(jpeg.data[0].b64_json)[:3] == b"\xff\xd8\xff" and jpeg.output_format == "jpeg"


def test_bad_size_is_a_bad_request_error_with_a_useful_message(server):
    c = client(server.url)
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(prompt="x", size="33x32")
    assert "'size' must be a positive multiple of 2, got 33" in e.value.message and e.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(prompt="x", size="big")
    assert "WIDTHxHEIGHT" in e.value.message


def test_edits_img2img_inpaint_and_openai_alpha_masks(server, pipe):
    c = client(server.url)
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    r = c.images.edit(image=("in.png", png(source), "image/png"), prompt="a painting",
                      extra_body={"seed": 3, "num_inference_steps": STEPS, "strength": 0.6})
    assert len(r.data) == 1 and r.size == "32x32"
    assert close(decoded(r.data[0]), alone(pipe, "a painting", 3, image=source, strength=0.6))
    # inpainting with a white-is-repaint mask (diffusers' convention), n=2
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = c.images.edit(image=("in.png", png(source), "image/png"), mask=("m.png", png(mask), "image/png"),
                      prompt="a window", n=2, extra_body={"seed": 4, "num_inference_steps": STEPS})
    assert len(r.data) == 2
    expect = alone(pipe, "a window", 4, image=source, mask_image=mask)
    assert close(decoded(r.data[0]), expect)
    # OpenAI's convention: the mask's fully transparent pixels are the region to repaint
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (8, 8, 24, 24))
    r = c.images.edit(image=("in.png", png(source), "image/png"), mask=("m.png", png(rgba), "image/png"),
                      prompt="a window", extra_body={"seed": 4, "num_inference_steps": STEPS})
    assert close(decoded(r.data[0]), expect)
    # an RGBA mask with no transparent pixel is read by its colours, white = repaint
    opaque = mask.convert("RGBA")
    r = c.images.edit(image=("in.png", png(source), "image/png"), mask=("m.png", png(opaque), "image/png"),
                      prompt="a window", extra_body={"seed": 4, "num_inference_steps": STEPS})
    assert close(decoded(r.data[0]), expect)
    # and without a mask, an image's own transparent pixels are (dall-e-2's edits)
    holed = source.convert("RGBA")
    holed.paste((0, 0, 0, 0), (8, 8, 24, 24))
    r = c.images.edit(image=("in.png", png(holed), "image/png"), prompt="a window",
                      extra_body={"seed": 4, "num_inference_steps": STEPS})
    assert close(decoded(r.data[0]), alone(pipe, "a window", 4, image=holed.convert("RGB"), mask_image=mask))
    # an edit is the image's size, with a mask as without (OpenAI's; the Python API's inpaint, as
    # diffusers', defaults to the checkpoint's), down to a multiple of the VAE factor
    wide = Image.fromarray(rng.integers(0, 256, (41, 50, 3), dtype=np.uint8))
    hole = Image.new("L", wide.size, 0)
    hole.paste(255, (8, 8, 24, 24))
    f = pipe.info.vae_factor
    for extra in ({"mask": ("m.png", png(hole), "image/png")}, {}):
        r = c.images.edit(image=("in.png", png(wide), "image/png"), prompt="a window", **extra,
                          extra_body={"seed": 4, "num_inference_steps": STEPS})
        assert r.size == f"{50 // f * f}x{41 // f * f}" and decoded(r.data[0]).shape[:2] == (41 // f * f, 50 // f * f)
    assert close(decoded(r.data[0]), alone(pipe, "a window", 4, image=wide, strength=0.8))


def test_sixteen_concurrent_clients_batch_and_each_gets_its_own_images(server, pipe):
    before_batches = metric(server.url, "fastsd_batch_size_count")
    before_images = metric(server.url, "fastsd_batch_size_sum")

    def one(k):
        c = client(server.url)
        return c.images.generate(prompt=f"scene {k % 3}", extra_body={"seed": 100 + k, "num_inference_steps": STEPS})

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(len(r.data) == 1 for r in results)
    batches = metric(server.url, "fastsd_batch_size_count") - before_batches
    images = metric(server.url, "fastsd_batch_size_sum") - before_images
    assert images == 16 and batches < 16, f"{batches} batches for 16 concurrent requests: nothing was batched"
    for k in (0, 7, 15):  # batched, each still has the images its seed gives alone
        assert close(decoded(results[k].data[0]), alone(pipe, f"scene {k % 3}", 100 + k))


# ---- bad input over HTTP ---------------------------------------------------------------------------


def test_bad_input_gets_openai_errors_and_the_server_stays_healthy(server):
    u = server.url
    noise = png(Image.new("RGB", (32, 32), (9, 9, 9)))
    cases = [
        (post_json(u, b'{"prompt": "x", "n": '), 400, "not valid JSON"),
        (post_json(u, b"[1, 2]"), 400, "JSON object"),
        (post_json(u, {"prompt": "x", "n": "two"}), 400, "'n' must be an integer"),
        (post_json(u, {"prompt": 5}), 400, "'prompt' must be a string"),
        (post_json(u, {"prompt": "x", "guidance_scale": "high"}), 400, "'guidance_scale' must be a finite number"),
        (post_json(u, {"prompt": "x", "n": 100000}), 400, "'n' must be at most 10 on this server, got 100000"),
        (post_json(u, {"prompt": "x", "size": "100000x100000"}), 400, "'size' 100000 is over this pipeline's max_side"),
        (post_json(u, {"prompt": "x", "scheduler": "karras_magic"}), 400, "karras_magic"),
        (post_json(u, {"n": 1}), 400, "'prompt' is required"),
        (post_json(u, {"prompt": "   "}), 400, "'prompt' is empty"),
        (post_json(u, {"prompt": "x" * 5000}), 400, "limit is 4000"),
        (post_json(u, {"prompt": "x", "num_inference_steps": 10**6}), 400, "num_inference_steps"),
        (post_json(u, {"prompt": "x", "guidance_scale": 1e9}), 400, "guidance_scale"),
        (post_json(u, {"prompt": "x", "seed": -1}), 400, "'seed'"),
        (post_json(u, {"prompt": "x", "seed": 2**32}), 400, "'seed' must be an integer in [0, 4294967295], got 4"),
        (post_json(u, {"prompt": "x", "n": 2, "seed": 2**32 - 1}), 400, "'seed' must be at most 4294967294 with n=2"),
        (post_json(u, {"prompt": "x", "strength": 0.5}), 400, "strength"),
        (post_json(u, {"prompt": "x", "negative_prompt": ["a", "b"]}), 400, "'negative_prompt' must be a string"),
        (post_json(u, {"prompt": "x", "frobnicate": 1}), 400, "Unrecognized request argument supplied: frobnicate"),
        (post_json(u, {"prompt": "x", "response_format": "url"}), 400, "b64_json"),
        (post_json(u, {"prompt": "x", "style": "vivid"}), 400, "style"),
        (post_json(u, {"prompt": "x", "model": "dall-e-3"}), 404, "does not exist"),
        (post_json(u, b"{" + b" " * (2 * 2**20) + b"}"), 413, "at most"),
        (post_edit(u, {"prompt": "x"}, {"image": ("a.txt", b"this is not an image")}), 400, "not an image"),
        (post_edit(u, {"prompt": "x"}, {"image": ("a.png", png(Image.new("RGB", (32, 32)))[:60])}), 400,
         "could not be decoded"),
        (post_edit(u, {"prompt": "x"}, {"image": ("a.png", noise), "mask": ("m.png", png(Image.new("L", (16, 16))))}),
         400, "must have the same size"),
        (post_edit(u, {"prompt": "x"}, {"image": ("a.png", png(Image.new("RGB", (4000, 8))))}), 400, "at most 2048"),
        (post_edit(u, {"prompt": "x"}, {"image": ("a.png", os.urandom(300 * 1024))}), 413, "at most"),
        (post_edit(u, {"prompt": "x"}, {}), 400, "'image' is required"),
        (post_edit(u, {"prompt": "x", "n": "lots"}, {"image": ("a.png", noise)}), 400, "'n' must be an integer"),
        (post_edit(u, {"prompt": "x", "strength": "2"}, {"image": ("a.png", noise)}), 400, "strength"),
        (http(u + "/v1/images/edits", "POST", b'{"prompt": "x"}', {"content-type": "application/json"}), 400,
         "multipart"),
        (http(u + "/v1/nothing-here", "POST", b"{}"), 404, "Invalid URL"),
        (http(u + "/v1/images/generations", "GET"), 405, "Invalid URL"),
    ]
    for (status, body), want_status, text in cases:
        assert status == want_status, (text, status, body)
        err = body["error"]
        assert text in err["message"], (text, err)
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error"
    status, health = http(u + "/healthz")
    assert status == 200 and health["status"] == "ok"
    c = client(u)
    assert len(c.images.generate(prompt="still fine", extra_body={"num_inference_steps": STEPS}).data) == 1
    assert metric(u, "fastsd_requests_total", endpoint="/v1/images/generations", status="400") >= 15


def _raw(url: str, chunks: list[bytes], pause: float = 0.0, read_timeout: float = 30) -> tuple[int, dict | str]:
    """Send `chunks` over one raw connection (`pause` seconds apart), then read the response:
    (status, parsed JSON body); for bytes a client library would never send."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: read what it said
            time.sleep(pause)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
                    dict(line.lower().split(b": ", 1) for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:])
                    .get(b"content-length", b"0")):
                more = s.recv(65536)
                if not more:
                    break
                data += more
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if body.startswith(b"{") else body.decode(errors="replace"))


def test_request_heads_are_bounded_in_size_fields_and_time(server, monkeypatch):
    """A header over 64 KiB (sent whole, or streamed without end), over 100 header fields: 431
    with OpenAI's error JSON, after reading at most one socket read past the limit (a 64 MiB
    header was buffered whole). A head still incomplete after MAX_HEAD_SECONDS: 408. The
    server serves the next client normally."""
    from fastsd.serve import protocol

    start = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, body = _raw(server.url, [start + b"X-Big: " + b"a" * (100 * 1024) + b"\r\n\r\n"])
    assert status == 431 and "over 65536 bytes" in body["error"]["message"]
    status, body = _raw(server.url, [start + b"X-Big: "] + [b"a" * (256 * 1024)] * 64, pause=0.01)
    assert status == 431 and body["error"]["code"] == "request_header_fields_too_large"
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(3000))
    status, body = _raw(server.url, [start + fields + b"\r\n"])
    assert status == 431 and "over 100 header fields" in body["error"]["message"]
    monkeypatch.setattr(protocol, "MAX_HEAD_SECONDS", 0.5)
    t0 = time.monotonic()
    status, body = _raw(server.url, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n"], pause=0.1)
    assert status == 408 and "within 0.5 seconds" in body["error"]["message"]
    assert time.monotonic() - t0 < 10
    assert http(server.url + "/healthz")[0] == 200
    status, body = _raw(server.url, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Ok: v\r\n" * 90 + b"\r\n"])
    assert status == 200 and body["status"] == "ok"
    from http.client import HTTPConnection  # a large body, then more on the same connection: bodies are not heads

    conn = HTTPConnection(*server.url.removeprefix("http://").split(":"), timeout=60)
    for _ in range(3):
        conn.request("POST", "/v1/images/generations", json.dumps({"prompt": "x", "user": "u" * 900_000}),
                     {"content-type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 400 and "'user' is 900000 characters" in json.loads(reply.read())["error"]["message"]
        conn.request("GET", "/healthz")
        reply = conn.getresponse()
        assert reply.status == 200 and json.loads(reply.read())["status"] == "ok"
    conn.close()


def test_cut_off_and_deep_bodies_are_400s_never_another_request(server):
    """An edits body whose last part (the mask) lacks its closing boundary, with a matching
    Content-Length, is a 400 invalid_multipart (it parsed as img2img without the mask);
    JSON nested 100000 deep is a 400 invalid_json (a RecursionError was a plain-text 500)."""
    image = png(Image.new("RGB", (32, 32), (90, 90, 90)))
    body, ctype = multipart({"prompt": "x", "num_inference_steps": "2"},
                            {"image": ("a.png", image), "mask": ("m.png", png(Image.new("L", (32, 32), 255)))})
    cut = body[: body.rindex(b"--fastsd-test-boundary--")]  # the mask's bytes all there, no closing boundary
    head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(cut)}\r\n\r\n").encode()
    status, err = _raw(server.url, [head + cut])
    assert status == 400 and err["error"]["code"] == "invalid_multipart" and "cut off" in err["error"]["message"]
    status, err = post_edit(server.url, {"prompt": "x", "num_inference_steps": "2"}, {"image": ("a.png", image)})
    assert status == 200  # the same body, whole, is served
    for deep in (b"[" * 100000, b'{"prompt": ' + b"[" * 100000):
        status, err = post_json(server.url, deep)
        assert status == 400 and err["error"]["code"] == "invalid_json", err


def test_sixteen_bit_uploads_read_as_the_python_api_reads_them(server, pipe):
    """A 16-bit grey PNG (mid-grey: 32768 of 65535) is read by its value range on the server,
    as the Python API reads it: the same image as its 8-bit twin (was: white)."""
    wide = Image.fromarray(np.full((32, 32), 32896, dtype=np.uint16))  # 32896 / 65535 * 255 = 128
    assert wide.mode.startswith("I")
    narrow = Image.new("RGB", (32, 32), (128, 128, 128))
    got = []
    for im in (wide, narrow):
        status, body = post_edit(server.url, {"prompt": "x", "num_inference_steps": "2", "seed": "5",
                                              "strength": "0.5"}, {"image": ("a.png", png(im))})
        assert status == 200, body
        got.append(decoded(body["data"][0]))
    assert np.array_equal(got[0], got[1])
    out = pipe("x", image=wide, strength=0.5, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
               output_type="np").images[0]
    assert close(got[0], (out * 255).round().astype(np.uint8))


def test_a_step_count_the_sampler_cannot_run_is_a_400(ckpts, pipe):
    """A server with --max-steps 1000 refuses DDIM and PNDM at 1000 steps on SD 1.5's
    schedule before queuing (a 400 naming the count they can run; was a 500 IndexError)."""
    options = ServeOptions(model=str(ckpts["eps"]), limits=Limits(max_steps=1000))
    running = Running(create_app(options, pipeline=pipe))
    try:
        for scheduler in ("ddim", "pndm"):
            status, body = post_json(running.url, {"prompt": "x", "num_inference_steps": 1000,
                                                   "scheduler": scheduler})
            assert status == 400, body
            assert "cannot run 1000 steps" in body["error"]["message"] and "at most 999" in body["error"]["message"]
    finally:
        running.stop()


def test_health_models_and_metrics(server):
    status, body = http(server.url + "/healthz")
    assert status == 200 and body["status"] == "ok"
    models = client(server.url).models.list()
    assert "eps" in [m.id for m in models.data]
    client(server.url).images.generate(prompt="a", model="eps", extra_body={"num_inference_steps": STEPS})
    _, text = http(server.url + "/metrics")
    for name in ("fastsd_requests_total", "fastsd_queue_depth", "fastsd_batch_size_bucket",
                 'fastsd_stage_seconds_count{stage="unet"}', 'fastsd_stage_seconds_count{stage="queue"}',
                 'fastsd_stage_seconds_count{stage="request"}', "fastsd_images_total"):
        assert name in text, name


def test_a_server_fault_is_openai_500_json_and_the_server_goes_on(ckpts, pipe):
    running = Running(create_app(ServeOptions(model=str(ckpts["eps"])), pipeline=pipe))
    try:
        batcher = running.app.state.fastsd.batcher
        real, calls = batcher.runner, []

        def flaky(slots, stopped):
            calls.append(len(slots))
            if len(calls) == 1:
                raise RuntimeError("device fell over")
            return real(slots, stopped)

        batcher.runner = flaky
        with pytest.raises(openai.InternalServerError) as e:
            client(running.url).images.generate(prompt="x", extra_body={"num_inference_steps": 2})
        assert e.value.status_code == 500 and "device fell over" in e.value.message
        assert e.value.body["type"] == "server_error"
        assert len(client(running.url).images.generate(prompt="x", extra_body={"num_inference_steps": 2}).data) == 1
    finally:
        running.stop()


# ---- loading, queue limits, disconnects ------------------------------------------------------------


class _SlowLoad(ServeOptions):
    """Options whose model load waits for a test to release it."""

    gate = threading.Event()

    def load(self):
        assert self.gate.wait(60)
        return super().load()


def test_access_lines_request_ids_and_large_size_warnings(server, caplog):
    """One access line per request (id, endpoint, size, n, steps, status, queue and run time),
    the id echoed in X-Request-Id (the client's own kept); /healthz polls only at debug; a size
    far above the checkpoint's native one is warned of, with its time estimated from the pace
    measured on earlier batches."""
    caplog.set_level(logging.INFO, logger="fastsd.serve")
    body = json.dumps({"prompt": "x", "size": "32x32", "num_inference_steps": 3}).encode()
    req = urllib.request.Request(server.url + "/v1/images/generations", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "X-Request-Id": "abc-123"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200 and r.headers["x-request-id"] == "abc-123"
    status, _ = http(server.url + "/healthz")
    assert status == 200
    bad = http(server.url + "/v1/images/generations", "POST", b'{"prompt": "x", "size": "7x7"}',
               {"Content-Type": "application/json"})
    assert bad[0] == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "fastsd.serve" and " -> " in r.getMessage()]
    ok = next(x for x in lines if x.startswith("fastsd serve: abc-123 POST /v1/images/generations "))
    assert re.fullmatch(r"fastsd serve: abc-123 POST /v1/images/generations 32x32 n=1 steps=3 -> 200 "
                        r"queue \d+\.\d\ds run \d+\.\d\ds total \d+\.\d\ds", ok), ok
    assert any(re.fullmatch(r"fastsd serve: [0-9a-f]{12} POST /v1/images/generations -> 400 total .*", x)
               for x in lines), lines
    assert not any("/healthz" in x for x in lines)  # polled: debug only

    caplog.clear()
    pace = server.app.state.fastsd.pace
    assert pace.per_step is not None and pace.pixels <= 32 * 32  # measured on the batches
    client(server.url).images.generate(prompt="x", size="64x64", extra_body={"num_inference_steps": 1})
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert re.search(r"a 64x64 request is 4x the checkpoint's native 32x32 pixels: about \d+\.\d minutes "
                     r"of denoising at this server's measured pace \(1 steps, 1 image\(s\)\)", warning), warning


def test_a_cancelled_batch_stops_at_the_next_unet_call(ckpts, pipe, monkeypatch):
    """A batch whose every client went away stops after the UNet call running when it was
    noticed, whatever the sampler (Heun's legacy callback comes only every second call)."""
    from fastsd.serve.api import ImageRequest
    from fastsd.serve.app import _State
    from fastsd.serve.batcher import Cancelled, Job, Slot

    state = _State(ServeOptions(model=str(ckpts["eps"])), pipe, None)
    calls = []
    unet = pipe.backend.unet
    monkeypatch.setattr(pipe.backend, "unet", lambda **kw: calls.append(1) or unet(**kw))
    req = ImageRequest(prompt="x", negative_prompt=None, n=1, width=None, height=None, seed=1,
                       settings=(("num_inference_steps", 6), ("scheduler", "heun")), output_format="png",
                       output_compression=100)
    with pytest.raises(Cancelled):
        state._run_batch([Slot(Job("k", 1, req), 0)], stopped=lambda: len(calls) >= 1)
    assert len(calls) == 1


def test_503_while_loading_then_ready(ckpts, caplog):
    """Requests get 503 while the model loads; the log says it is loading, then what loaded and
    in how long."""
    caplog.set_level(logging.INFO, logger="fastsd.serve")
    options = _SlowLoad(model=str(ckpts["eps"]), device="cpu")
    running = Running(create_app(options))
    try:
        status, body = http(running.url + "/healthz")
        assert status == 503 and body["status"] == "loading"
        assert f"fastsd serve: loading {ckpts['eps']} (backend auto)" in caplog.text
        with pytest.raises(openai.InternalServerError) as e:  # the openai client's class for 503
            client(running.url).images.generate(prompt="x")
        assert e.value.status_code == 503 and "loading" in e.value.message
        _SlowLoad.gate.set()
        deadline = time.monotonic() + 60
        while http(running.url + "/healthz")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert len(client(running.url).images.generate(prompt="x", extra_body={"num_inference_steps": 2}).data) == 1
        assert re.search(rf"fastsd serve: {re.escape(str(ckpts['eps']))} loaded in \d+\.\ds \(backends: ", caplog.text)
    finally:
        running.stop()


def test_full_queue_is_429_and_a_gone_client_cancels_its_work(ckpts, pipe):
    options = ServeOptions(model=str(ckpts["eps"]), max_batch=1, batch_window_ms=0, max_queue=1)
    running = Running(create_app(options, pipeline=pipe))
    try:
        slow = {"num_inference_steps": 150}  # a second or more each on the tiny model

        def one(k):
            try:
                client(running.url).images.generate(prompt="x", extra_body={**slow, "seed": k})
                return 200
            except openai.RateLimitError as e:
                assert "queue is full" in e.message
                return 429

        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(one, 0)
            deadline = time.monotonic() + 30
            while metric(running.url, "fastsd_running_images") < 1:  # it is running
                assert time.monotonic() < deadline
                time.sleep(0.02)
            rest = [pool.submit(one, k) for k in range(1, 5)]
            statuses = [first.result()] + sorted(f.result() for f in rest)
        # the first runs, one more waits in the queue (max_queue=1), the other three find it full
        assert statuses == [200, 200, 429, 429, 429], statuses
        assert metric(running.url, "fastsd_requests_total", status="429") == 3

        # a client that goes away: its request is dropped (a running batch stops at the next step)
        batches = metric(running.url, "fastsd_batch_size_count")
        body = json.dumps({"prompt": "x", "num_inference_steps": 200}).encode()
        with socket.create_connection(("127.0.0.1", int(running.url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.5)
        deadline = time.monotonic() + 30
        while metric(running.url, "fastsd_cancelled_total") < 1:
            assert time.monotonic() < deadline, "the disconnect was not noticed"
            time.sleep(0.05)
        client(running.url).images.generate(prompt="x", extra_body={"num_inference_steps": 2})
        # one batch more (the follow-up request's): the abandoned one never completed
        assert metric(running.url, "fastsd_batch_size_count") == batches + 1
    finally:
        running.stop()


# ---- the process: CLI, SIGTERM -------------------------------------------------------------------


def _start(args: list[str], port: int, log) -> subprocess.Popen:
    """`fastsd serve ARGS --port PORT` as a process (output to the file `log`), once healthy."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastsd", "serve", *args, "--port", str(port)], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, open(log).read()
        try:
            if http(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError("the server did not become healthy")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """End a server a test leaves running: SIGTERM first (a --ray server then shuts its Ray
    cluster down; SIGKILL would leave the cluster's processes running), SIGKILL after 60 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_0(ckpts, tmp_path):
    port = free_port()
    proc = _start(["--model", str(ckpts["eps"]), "--max-batch", "1", "--device", "cpu"], port, tmp_path / "log")
    url = f"http://127.0.0.1:{port}"
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(lambda k=k: client(url).images.generate(
                prompt="x", extra_body={"seed": k, "num_inference_steps": 60})) for k in range(4)]
            deadline = time.monotonic() + 30
            while metric(url, "fastsd_running_images") < 1 or metric(url, "fastsd_queue_depth") < 3:  # all in
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert sum(f.done() for f in futures) <= 1  # three were still waiting their turn
            results = [f.result(timeout=120) for f in futures]
        assert all(len(r.data) == 1 for r in results)  # none lost
        assert proc.wait(60) == 0
        with pytest.raises(OSError):  # no longer listening
            http(url + "/healthz")
    finally:
        _stop(proc)


@pytest.mark.slow
def test_sigterm_with_drain_seconds_keeps_listening_with_healthz_503(ckpts, tmp_path):
    """--drain-seconds: after SIGTERM the listener stays open for the drain, /healthz answers
    503 "draining" to new connections (what a load balancer polls) while requests are still
    served; then the server stops accepting and exits 0. (Without it, the listener closes
    at once: the README said /healthz answered 503 meanwhile, which no new client could see.)"""
    port = free_port()
    proc = _start(["--model", str(ckpts["eps"]), "--device", "cpu", "--drain-seconds", "4"], port, tmp_path / "log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        time.sleep(0.3)
        status, body = http(url + "/healthz")
        assert status == 503 and body["status"] == "draining"
        result = client(url).images.generate(prompt="x", extra_body={"num_inference_steps": 2})
        assert len(result.data) == 1  # still served during the drain
        assert proc.wait(60) == 0
        assert time.monotonic() - t0 >= 3.5
        with pytest.raises(OSError):  # no longer listening
            http(url + "/healthz")
    finally:
        _stop(proc)


def test_cli_errors_are_one_line(ckpts, tmp_path, capsys):
    """One real process (the console script's exit code and stderr), the other cases in
    this process through the same main()."""
    from fastsd.cli import main

    def run(*args):
        code = main(["serve", *args])
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    proc = subprocess.run([sys.executable, "-m", "fastsd", "serve", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and "model not found" in proc.stderr and "Traceback" not in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            (run("--model", str(tmp_path / "missing")), "model not found"),
            (run("--model", str(ckpts["eps"]), "--max-batch", "0"), "--max-batch must be >= 1"),
            (run("--model", str(ckpts["eps"]), "--replicas", "2"), "need --ray"),
            (run("--model", str(ckpts["eps"]), "--ray", "--autoscaling", "{bad"), "--autoscaling is not JSON"),
            (run("--model", str(ckpts["eps"]), "--port", port), "cannot listen on 127.0.0.1:" + port),
            (run("--model", str(ckpts["eps"]), "--backend", "tensorrtt"), "--backend must be one of auto, "),
            (run("--model", str(ckpts["eps"]), "--dtype", "fp8"), "--dtype must be one of fp16, bf16, fp32, int8, "
                                                                   "got 'fp8'"),
            (run("--model", str(ckpts["eps"]), "--drain-seconds", "-1"), "--drain-seconds must be in [0, 3600]"),
        ]
    for proc, text in cases:
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastsd: error:") and text in lines[0], proc.stderr


def test_a_model_that_fails_to_load_ends_the_server_with_exit_2(tmp_path):
    """The model loads after the server starts (503 until then); if it cannot load, the
    server says why in one error line, with no traceback, and exits 2."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "fastsd", "serve", "--model", str(broken), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastsd: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr


# ---- Ray Serve -------------------------------------------------------------------------------------


def test_ray_serve_two_replicas_serve_the_same_api(ckpts, pipe, tmp_path):
    pytest.importorskip("ray.serve")
    port = free_port()
    proc = _start(["--model", str(ckpts["eps"]), "--ray", "--replicas", "2", "--max-batch", "4",
                   "--batch-window-ms", "100"], port, tmp_path / "log")
    url = f"http://127.0.0.1:{port}"
    try:
        c = client(url)
        r = c.images.generate(prompt="a red barn", n=2, size="40x32",
                              extra_body={"seed": 11, "num_inference_steps": STEPS})
        assert len(r.data) == 2 and r.size == "40x32"
        for k in range(2):
            assert close(decoded(r.data[k]), alone(pipe, "a red barn", 11 + k, width=40, height=32))
        again = c.images.generate(prompt="a red barn", n=2, size="40x32",
                                  extra_body={"seed": 11, "num_inference_steps": STEPS})
        assert [d.b64_json for d in again.data] == [d.b64_json for d in r.data]
        with pytest.raises(openai.BadRequestError) as e:
            c.images.generate(prompt="x", size="33x32")
        assert "'size' must be a positive multiple of 2" in e.value.message
        source = Image.new("RGB", (32, 32), (120, 30, 200))
        r = c.images.edit(image=("in.png", png(source), "image/png"), prompt="a painting",
                          extra_body={"seed": 3, "num_inference_steps": STEPS, "strength": 0.6})
        assert close(decoded(r.data[0]), alone(pipe, "a painting", 3, image=source, strength=0.6))

        def one(k, steps=STEPS):
            raw = client(url).images.with_raw_response.generate(
                prompt=f"scene {k}", extra_body={"seed": k, "num_inference_steps": steps})
            return raw.headers["x-fastsd-replica"], raw.parse()

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(16)))
        assert all(len(res.data) == 1 for _, res in results)
        assert len({replica for replica, _ in results}) == 2, "one replica served everything"
        assert close(decoded(results[5][1].data[0]), alone(pipe, "scene 5", 5))
        # SIGTERM: in-flight requests finish, then Serve and Ray shut down and the process exits 0
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(one, k, 100) for k in range(2)]  # ~2.5 s each, 1 s in at SIGTERM
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            assert not any(f.done() for f in futures), "the requests were not in flight at SIGTERM"
            assert all(len(f.result(timeout=120)[1].data) == 1 for f in futures)
        assert proc.wait(120) == 0
    finally:
        _stop(proc)


def test_ray_application_builder_takes_ray_cli_arguments():
    """`serve run fastsd.serve.ray_serve:build_app model=M ...`: Ray's CLI passes strings."""
    pytest.importorskip("ray.serve")
    from fastsd.serve.ray_serve import build_app

    app = build_app({"model": "synthetic:tiny", "max_batch": "8", "batch_window_ms": "25", "allow_pickle": "false",
                     "autoscaling": '{"min_replicas": 1, "max_replicas": 3}'})
    deployment = app._bound_deployment  # Ray has no public accessor for a bound application's deployment
    options = deployment.init_args[0]
    assert (options.model, options.max_batch, options.batch_window_ms, options.allow_pickle) == (
        "synthetic:tiny", 8, 25.0, False)
    config = deployment._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas) == (1, 3)  # passed through
    assert deployment.max_ongoing_requests == options.max_queue + options.max_batch
    assert deployment.ray_actor_options["num_gpus"] == 0  # no Ray here: no GPUs known
    fixed = build_app({"model": "synthetic:tiny", "replicas": "2"})._bound_deployment
    assert fixed.num_replicas == 2
    with pytest.raises(ValueError, match="unknown fastsd serve argument 'colour'"):
        build_app({"model": "synthetic:tiny", "colour": "blue"})
    with pytest.raises(ValueError, match="model="):
        build_app({"replicas": "2"})


# ---- LoRA ------------------------------------------------------------------------------------


def test_lora_requests_are_batched_apart(ckpts, tmp_path):
    """`lora` in a request: the server's LoRAs by name, with a scale; requests with different
    LoRA sets never share a batch, and each gets what the pipeline gives with those LoRAs."""
    from safetensors.torch import save_file

    from fastsd import Pipeline

    gen = torch.Generator().manual_seed(0)
    lora = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{m}.{part}": torch.randn(
        shape, generator=gen) * 0.5 for m in ("to_q", "to_v") for part, shape in
        (("lora_down.weight", (2, 32)), ("lora_up.weight", (32, 2)))}
    save_file(lora, str(tmp_path / "style.safetensors"))
    options = ServeOptions(model=str(ckpts["eps"]), max_batch=4, batch_window_ms=300,
                           loras=(("style", str(tmp_path / "style.safetensors")),))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), device="cpu")
    running = Running(create_app(options, pipeline=pipe))
    try:
        bodies = [{"prompt": "a barn", "seed": 5, "size": "32x32", "num_inference_steps": STEPS, "lora": lora}
                  for lora in ("style:0.5", {"name": "style", "scale": 2}, None)]
        with ThreadPoolExecutor(3) as ex:
            answers = list(ex.map(lambda b: post_json(running.url, {k: v for k, v in b.items() if v is not None}),
                                  bodies))
        assert [s for s, _ in answers] == [200, 200, 200]
        assert metric(running.url, "fastsd_batch_size_count") == 3  # never batched together
        assert metric(running.url, "fastsd_stage_seconds_count", stage="lora") >= 2
        direct = Pipeline.from_pretrained(str(ckpts["eps"]), device="cpu")
        for (_, body), scale in zip(answers, (0.5, 2.0, None), strict=True):
            if scale is not None:
                direct.load_lora(tmp_path / "style.safetensors", scale=scale)
            assert close(decoded(body["data"][0]), alone(direct, "a barn", 5, height=32, width=32))
            direct.unload_lora()
        status, body = post_json(running.url, {"prompt": "a", "lora": "nope"})
        assert status == 400 and body["error"]["param"] == "lora" and "style" in body["error"]["message"]
        status, body = post_json(running.url, {"prompt": "a", "lora": "style:11"})
        assert status == 400 and body["error"]["param"] == "lora"
    finally:
        running.stop()


# ---- one table of call arguments: the same checks and messages in the API, the CLI and the server ----

SWEEP = {"strength": 1.5, "num_inference_steps": 0, "guidance_scale": 101.0, "scheduler": "nope", "eta": 1.5,
         "seed": -1, "height": 33, "width": 33, "num_images_per_prompt": 0, "guidance_rescale": 2.0,
         "timesteps": [-1.0], "sigmas": [-1.0], "controlnet_conditioning_scale": 11.0,
         "control_guidance_start": 2.0, "control_guidance_end": -1.0, "prompt_syntax": "comfy"}
NO_COMMON_BAD_VALUE = {  # the table's rows on both front ends whose bad values differ by front end
    "prompt": "any text is a prompt on the command line and over HTTP",
    "negative_prompt": "as prompt", "image": "a file on the CLI, an upload over HTTP", "mask_image": "as image",
    "control_image": "as image", "ip_adapter_image": "as image"}


def test_every_argument_gets_one_message_in_the_api_the_cli_and_the_server(server, pipe, ckpts, tmp_path, capsys):
    """Each argument the CLI and the server both take, given a bad value: the same detail,
    after the name the user typed (the API's name, the CLI's flag, the server's field), and
    the server's `param` is that field. No model is loaded for the CLI's."""
    from fastsd.arguments import ARGS, field
    from fastsd.cli import main
    from fastsd.errors import InvalidArgumentError

    both = {a.name: a for a in ARGS if a.http and (a.flag or a.name == "prompt")}  # prompt: the CLI's positional
    assert set(both) == set(SWEEP) | set(NO_COMMON_BAD_VALUE)
    for name, bad in SWEEP.items():
        with pytest.raises(InvalidArgumentError) as e:
            pipe.check_call("x", **{name: bad})
        assert e.value.param == name and str(e.value) == f"{name} {e.value.detail}"
        detail = e.value.detail

        text = ",".join(map(str, bad)) if isinstance(bad, list) else str(bad)
        assert main(["generate", "x", "--model", str(ckpts["eps"]), "--out", str(tmp_path / "o.png"),
                     both[name].flag, text]) == 2
        assert capsys.readouterr().err == f"fastsd: error: {both[name].flag} {detail}\n", name

        body = {"prompt": "x", name: bad}
        if name in ("height", "width"):
            body = {"prompt": "x", "size": "32x33" if name == "height" else "33x32"}
        elif name == "num_images_per_prompt":
            body = {"prompt": "x", "n": bad}
        status, answer = post_json(server.url, body)
        assert status == 400 and answer["error"]["message"] == f"'{field(name)}' {detail}", (name, answer)
        assert answer["error"]["param"] == field(name)


def test_guidance_rescale_timesteps_and_sigmas_in_the_cli_and_the_server(server, pipe, ckpts, tmp_path):
    """The arguments added to the table reach the pipeline from both front ends, give the
    images the API gives, and the CLI records them as it ran them."""
    from fastsd.cli import main

    sigmas = [14.6, 5.0, 1.2, 0.0]
    want = alone(pipe, "a lighthouse", 3, guidance_rescale=0.7, scheduler="euler", sigmas=sigmas)
    out = client(server.url).images.generate(prompt="a lighthouse", extra_body={
        "seed": 3, "num_inference_steps": STEPS, "guidance_rescale": 0.7, "scheduler": "euler", "sigmas": sigmas})
    assert close(decoded(out.data[0]), want)
    # an edit (form fields: text) takes them too
    status, body = post_edit(server.url, {"prompt": "a lighthouse", "seed": "3", "guidance_rescale": "0.7",
                                          "scheduler": "euler", "timesteps": "999, 500, 100"},
                             {"image": ("a.png", png(Image.new("RGB", (32, 32), (90, 120, 200))))})
    assert status == 200, body

    path = tmp_path / "o.png"
    assert main(["generate", "a lighthouse", "--model", str(ckpts["eps"]), "--out", str(path), "--no-progress",
                 "--seed", "3", "--guidance-rescale", "0.7", "--scheduler", "euler", "--timesteps",
                 "999,500,100"]) == 0
    settings = json.loads(Image.open(path).text["fastsd"])
    assert settings["timesteps"] == [999.0, 500.0, 100.0] and settings["guidance_rescale"] == 0.7
    assert settings["num_inference_steps"] == 3 and settings["seed"] == 3
    again = pipe("a lighthouse", seed=3, guidance_rescale=0.7, scheduler="euler", timesteps=[999, 500, 100],
                 prompt_syntax=settings["prompt_syntax"])  # the CLI's default: a1111
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(path).convert("RGB")))
    assert again.settings == {**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
                                 if k in again.settings}}


def test_the_pace_scales_from_the_smallest_size_at_its_fastest():
    from fastsd.serve.access import Pace

    pace = Pace()
    assert pace.estimate(64, 64, 10, 1) is None  # nothing measured yet
    pace.record(1.3, 1, 256, 256)  # a first call: slower than a step
    pace.record(0.93, 1, 256, 256)
    pace.record(4.0, 1, 512, 512)  # a larger size: the smaller one stays the reference
    pace.record(2.0, 2, 256, 256)  # two images: 1.0 s each, slower than 0.93
    assert (pace.per_step, pace.pixels) == (0.93, 256 * 256)
    assert pace.estimate(1024, 1024, 20, 1) == pytest.approx(0.93 * 20 * 16 ** 1.5)
