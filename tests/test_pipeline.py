"""Pipeline behaviour beyond parity: argument errors, fallbacks, outputs, callbacks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd import Pipeline
from fastsd.errors import ImageError, InvalidArgumentError

FAST = dict(num_inference_steps=2, output_type="np")


@pytest.fixture
def pipe(pipes):
    return pipes("eps")


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=33), "height must be a positive multiple of 2"),
    (dict(width=0), "width must be a positive multiple"),
    (dict(height=-8), "height must be a positive multiple"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale must be in"),
    (dict(scheduler="plms"), "scheduler must be one of fastsd's samplers .*got 'plms'"),
    (dict(output_type="tensor"), "output_type must be one of pil, np, pt, latent, got 'tensor'"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(strength=0.5), "strength applies to img2img/inpaint only"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 texts for 1 prompts"),
    (dict(eta=-0.1), "eta must be in"),
])
def test_argument_errors(pipe, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        pipe("a cat", **{**FAST, **kwargs})
    with pytest.raises(InvalidArgumentError, match=match):  # check_call: the same checks, nothing run
        pipe.check_call("a cat", **{**FAST, **kwargs})


def test_check_call_runs_nothing(pipe, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("check_call ran the pipeline")

    monkeypatch.setattr(pipe, "_generate", no_work)
    req = pipe.check_call("a cat", negative_prompt="fog", num_inference_steps=3, seed=5)
    assert req.settings()["num_inference_steps"] == 3 and req.settings()["negative_prompt"] == "fog"
    assert pipe.check_call(["a", "b"], num_images_per_prompt=2, generator=torch.Generator()).batch == 4
    with pytest.raises(InvalidArgumentError, match="seed must be an integer"):
        pipe.check_call("a cat", seed=-1)
    with pytest.raises(InvalidArgumentError, match="does not support the argument 'frobnicate'"):
        pipe.check_call("a cat", frobnicate=1)


@pytest.mark.parametrize("strength,match", [
    (1.5, r"strength must be in \[0, 1\], got 1.5"),
    (-0.1, "strength must be in"),
    (0.0, "denoises nothing"),
    (0.1, "denoises nothing"),  # int(2 * 0.1) = 0 steps
])
def test_strength_errors(pipe, init_image, strength, match):
    with pytest.raises(InvalidArgumentError, match=match):
        pipe("a cat", image=init_image, strength=strength, **FAST)


def test_prompt_errors(pipe):
    for bad in (None, [], 3, ["ok", 4]):
        with pytest.raises(InvalidArgumentError, match="prompt must be"):
            pipe(bad, **FAST)


def test_mask_without_image(pipe, mask_image):
    with pytest.raises(InvalidArgumentError, match="mask_image needs an image"):
        pipe("a cat", mask_image=mask_image, **FAST)


def test_unreadable_image(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ImageError, match="cannot read image"):
        pipe("a cat", image=str(bad), **FAST)
    with pytest.raises(ImageError, match="not found"):
        pipe("a cat", image=str(tmp_path / "missing.png"), **FAST)
    with pytest.raises(ImageError, match="must be a PIL image, a path, a numpy array"):
        pipe("a cat", image={"pixels": 1}, **FAST)
    with pytest.raises(ImageError, match="not an image"):
        pipe("a cat", image=np.zeros((2, 2, 2, 2, 3)), **FAST)
    with pytest.raises(ImageError, match="NaN"):
        pipe("a cat", image=np.full((8, 8, 3), np.nan), **FAST)


def test_mask_of_other_size_is_resized(pipe, init_image, caplog):
    small = Image.new("L", (12, 10), 255)
    with caplog.at_level(logging.WARNING):
        out = pipe("a cat", image=init_image, mask_image=small, **FAST)
    assert out.images.shape == (1, 32, 32, 3)  # inpaint: the checkpoint's size by default, as diffusers
    assert "differs from the image" in caplog.text
    assert pipe("a cat", image=init_image, **FAST).images.shape == (1, 40, 48, 3)  # img2img: the image's


def test_image_size_floored_to_vae_factor(pipe):
    out = pipe("a cat", image=Image.new("RGB", (35, 21), "gray"), **FAST)
    assert out.images.shape == (1, 20, 34, 3)


def test_fp16_overflow_decodes_in_fp32(pipe, monkeypatch, caplog):
    good = pipe("a cat", seed=3, **FAST).images
    monkeypatch.setattr(pipe.backend, "vae_decoder", lambda latent, ran=None: torch.full(
        (latent.shape[0], 3, 32, 32), float("nan")))
    with caplog.at_level(logging.WARNING):
        out = pipe("a cat", seed=3, **FAST)
    assert np.isfinite(out.images).all() and out.backends["vae_decoder"] == "eager-fp32"
    assert np.abs(out.images - good).max() < 1e-5
    assert "decoding again in fp32" in caplog.text


def test_long_prompt_truncated_with_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        pipe("word " * 40, **FAST)  # char-level tokenizer: ~200 tokens
    assert "truncated" in caplog.text


def test_cfg_batch_sizes(pipe, monkeypatch):
    seen = []
    unet = pipe.backend.unet
    monkeypatch.setattr(pipe.backend, "unet", lambda **kw: seen.append(kw["sample"].shape[0]) or unet(**kw))
    pipe(["a", "b"], guidance_scale=7.5, scheduler="ddim", **FAST)
    assert seen == [4, 4]  # one batch of 2 x 2 prompts per step
    seen.clear()
    pipe(["a", "b"], guidance_scale=1.0, scheduler="ddim", **FAST)
    assert seen == [2, 2]  # no CFG: a single batch


def test_callback_timings_backends(pipe):
    calls = []
    out = pipe("a cat", num_inference_steps=3, callback=lambda i, t, x: calls.append((i, t, tuple(x.shape))))
    assert [c[0] for c in calls] == [0, 1, 2, 3]  # PLMS, the checkpoint's scheduler: n + 1 UNet calls
    assert calls[0][1] > calls[-1][1]
    assert calls[0][2] == (1, 4, 16, 16)
    assert set(out.timings) >= {"text_encoder", "unet", "unet_per_step", "vae", "total"}
    assert out.timings["total"] >= out.timings["unet"] > 0
    assert out.backends == {"text_encoder": "eager", "unet": "eager", "vae_decoder": "eager"}  # what ran
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (32, 32)


def test_seed_equals_generator(pipe):
    a = pipe("a cat", seed=11, **FAST).images
    b = pipe("a cat", generator=torch.Generator().manual_seed(11), **FAST).images
    assert np.array_equal(a, b)


def test_latent_output(pipe):
    out = pipe("a cat", num_inference_steps=2, output_type="latent", height=24, width=16)
    assert out.images.shape == (1, 4, 12, 8)


def test_nine_channel_txt2img_and_img2img(pipes, init_image):
    """An inpainting UNet without a mask repaints everything (mask all white)."""
    assert pipes("inpaint9")("a cat", **FAST).images.shape == (1, 32, 32, 3)
    assert pipes("inpaint9")("a cat", image=init_image, **FAST).images.shape == (1, 40, 48, 3)


def test_engine_backend_falls_back_to_eager(ckpts, caplog, tmp_path):
    """An engine kind asked for by name that serves no network is an error (a script asking
    for onnxruntime never measures eager unawares); with fallback=True it runs eager PyTorch,
    with a warning; "auto" falls back by itself."""
    from fastsd.errors import EngineUnavailableError

    with pytest.raises(EngineUnavailableError, match="backend='onnxruntime' serves no network of this checkpoint: "
                       "no usable engine .* fallback=True"):
        Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", device="cpu", engine_dir=str(tmp_path))
    with pytest.raises(EngineUnavailableError, match="TensorRT engines need"):
        Pipeline.from_pretrained(str(ckpts["eps"]), backend="tensorrt", device="cpu", engine_dir=str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="fallback must be True, False or None"):
        Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(tmp_path), fallback="yes")
    assert set(Pipeline.from_pretrained(str(ckpts["eps"]), backend="auto", engine_dir=str(tmp_path)).backend
               .backends.values()) == {"eager"}
    with caplog.at_level(logging.WARNING):
        pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", device="cpu",
                                        engine_dir=str(tmp_path), fallback=True)
    assert "falling back to eager" in caplog.text
    assert set(pipe("a", **FAST).backends.values()) == {"eager"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="vulkan"), "backend must be one of auto, "),
    (dict(dtype="fp8"), "dtype must be one of fp16, bf16, fp32, int8"),
    (dict(prediction_type="sample"), "prediction_type must be one of epsilon, v_prediction, got 'sample'"),
    (dict(clip_skip=2), r"clip_skip must be an integer in \[0, 1\]"),
    (dict(clip_skip=-1), "clip_skip"),
])
def test_load_argument_errors(ckpts, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Pipeline.from_pretrained(str(ckpts["eps"]), device="cpu", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_unavailable(ckpts):
    with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
        Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda")


def test_cuda_graphs_need_cuda(ckpts):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    with pytest.raises(InvalidArgumentError, match="cuda_graphs needs a CUDA device"):
        Pipeline.from_pretrained(str(ckpts["eps"]), device="cpu", cuda_graphs=True)


@pytest.mark.gpu
def test_cuda_graphs_match_eager(ckpts):
    kw = dict(num_inference_steps=4, output_type="np", seed=0)
    plain = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda")("a cat", **kw).images
    graphed = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda", cuda_graphs=True)
    first, again = graphed("a cat", **kw).images, graphed("a cat", **kw).images
    assert np.abs(first - plain).max() < 1e-2 and np.array_equal(first, again)


@pytest.mark.gpu
def test_cuda_fp16_matches_fp32_and_diffusers(ckpts):
    """fp16 on CUDA against fp32 on the CPU from the same initial noise (given as latents: a
    generator draws another stream in fp16 than in fp32 for some sizes and torch versions, as
    diffusers' does, so seeded fp16 and fp32 images are different images), and against
    diffusers fp16 on CUDA from the same seed (the same draw)."""
    import diffusers

    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), device="cuda")
    side = pipe.info.default_size // pipe.info.vae_factor
    noise = torch.randn(1, pipe.info.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=4, output_type="np", scheduler="ddim")
    out = pipe("a cat", latents=noise.half(), **kw)
    ref = Pipeline.from_pretrained(str(ckpts["eps"]), device="cpu")("a cat", latents=noise, **kw)
    assert np.isfinite(out.images).all()
    assert np.abs(out.images - ref.images).max() < 0.05  # fp16 vs fp32, same noise
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(ckpts["eps"]), torch_dtype=torch.float16,
                                                              safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    theirs = theirs.to("cuda")
    theirs.set_progress_bar_config(disable=True)
    want = theirs("a cat", num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    got = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(got - want).max() < 0.05  # fp16 both, the same draw


def test_unseeded_calls_draw_their_seed_from_the_os(pipe):
    """No seed and no generator: the seed comes from the OS (torch's global generator is
    neither read nor re-seeded), differs per call, and reproduces the image."""
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    kw = dict(num_inference_steps=2, output_type="np")
    a, b = pipe("a cat", **kw), pipe("a cat", **kw)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(a.seed, int) and a.seed != b.seed
    assert np.array_equal(pipe("a cat", seed=a.seed, **kw).images, a.images)
    assert pipe("a cat", seed=5, **kw).seed == 5
    assert pipe("a cat", generator=torch.Generator().manual_seed(5), **kw).seed is None


def test_call_signature_is_the_table():
    """Pipeline.__call__ keeps diffusers' explicit signature, and it is the table's, name for
    name and default for default (fastsd/arguments.py)."""
    import inspect

    from fastsd.arguments import ARGS

    params = inspect.signature(Pipeline.__call__).parameters
    names = [n for n, p in params.items() if n != "self" and p.kind != p.VAR_KEYWORD]
    assert names == [a.name for a in ARGS]
    assert {n: params[n].default for n in names} == {a.name: a.api_default for a in ARGS}


def test_progress_counts_sampler_steps(pipe, init_image, capsys):
    """The progress bar counts the sampler's steps, as diffusers' does: PNDM's 6 UNet calls
    for 5 steps show 5/5, Heun's 9 calls 5/5, img2img at strength 0.5 of 10 steps 5/5."""
    for kwargs, calls, steps in ((dict(scheduler="pndm"), 6, 5), (dict(scheduler="heun"), 9, 5),
                                 (dict(scheduler="euler"), 5, 5),
                                 (dict(scheduler="pndm", image=init_image, strength=0.5,
                                       num_inference_steps=10), 6, 5)):
        req = pipe.check_call("a", **{"num_inference_steps": 5, **kwargs})
        assert (req.loop_steps, req.sampler_steps) == (calls, steps), kwargs
        done = [req.steps_done(c) for c in range(calls + 1)]
        assert done[0] == 0 and done[-1] == steps and done == sorted(done), kwargs
    pipe.set_progress_bar_config(disable=False)
    try:
        pipe("a", num_inference_steps=5, scheduler="pndm", output_type="np")
    finally:
        pipe.set_progress_bar_config(disable=True)
    err = capsys.readouterr().err
    assert "5/5" in err and "/6" not in err and "6/" not in err, err
