"""Model families and NetworkSpec: a family whose UNet takes one more input needs only its
spec entry, its UNet module and its encode(); the loop, eager, the ONNX exporter and the
ONNX Runtime runner carry the input by name with no code of their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastsd import Pipeline
from fastsd.families import StableDiffusion
from fastsd.networks import BATCH, FLOAT32, TensorSpec, UNet

KW = dict(num_inference_steps=3, output_type="np", seed=2, height=24, width=40)


class ScaledUNet(nn.Module):
    """A UNet with one extra input: a per-row scale of its output."""

    def __init__(self, unet):
        super().__init__()
        self.inner = UNet(unet)

    def forward(self, sample, timestep, encoder_hidden_states, out_scale):
        return self.inner(sample, timestep, encoder_hidden_states) * out_scale[:, None, None, None]


def scaled_family(scale: float):
    class Scaled(StableDiffusion):
        extra_unet_inputs = (TensorSpec("out_scale", (BATCH,), FLOAT32, sample=1.0),)
        unet_module = ScaledUNet

        def encode(self, encoders, req, device):
            out = super().encode(encoders, req, device)
            rows = out["encoder_hidden_states"].shape[0]
            return {**out, "out_scale": torch.full((rows,), scale, device=device)}

    def make(ckpt, controlnets=()):
        family = Scaled(ckpt.info, ckpt.tokenizer, None, ckpt.unet.config, controlnets)
        family.use_text_encoders(ckpt)  # the token tables its text inputs are looked up in
        return family

    return make


def test_extra_unet_input_is_carried_by_name(ckpts, pipes, monkeypatch):
    monkeypatch.setattr("fastsd.loading.family_for", scaled_family(1.0))
    same = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")
    assert same.family.specs["unet"].input_names[-1] == "out_scale"
    assert np.array_equal(same("a fox", **KW).images, pipes("eps")("a fox", **KW).images)
    monkeypatch.setattr("fastsd.loading.family_for", scaled_family(0.5))
    halved = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")("a fox", **KW).images
    assert np.abs(halved - pipes("eps")("a fox", **KW).images).max() > 1e-2  # the input reaches the UNet


def test_extra_unet_input_through_onnx(ckpts, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnx
    from fastsd.export import export_checkpoint

    family = scaled_family(0.5)
    monkeypatch.setattr("fastsd.loading.family_for", family)
    monkeypatch.setattr("fastsd.export.common.family_for", family)
    entry = export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path, networks=("unet",))
    graph = onnx.load(str(entry / "unet.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["sample", "timestep", "encoder_hidden_states", "out_scale"]
    engine = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(tmp_path))
    eager = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")
    out = engine("a fox", **KW)
    assert out.backends["unet"] == "onnxruntime"
    assert np.abs(out.images - eager("a fox", **KW).images).max() <= 1e-3
