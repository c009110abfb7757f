"""A diffusers script ported to fastsd: only the import and the class names change.

`port()` below is ordinary diffusers code (txt2img, img2img and inpaint, each library's
defaults included, and the everyday options: dtype and variant at load, scheduler swap,
progress bar, attention and VAE slicing, generator lists, latents, prompt embeddings,
step callbacks, guidance rescale, custom sigmas, clip skip, "pt" output, tuples). With
diffusers it runs as

    from diffusers import StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    port(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, model)

and with fastsd, one `Pipeline` does all three:

    from fastsd import Pipeline
    port(Pipeline, Pipeline, Pipeline, model)

Both give the same images (tests/test_diffusers_api.py checks within 1e-3 on a tiny
random-weight model). Run it offline:

    python examples/diffusers_port.py synthetic:tiny            # fastsd
    python examples/diffusers_port.py synthetic:tiny --diffusers  # the same script on diffusers
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image


def port(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,  # noqa: N803
         model: str, device: str = "cpu") -> dict:
    """Every output of the script, by name (numpy arrays)."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    out = {}
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    # txt2img, the library's defaults: the checkpoint's scheduler, 50 steps, guidance 7.5, its size
    out["defaults"] = pipe("a lighthouse at dusk", generator=torch.Generator().manual_seed(0),
                           output_type="np").images

    pipe.enable_attention_slicing()
    pipe.vae.enable_slicing()  # older diffusers: pipe.enable_vae_slicing(), which fastsd also takes
    # a generator per image, negative prompts, a batch
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]
    out["batch"] = pipe(["a red fox", "a boat"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2,
                        num_inference_steps=8, guidance_scale=6.0, generator=gens, output_type="np").images

    # the scheduler swap every diffusers tutorial shows, then a step callback that edits the latents
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    seen = []

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        seen.append(step)
        return {"latents": callback_kwargs["latents"] * 0.999}

    out["euler_a_callback"] = pipe("a castle", num_inference_steps=6, generator=torch.Generator().manual_seed(5),
                                   callback_on_step_end=on_step_end, output_type="np").images
    out["callback_steps"] = np.array(seen, dtype=np.float32)

    # own initial latents and own text embeddings, guidance rescale, tuple output, tensors out
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # pixels per latent pixel
    latents = torch.randn((1, pipe.unet.config.in_channels, 32 // f, 48 // f),
                          generator=torch.Generator().manual_seed(6))
    embeds = torch.randn((1, 77, pipe.unet.config.cross_attention_dim), generator=torch.Generator().manual_seed(7))
    images, _ = pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds * 0.5, latents=latents, height=32,
                     generator=torch.Generator().manual_seed(15),
                     width=48, num_inference_steps=5, guidance_rescale=0.7, output_type="pt", return_dict=False)
    out["embeds_latents"] = images.cpu().numpy()

    # Euler with custom sigmas (a per-call clip_skip= works in fastsd too; diffusers 0.42 with
    # transformers 5 fails on it, so it is left out of this side-by-side script)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    out["sigmas"] = pipe("a bridge", sigmas=[14.6, 8.0, 3.5, 1.2, 0.3, 0.0], output_type="np",
                         generator=torch.Generator().manual_seed(8)).images

    # img2img with its defaults (strength 0.8, the image's size), from PIL, numpy and a tensor
    init = Image.fromarray((np.indices((40, 48)).sum(0) % 256).astype(np.uint8)).convert("RGB")
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(model, safety_checker=None).to(device)
    img2img.set_progress_bar_config(disable=True)
    out["img2img"] = img2img("an oil painting", image=init, generator=torch.Generator().manual_seed(10),
                             output_type="np").images
    array = np.asarray(init, dtype=np.float32) / 255.0
    out["img2img_numpy"] = img2img("an oil painting", image=array, num_inference_steps=10, output_type="np",
                                   generator=torch.Generator().manual_seed(11)).images
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
    out["img2img_tensor"] = img2img("an oil painting", image=tensor, strength=0.6, num_inference_steps=10,
                                    output_type="np", generator=torch.Generator().manual_seed(12)).images

    # inpaint with its defaults (strength 1.0, the checkpoint's size), then strength 0.7 with tiling
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (12, 8, 36, 30))
    inpaint = StableDiffusionInpaintPipeline.from_pretrained(model, safety_checker=None).to(device)
    inpaint.set_progress_bar_config(disable=True)
    out["inpaint"] = inpaint("a stone wall", image=init, mask_image=mask,
                             generator=torch.Generator().manual_seed(13), output_type="np").images
    inpaint.vae.enable_tiling()
    out["inpaint_strength"] = inpaint("a stone wall", image=init, mask_image=mask, strength=0.7, height=40,
                                      width=48, num_inference_steps=10, output_type="np",
                                      generator=torch.Generator().manual_seed(14)).images
    return out


if __name__ == "__main__":
    model = sys.argv[1] if len(sys.argv) > 1 else "synthetic:tiny"
    if "--diffusers" in sys.argv:
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

        from fastsd.checkpoint import resolve  # diffusers needs a folder; synthetic:NAME resolves to one

        results = port(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       str(resolve(model)))
    else:
        from fastsd import Pipeline

        results = port(Pipeline, Pipeline, Pipeline, model)
    for name, value in results.items():
        print(f"{name}: shape {tuple(value.shape)}, mean {float(value.mean()):.6f}")
