"""The backend protocol: the networks, called by their NetworkSpec's input names.

The pipeline only ever calls these; it never branches on which backend it holds.
Inputs arrive in float32 (the text encoders' token embeddings too) on the pipeline's device; outputs are
returned in float32 on that device: one tensor, or a tuple in the spec's output order
for a network with several outputs (SD-XL's second text encoder). Precision inside is the backend's business. Each
call may pass `ran`, a dict of its own, where the backend records what ran each network
(so a pipeline called from several threads reports each call's own backends).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Protocol

import torch

_streams: dict[int, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()


def work_stream(device: torch.device) -> torch.cuda.Stream:
    """The one non-default CUDA stream fastsd's GPU work runs on, per device. Pipelines run
    on it, ONNX Runtime is handed it (on the default stream, whose handle is 0, ORT would
    ignore `user_compute_stream` and use streams of its own) and TensorRT enqueues on it
    (TensorRT documents extra synchronisations on the default stream)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _streams_lock:
        if index not in _streams:
            _streams[index] = torch.cuda.Stream(device=torch.device("cuda", index))
        return _streams[index]


@contextmanager
def on_work_stream(device: torch.device) -> Iterator[None]:
    """Run the block on `work_stream(device)`, ordered after the caller's stream and the
    caller's stream after it. Nothing to do on the CPU, when already on the work stream,
    or inside a CUDA-graph capture (the capture's stream holds the work)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        yield
        return
    caller, work = torch.cuda.current_stream(device), work_stream(device)
    if caller == work:
        yield
        return
    work.wait_stream(caller)
    try:
        with torch.cuda.stream(work):
            yield
    finally:
        caller.wait_stream(work)


@contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make `device` the current CUDA device for the block: TensorRT deserialises, allocates
    and launches, and AOTInductor loads, on the current device, which on a machine of several
    GPUs is not necessarily the pipeline's. Nothing to do on the CPU or for a bare "cuda"."""
    if device.type != "cuda" or device.index is None:
        yield
        return
    with torch.cuda.device(device):
        yield


def device_index(device: torch.device) -> int:
    """The CUDA device index of `device` (-1: the CPU, or the current device for a bare "cuda")."""
    return -1 if device.type != "cuda" or device.index is None else device.index


def record(ran: dict | None, network: str, what: str) -> None:
    if ran is not None:
        ran[network] = what


class Backend(Protocol):
    """What the pipeline holds (EagerBackend, CompositeBackend): `run` by network name, the
    four calls `Networks` derives from it, and the fp32 VAE retry."""

    backends: dict[str, str]  # network -> what serves it when the call's shapes fit (fixed at load)

    def run(self, network: str, inputs: dict[str, torch.Tensor], ran: dict | None = None) -> torch.Tensor: ...

    def text_encoder(self, inputs_embeds: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor: ...

    def unet(self, *, ran: dict | None = None, **inputs: torch.Tensor) -> torch.Tensor: ...

    def vae_encoder(self, images: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor: ...

    def vae_decoder(self, latent: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor: ...

    def vae_decoder_fp32(self, latent: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor:
        """The VAE decoder in eager fp32: the retry when a lower precision overflows."""

    def set_weights(self, network: str, weights: dict[str, torch.Tensor], at_base: bool,
                    held: tuple | None = None) -> None:
        """The network's weights changed in place (LoRA): `weights` are the changed ones by
        parameter name; engines are refitted to them, or stop serving the network until
        `at_base` (its weights are the checkpoint's own again). `held`: the weights are the
        projections of these IP-Adapters (fingerprints): only engines built with IP-Adapter
        inputs take them, and one holding exactly those already is left as it is."""

    def text_encoders_for(self, clip_skip: int | None) -> dict:
        """Each text encoder's call (by network name) for a per-call clip_skip (None: the
        load-time one); an InvalidArgumentError where an engine bakes in another."""


def as_float(out):
    """A network's output(s) in float32: a tensor, or a tuple of them for several outputs."""
    return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


class Networks:
    """The network calls in terms of `run` (by the specs' input names)."""

    def run(self, network: str, inputs: dict[str, torch.Tensor], ran: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def text_encoder(self, inputs_embeds: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor:
        return self.run("text_encoder", {"inputs_embeds": inputs_embeds}, ran)

    def unet(self, *, ran: dict | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        return self.run("unet", inputs, ran)

    def vae_encoder(self, images: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor:
        return self.run("vae_encoder", {"images": images}, ran)

    def vae_decoder(self, latent: torch.Tensor, *, ran: dict | None = None) -> torch.Tensor:
        return self.run("vae_decoder", {"latent": latent}, ran)
