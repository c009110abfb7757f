"""The backend protocol: four callables named like the ONNX graphs' inputs.

The pipeline only ever calls these; it never branches on which backend it holds.
Inputs arrive in float32 (input_ids int64) on the pipeline's device; outputs are
returned in float32 on that device. Precision inside is the backend's business.
"""

from __future__ import annotations

from typing import Protocol

import torch

BACKEND_NAMES = ("auto", "tensorrt", "compiled", "onnxruntime", "eager")


class Backend(Protocol):
    backends: dict[str, str]  # network name -> what runs it, e.g. {"unet": "eager"}

    def text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor,
             encoder_hidden_states: torch.Tensor) -> torch.Tensor: ...

    def vae_encoder(self, images: torch.Tensor) -> torch.Tensor: ...

    def vae_decoder(self, latent: torch.Tensor) -> torch.Tensor: ...
