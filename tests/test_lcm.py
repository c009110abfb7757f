"""Guidance-distilled UNets (LCM-distilled: time_cond_proj_dim) against diffusers'
LatentConsistencyModelPipeline, and on engines."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import copy_entries

from fastsd import Pipeline
from fastsd.synthetic import build

TOL = 1e-3
KW = dict(num_inference_steps=4, guidance_scale=8.5, output_type="np")


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    """The tiny SD architecture with a guidance-embedding UNet (time_cond_proj_dim 32, random
    weights) and LCMScheduler's config, as LCM-distilled checkpoints ship."""
    from diffusers import UNet2DConditionModel

    path = build(tmp_path_factory.mktemp("lcm") / "lcm", "tiny", seed=5)
    config = {k: v for k, v in json.loads((path / "unet" / "config.json").read_text()).items() if k[0] != "_"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        UNet2DConditionModel(**dict(config, time_cond_proj_dim=32)).save_pretrained(path / "unet")
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    sched.update(_class_name="LCMScheduler", original_inference_steps=50, timestep_spacing="leading")
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def eager(lcm):
    return Pipeline.from_pretrained(str(lcm), device="cpu")


def _diffusers(path, cls_name: str):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    from fastsd.guidance import guidance_embedding

    for w, width in ((7.5, 32), (0.0, 256), (3.25, 33)):
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor(w).repeat(3), width)
        assert torch.equal(guidance_embedding(w, width, 3), want)


def test_txt2img_matches_latent_consistency_pipeline(lcm, eager):
    """As diffusers' LatentConsistencyModelPipeline (LCMScheduler, the guidance as an embedding, no CFG)."""
    ref = _diffusers(lcm, "LatentConsistencyModelPipeline")
    want = ref("a fox", generator=torch.Generator().manual_seed(3), **KW).images
    out = eager("a fox", scheduler="lcm", generator=torch.Generator().manual_seed(3), **KW)
    assert np.abs(out.images - want).max() <= TOL
    other = eager("a fox", scheduler="lcm", generator=torch.Generator().manual_seed(3), **dict(KW, guidance_scale=2))
    assert np.abs(other.images - out.images).max() > 1e-3  # the embedding carries the scale


def test_img2img_and_other_samplers_match_diffusers(lcm, eager):
    """Img2img with the lcm sampler as LatentConsistencyModelImg2ImgPipeline (every step runs,
    on the first strength part of the distillation's timesteps; a plain UNet with the lcm
    sampler, LCM-LoRA's case, skips the first steps as StableDiffusionImg2ImgPipeline with
    LCMScheduler: test_parity); another sampler as StableDiffusionPipeline, which gives such a
    UNet the embedding and skips CFG too."""
    from diffusers import EulerDiscreteScheduler
    from PIL import Image

    from fastsd.errors import InvalidArgumentError

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ref = _diffusers(lcm, "LatentConsistencyModelImg2ImgPipeline")
    for strength in (0.6, 0.1):  # 0.1 x 4 steps would skip every step; LCM runs them on 5 timesteps
        want = ref("a fox", image=image, strength=strength, generator=torch.Generator().manual_seed(4), **KW)
        gen = torch.Generator().manual_seed(4)
        out = eager("a fox", image=image, strength=strength, scheduler="lcm", generator=gen, **KW)
        assert np.abs(out.images - want.images).max() <= TOL
    with pytest.raises(InvalidArgumentError, match="strength 0.05 leaves 2 of the 50 distillation timesteps"):
        eager("a fox", image=image, strength=0.05, scheduler="lcm", seed=1, **KW)
    sd = _diffusers(lcm, "StableDiffusionPipeline")
    sd.scheduler = EulerDiscreteScheduler.from_config(sd.scheduler.config)
    want = sd("a fox", generator=torch.Generator().manual_seed(6), **KW).images
    out = eager("a fox", scheduler="euler", generator=torch.Generator().manual_seed(6), **KW)
    assert np.abs(out.images - want).max() <= TOL


def test_negative_prompt_is_said_to_do_nothing(eager, caplog):
    with caplog.at_level(logging.WARNING):
        eager("a fox", negative_prompt="blur", scheduler="lcm", seed=1, **KW)
    assert "negative prompt has no effect" in caplog.text


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "compiled"])
def test_engines_take_the_embedding(lcm, eager, tmp_path_factory, backend):
    """The embedding is a UNet input of the spec: ONNX Runtime, OpenVINO and compiled
    (AOTInductor) engines serve it (2e-3)."""
    if backend == "compiled":
        from fastsd.export.compiled import build_compiled

        store = tmp_path_factory.mktemp("lcm-compiled")  # the checkpoint's size, static
        build_compiled(str(lcm), engine_dir=store, networks=("unet",))
    else:
        store = _onnx_store(lcm, tmp_path_factory, backend)
    pipe = Pipeline.from_pretrained(str(lcm), device="cpu", backend=backend, engine_dir=str(store))
    out = pipe("a fox", scheduler="lcm", seed=2, **KW)
    assert out.backends["unet"] == backend
    assert np.abs(out.images - eager("a fox", scheduler="lcm", seed=2, **KW).images).max() <= 2e-3


def _onnx_store(lcm, tmp_path_factory, backend: str):
    """The LCM UNet's ONNX Runtime entry (exported once per worker), or an OpenVINO entry built from it."""
    pytest.importorskip("onnxruntime")
    if backend == "openvino":
        pytest.importorskip("openvino")
    from fastsd.export import export_checkpoint

    store = tmp_path_factory.getbasetemp() / "lcm-engines"
    if not store.exists():
        export_checkpoint(str(lcm), engine_dir=store, networks=("unet",))
    if backend == "openvino":
        from fastsd.export.openvino import build_openvino

        store = copy_entries(store, tmp_path_factory.mktemp("lcm-openvino"), "onnxruntime-fp32")
        build_openvino(str(lcm), engine_dir=store, networks=("unet",))
    return store
