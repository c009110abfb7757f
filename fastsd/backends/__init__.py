"""The backend protocol: four callables named like the ONNX graphs' inputs.

The pipeline only ever calls these; it never branches on which backend it holds.
Inputs arrive in float32 (input_ids int64) on the pipeline's device; outputs are
returned in float32 on that device. Precision inside is the backend's business.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

BACKEND_NAMES = ("auto", "tensorrt", "compiled", "onnxruntime", "eager")

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


class Backend(Protocol):
    backends: dict[str, str]  # network name -> what runs it, e.g. {"unet": "eager"}

    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor,
             encoder_hidden_states: torch.Tensor) -> torch.Tensor: ...

    def vae_encoder(self, images: torch.Tensor) -> torch.Tensor: ...

    def vae_decoder(self, latent: torch.Tensor) -> torch.Tensor: ...
