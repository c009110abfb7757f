"""Drop-in for diffusers users: the port script of the README, and each diffusers argument
fastsd takes (or refuses by name)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd import MemoryOptions, Pipeline
from fastsd.errors import CheckpointError, FastSDError, ImageError, InvalidArgumentError

TOL = 1e-3
ROOT = Path(__file__).resolve().parents[1]
FAST = dict(num_inference_steps=3, output_type="np")


@pytest.mark.slow
def test_port_script_gives_diffusers_images(ckpts, tmp_path, monkeypatch, capsys):
    """examples/diffusers_port.py as the README runs it (its own __main__, fastsd side, from
    another folder), unchanged but for the classes passed in: every output (each library's
    defaults, scheduler swap, generator lists, latents, embeddings, step callbacks, guidance
    rescale, custom sigmas, numpy and tensor images, VAE slicing and tiling, "pt" output,
    tuples) equals diffusers' within 1e-3. (In this process: a second interpreter would run
    the fastsd side twice; the script imports only numpy, torch, PIL and fastsd.)"""
    import runpy

    import diffusers

    script = ROOT / "examples" / "diffusers_port.py"
    model = str(ckpts["eps"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), model])
    script_globals = runpy.run_path(str(script), run_name="__main__")
    ours = script_globals["results"]
    assert "inpaint_strength: shape (1, 40, 48, 3)" in capsys.readouterr().out
    theirs = script_globals["port"](diffusers.StableDiffusionPipeline, diffusers.StableDiffusionImg2ImgPipeline,
                                    diffusers.StableDiffusionInpaintPipeline, model)
    assert ours.keys() == theirs.keys()
    worst = {}
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, name
        worst[name] = float(np.abs(ours[name] - theirs[name]).max())
    print("port script, max abs difference per output:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= TOL, worst


# ---- loading --------------------------------------------------------------------------


def test_loading_arguments(ckpts):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), torch_dtype=torch.float32, safety_checker=None,
                                    requires_safety_checker=False, use_safetensors=True)
    assert pipe.dtype == torch.float32
    assert Pipeline.from_pretrained(str(ckpts["eps"]), dtype=torch.float32).dtype == torch.float32
    with pytest.raises(InvalidArgumentError, match="'unet'"):
        Pipeline.from_pretrained(str(ckpts["eps"]), unet=object())
    with pytest.raises(InvalidArgumentError, match="safety checker"):
        Pipeline.from_pretrained(str(ckpts["eps"]), safety_checker=object())
    with pytest.raises(InvalidArgumentError, match="disagree"):
        Pipeline.from_pretrained(str(ckpts["eps"]), dtype="fp32", torch_dtype=torch.float16)
    with pytest.raises(InvalidArgumentError, match="torch_dtype"):
        Pipeline.from_pretrained(str(ckpts["eps"]), torch_dtype=torch.int8)


@pytest.fixture(scope="module")
def fp16_only(ckpts, tmp_path_factory):
    """The tiny checkpoint saved as an fp16 variant only (what variant="fp16" downloads)."""
    import diffusers

    root = tmp_path_factory.mktemp("variant") / "fp16-only"
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(ckpts["eps"]), safety_checker=None,
                                                            requires_safety_checker=False, dtype=torch.float16)
    ref.save_pretrained(root, variant="fp16", safe_serialization=True)
    for leftover in ("safety_checker", "feature_extractor"):
        shutil.rmtree(root / leftover, ignore_errors=True)
    assert (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (root / "unet" / "diffusion_pytorch_model.safetensors").exists()
    return root


def test_variant_folders(fp16_only, tmp_path):
    """variant="fp16" loads the fp16 files (same images as diffusers with that variant); an
    fp16-only folder also loads without it; a missing variant names its own folder."""
    import diffusers

    kw = dict(prompt="a fox", num_inference_steps=4, height=16, width=16, output_type="np")
    ours = Pipeline.from_pretrained(str(fp16_only), variant="fp16", torch_dtype=torch.float32)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(fp16_only), variant="fp16", dtype=torch.float32,
                                                               safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    a = ours(generator=torch.Generator().manual_seed(0), **kw).images
    b = theirs(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(a - b).max() <= TOL
    plain = Pipeline.from_pretrained(str(fp16_only))  # no variant asked: the only one there
    assert np.array_equal(plain(generator=torch.Generator().manual_seed(0), **kw).images, a)
    with pytest.raises(CheckpointError, match=r"fp16-only/unet has no 'ema' variant weights \(variants there: fp16\)"):
        Pipeline.from_pretrained(str(fp16_only), variant="ema")
    mixed = shutil.copytree(fp16_only, tmp_path / "two-variants")
    for f in (mixed / "unet").glob("*.fp16.safetensors"):
        shutil.copy(f, f.with_name(f.name.replace(".fp16.", ".ema.")))
    with pytest.raises(CheckpointError, match=r"two-variants/unet holds only variant weights \(ema, fp16\)"):
        Pipeline.from_pretrained(str(mixed))


def test_to_and_memory_toggles(ckpts):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]))
    assert pipe.to("cpu") is pipe and pipe.to(torch.float32) is pipe
    kw = dict(prompt=["a", "b"], num_inference_steps=2, output_type="np", seed=3)
    plain = pipe(**kw).images
    pipe.enable_attention_slicing()
    pipe.enable_vae_slicing()
    assert pipe.memory.attention_slicing and pipe.memory.vae_slicing
    assert np.abs(pipe(**kw).images - plain).max() < 1e-4
    pipe.disable_attention_slicing()
    pipe.disable_vae_slicing()
    pipe.enable_vae_tiling()
    assert pipe.memory.vae_tiling
    pipe.disable_vae_tiling()
    assert not (pipe.memory.attention_slicing or pipe.memory.vae_slicing or pipe.memory.vae_tiling)
    with pytest.raises(FastSDError):
        pipe.to("cuda:7" if torch.cuda.is_available() else "cuda")  # no such device here
    with pytest.raises(InvalidArgumentError, match="device and/or a dtype"):
        pipe.to(3)
    half = Pipeline.from_pretrained(str(ckpts["eps"])).to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.backend.dtype == torch.bfloat16


def test_progress_bar(pipes, capsys):
    pipe = Pipeline.from_pretrained(str(pipes("eps").ckpt.info.source))
    capsys.readouterr()  # what loading printed
    pipe("a", **FAST)
    assert "it/s" not in capsys.readouterr().err  # no bar unless asked for
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    pipe("a", **FAST)
    assert "denoising" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)


# ---- per call -------------------------------------------------------------------------


def test_unknown_arguments_are_named(pipes):
    pipe = pipes("eps")
    with pytest.raises(InvalidArgumentError, match="'cross_attention_kwargs'"):
        pipe("a", cross_attention_kwargs={"scale": 0.5}, **FAST)
    with pytest.raises(InvalidArgumentError, match="ip_adapter_image needs an IP-Adapter"):
        pipe("a", ip_adapter_image=Image.new("RGB", (8, 8)), **FAST)
    with pytest.raises(InvalidArgumentError, match="only 'latents'"):
        pipe("a", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"], **FAST)


def test_diffusers_methods_fastsd_lacks_are_named(pipes):
    from fastsd.errors import UnsupportedError

    pipe = pipes("eps")
    with pytest.raises(UnsupportedError, match="enable_model_cpu_offload"):
        pipe.enable_model_cpu_offload()
    assert not hasattr(pipe, "load_lora_weights") and not hasattr(pipe, "no_such_thing")
    with pytest.raises(AttributeError, match="no_such_thing"):
        pipe.no_such_thing  # noqa: B018


def test_generator_list(pipes):
    pipe = pipes("eps")
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 5)]  # noqa: E731
    both = pipe(["a", "a"], generator=gens(), **FAST).images
    one = pipe("a", generator=torch.Generator().manual_seed(5), **FAST).images
    assert np.abs(both[1] - one[0]).max() < 1e-5  # image i comes from generator i alone
    with pytest.raises(InvalidArgumentError, match="3 generators for 2 images"):
        pipe(["a", "b"], generator=gens() + [torch.Generator()], **FAST)
    with pytest.raises(InvalidArgumentError, match="generator"):
        pipe("a", generator=[torch.Generator(), "seed"], **FAST)


def test_embeddings_and_latents_checked(pipes):
    pipe = pipes("eps")
    d = pipe.info.cross_attention_dim
    with pytest.raises(InvalidArgumentError, match="prompt and prompt_embeds: pass one, not both"):
        pipe("a", prompt_embeds=torch.zeros(1, 77, d), **FAST)
    with pytest.raises(InvalidArgumentError, match="features"):
        pipe(prompt_embeds=torch.zeros(1, 77, d + 1), **FAST)
    with pytest.raises(InvalidArgumentError, match="same shape"):
        pipe(prompt_embeds=torch.zeros(1, 77, d), negative_prompt_embeds=torch.zeros(2, 77, d), **FAST)
    with pytest.raises(InvalidArgumentError, match=r"latents must be a tensor of shape \(1, 4, 16, 16\)"):
        pipe("a", latents=torch.zeros(1, 4, 8, 8), **FAST)
    with pytest.raises(InvalidArgumentError, match="img2img"):
        pipe("a", image=Image.new("RGB", (32, 32)), latents=torch.zeros(1, 4, 16, 16), **FAST)


def test_callbacks(pipes):
    pipe = pipes("eps")
    legacy, late = [], []
    pipe("a", num_inference_steps=6, scheduler="ddim", callback=lambda i, t, x: legacy.append(i), callback_steps=2,
         callback_on_step_end=lambda p, i, t, kw: late.append((p is pipe, i, float(t))) or {}, output_type="np")
    assert legacy == [0, 2, 4]
    assert [i for _, i, _ in late] == list(range(6)) and all(same for same, _, _ in late)
    zeroed = pipe("a", num_inference_steps=3, scheduler="ddim", output_type="latent", seed=1,
                  callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])})
    assert float(zeroed.images.abs().max()) == 0.0  # the returned latents replace the loop's
    with pytest.raises(InvalidArgumentError, match="callback_steps"):
        pipe("a", callback=lambda *a: None, callback_steps=0, **FAST)


def test_outputs(pipes):
    pipe = pipes("eps")
    out = pipe("a", num_inference_steps=2, output_type="pt", seed=2)
    assert isinstance(out.images, torch.Tensor) and out.images.shape == (1, 3, 32, 32)
    assert float(out.images.min()) >= 0 and float(out.images.max()) <= 1
    as_np = pipe("a", num_inference_steps=2, output_type="np", seed=2).images
    assert np.array_equal(out.images.permute(0, 2, 3, 1).numpy(), as_np)
    images, nsfw = pipe("a", num_inference_steps=2, seed=2, return_dict=False)
    assert nsfw is None and isinstance(images[0], Image.Image)
    assert pipe("a", num_inference_steps=2, seed=2)[0][0].size == (32, 32)  # out[0], as diffusers outputs


def test_guidance_rescale_changes_only_with_cfg(pipes):
    pipe = pipes("eps")
    kw = dict(num_inference_steps=3, output_type="np", seed=4)
    plain, rescaled = pipe("a", **kw).images, pipe("a", guidance_rescale=0.7, **kw).images
    assert np.abs(plain - rescaled).max() > 1e-4
    assert np.array_equal(pipe("a", guidance_scale=1.0, **kw).images,
                          pipe("a", guidance_scale=1.0, guidance_rescale=0.7, **kw).images)
    with pytest.raises(InvalidArgumentError, match="guidance_rescale"):
        pipe("a", guidance_rescale=1.5, **kw)


def test_custom_timesteps(ckpts):
    """timesteps= / sigmas= as diffusers' retrieve_timesteps: Euler takes them, and a
    scheduler whose set_timesteps does not is refused."""
    import diffusers

    pipe = Pipeline.from_pretrained(str(ckpts["eps"]))
    pipe.scheduler = "euler"
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(ckpts["eps"]), safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    kw = dict(prompt="a", height=16, width=16, output_type="np")
    ts = [999, 700, 420, 100, 7]
    ours = pipe(timesteps=ts, generator=torch.Generator().manual_seed(1), **kw).images
    theirs = ref(timesteps=ts, generator=torch.Generator().manual_seed(1), **kw).images
    assert np.abs(ours - theirs).max() <= TOL
    with pytest.raises(InvalidArgumentError, match="timesteps is not taken by the 'ddim' sampler"):
        pipe(timesteps=ts, scheduler="ddim", **kw)
    with pytest.raises(InvalidArgumentError, match="timesteps and sigmas: pass one, not both"):
        pipe(timesteps=ts, sigmas=[3.0, 0.0], **kw)


def test_per_call_clip_skip(ckpts, pipes, tmp_path):
    """clip_skip per call equals clip_skip at load, with eager text encoding; an engine built
    with another clip_skip refuses it with a clear error."""
    kw = dict(num_inference_steps=3, output_type="np", seed=5)
    at_load = Pipeline.from_pretrained(str(ckpts["eps"]), clip_skip=1)("a fox", **kw).images
    per_call = pipes("eps")("a fox", clip_skip=1, **kw)
    assert np.array_equal(per_call.images, at_load) and per_call.backends["text_encoder"] == "eager"
    with pytest.raises(InvalidArgumentError, match="clip_skip must be an integer"):
        pipes("eps")("a", clip_skip=99, **kw)
    pytest.importorskip("onnxruntime")
    from fastsd.export import export_checkpoint

    export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path, networks=("text_encoder",))
    engine = Pipeline.from_pretrained(str(ckpts["eps"]), engine_dir=str(tmp_path))
    assert engine.backend.backends["text_encoder"] == "onnxruntime"
    with pytest.raises(InvalidArgumentError, match="built with clip_skip=0"):
        engine("a fox", clip_skip=1, **kw)
    assert engine("a fox", clip_skip=0, **kw).backends["text_encoder"] == "onnxruntime"


def test_image_inputs_agree(pipes, init_image, mask_image):
    """PIL, numpy (float and uint8) and tensors ([0, 1] and [-1, 1]) give the same img2img
    image; a batch of images and masks follows the prompts."""
    pipe = pipes("eps")
    kw = dict(num_inference_steps=4, strength=0.7, output_type="np", seed=6)
    from_pil = pipe("a", image=init_image, **kw).images
    array = np.asarray(init_image, dtype=np.uint8)
    tensor = torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)
    for image in (array, array.astype(np.float32) / 255, tensor, tensor * 2 - 1, [tensor], tensor[None]):
        assert np.abs(pipe("a", image=image, **kw).images - from_pil).max() < 1e-5
    kw.pop("seed")
    flipped = init_image.transpose(Image.FLIP_LEFT_RIGHT)
    two = pipe(["a", "a"], image=[init_image, flipped], **kw,
               generator=[torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)]).images
    assert np.abs(two[0] - from_pil[0]).max() < 1e-5  # image i, generator i: as that image alone
    alone = pipe("a", image=flipped, generator=torch.Generator().manual_seed(6), **kw).images
    assert np.abs(two[1] - alone[0]).max() < 1e-5 and np.abs(two[1] - two[0]).max() > 1e-3
    mask_np = (np.asarray(mask_image.convert("L")) > 127).astype(np.float32)
    a = pipe("a", image=init_image, mask_image=mask_image, height=40, width=48, seed=8, **kw).images
    b = pipe("a", image=init_image, mask_image=mask_np, height=40, width=48, seed=8, **kw).images
    assert np.abs(a - b).max() < 1e-5
    with pytest.raises(InvalidArgumentError, match="image holds 3 images, which cannot be spread over 2"):
        pipe(["a", "b"], image=[init_image] * 3, **kw)
    with pytest.raises(InvalidArgumentError, match="mask_image holds 2 masks, which cannot be spread over 3"):
        pipe(["a", "b", "c"], image=init_image, mask_image=[mask_np, mask_np], **kw)
    with pytest.raises(ImageError, match="do not form one batch"):
        pipe("a", image=[array, array[:8]], **kw)


def test_memory_tiles_default_to_the_vae_geometry(ckpts):
    with pytest.raises(InvalidArgumentError, match="tile must be a positive integer"):
        Pipeline.from_pretrained(str(ckpts["eps"]), memory=MemoryOptions(tile=0))
