"""What the server's log says of each request: one access line (its id, endpoint, size, steps,
status, queue and run time), and a warning, with an estimated time, for a size far above the
checkpoint's native one (a 2048x2048 SD 1.5 image takes minutes a step on a CPU)."""

from __future__ import annotations

import logging
import threading
import uuid

log = logging.getLogger("fastsd.serve")

QUIET_PATHS = ("/healthz", "/metrics", "/sdapi/v1/progress")  # polled (503 while loading too): lines only with -v
LARGE = 4.0  # pixels over the native size's that get a warning (both sides twice the native)
ATTENTION_POWER = 1.5  # step time ~ pixels ** this, between convolutions' 1 and self-attention's 2: SD 1.5 on
# ONNX Runtime (CPU, 2026-12-05) took 55 s a step at 1024x1024 against 0.93 s at 256x256, 16x the pixels: 59x


def request_id(headers: dict) -> str:
    """The client's X-Request-Id (printable, at most 64 characters), else a new one."""
    given = headers.get(b"x-request-id", b"").decode("ascii", "replace")
    return given if given and len(given) <= 64 and given.isprintable() else uuid.uuid4().hex[:12]


def access_line(method: str, path: str, status: int, seconds: float, facts: dict) -> None:
    """Log one request: `<id> POST /v1/images/generations 512x512 n=1 steps=20 -> 200 queue
    0.01s run 3.20s total 3.25s` (size, steps, queue and run where the request made images)."""
    parts = [facts.get("id", "-"), method, path]
    if "size" in facts:
        parts += [f"{facts['size'][0]}x{facts['size'][1]}", f"n={facts['n']}", f"steps={facts['steps']}"]
    parts += ["->", str(status)]
    for what in ("queue", "run"):
        if what in facts:
            parts.append(f"{what} {facts[what]:.2f}s")
    parts.append(f"total {seconds:.2f}s")
    quiet = path in QUIET_PATHS
    log.log(logging.DEBUG if quiet else logging.INFO, "fastsd serve: %s", " ".join(parts))


class Pace:
    """Seconds per UNet step per image, per pixel, measured on this server's batches: what
    estimates a large request's time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.per_step: float | None = None  # seconds per step per image, at `pixels`
        self.pixels = 0

    def record(self, step_seconds: float, images: int, width: int, height: int) -> None:
        """A batch of `images` at width x height took `step_seconds` per UNet step. The
        smallest size measured is kept (the estimate scales up from it), at its fastest (a
        first call's one-time costs are not a step's)."""
        if step_seconds <= 0 or images < 1:
            return
        per_step, pixels = step_seconds / images, width * height
        with self._lock:
            if self.per_step is None or pixels < self.pixels or (pixels == self.pixels and per_step < self.per_step):
                self.per_step, self.pixels = per_step, pixels

    def estimate(self, width: int, height: int, steps: int, images: int) -> float | None:
        """Seconds of UNet steps for such a request, scaled from the measured pace (None
        before any batch was measured)."""
        with self._lock:
            if self.per_step is None:
                return None
            return self.per_step * images * steps * (width * height / self.pixels) ** ATTENTION_POWER


def warn_if_large(width: int, height: int, native: int, steps: int, images: int, pace: Pace) -> None:
    """A warning for a request far above the checkpoint's native size, with its estimated time."""
    ratio = width * height / (native * native)
    if ratio < LARGE:
        return
    seconds = pace.estimate(width, height, steps, images)
    guess = (f"about {seconds / 60:.1f} minutes of denoising at this server's measured pace"
             if seconds is not None else "no batch measured yet to estimate its time from")
    log.warning("fastsd serve: a %dx%d request is %.0fx the checkpoint's native %dx%d pixels: %s (%d steps, "
                "%d image(s)); a smaller size and an upscale (hires fix) is much faster",
                width, height, ratio, native, native, guess, steps, images)
