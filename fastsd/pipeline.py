"""fastsd.Pipeline: txt2img, img2img and inpaint over any backend.

A call runs request -> encode -> denoise -> decode: its arguments are checked into a
Request (fastsd/settings.py, from the table in fastsd/arguments.py), the model family
encodes the prompts, the loop (fastsd/loop.py) denoises, the VAE decodes. The stages around
the loop (random draws, initial latents, decode) are in fastsd/stages.py; loading in
fastsd/loading.py; the diffusers-compatible surface in fastsd/surface.py; LoRA methods in
fastsd/lora.py; callbacks and previews in fastsd/previews.py. Random draws happen in the
same order and shapes as diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline, so the same
generator gives the same image.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch

from . import arguments
from . import images as imgs
from .backends import Backend, on_work_stream
from .budget import check_fits, widths_of
from .checkpoint import check_clip_skip
from .embeddings import EmbeddingMethods
from .engines import precision_of
from .errors import InvalidArgumentError, NumericalError
from .families import family_for
from .hires import HiresMethods
from .image_prompts import ImagePromptMethods
from .loading import MemoryOptions, from_pretrained
from .locks import SharedLock
from .loop import StepGraphs, StepInputs, StepKey, initial_state, make_step, run_steps, step_rows
from .lora import LoraMethods, LoraWeights
from .model_files import Checkpoint
from .networks import RESIDUAL_PREFIXES
from .previews import Previews
from .schedulers import SAMPLERS, choose_scheduler, default_scheduler, pipeline_scheduler_config
from .settings import MAX_SIDE, Request, check_max_side, check_seed, draw_seed, make_request
from .stages import Call, Latents, Stages
from .surface import DiffusersSurface

log = logging.getLogger(__name__)
__all__ = ["MemoryOptions", "Pipeline", "PipelineOutput"]


@dataclass
class PipelineOutput:
    images: Any  # list[PIL.Image] ("pil"), np.ndarray NHWC float32 ("np"), latents tensor ("latent")
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    backends: dict[str, str] = field(default_factory=dict)  # network -> backend that ran it in this call
    seed: int | None = None  # the seed used; None when the caller passed a generator
    settings: dict[str, Any] = field(default_factory=dict)  # the call's settings, defaults resolved (API names)

    def __getitem__(self, key):
        """out[0] / out["images"]: the images, as diffusers' pipeline outputs index."""
        if key in (0, "images"):
            return self.images
        raise KeyError(key)


@dataclass
class _Loop:
    """What the denoising loop runs on, all of it on the device before the loop starts."""

    key: StepKey
    inputs: StepInputs
    state: tuple  # the latents, the sampler's history (and with previews a slot for x0)
    rows: torch.Tensor  # (steps, K) float32: one row of per-step numbers per step
    noises: torch.Tensor | None  # (steps, B, C, h, w): each step's fresh noise, for samplers that take it
    host_t: tuple[float, ...]  # the timesteps on the host, for callbacks
    control: tuple[bool, ...] | None  # per step: whether the ControlNets run (None without ControlNets)


class Pipeline(DiffusersSurface, LoraMethods, ImagePromptMethods, EmbeddingMethods, HiresMethods, Previews,
               Stages):
    """A Stable Diffusion pipeline (SD 1.x/2.x, SD-XL, inpainting UNets, ControlNets) over
    whichever engines exist, with eager PyTorch for the rest. Load one with from_pretrained;
    call it as a diffusers pipeline (txt2img; img2img with image=; inpainting with image= and
    mask_image=). One object may be called from several threads at once: a call's state is
    its own, and LoRA changes wait for the calls running."""

    def __init__(self, ckpt: Checkpoint, backend: Backend, device: torch.device, dtype: torch.dtype,
                 memory: MemoryOptions | None = None, cuda_graphs: bool = False, family=None):
        if cuda_graphs and device.type != "cuda":
            raise InvalidArgumentError("cuda_graphs needs a CUDA device")
        self.ckpt, self.info = ckpt, ckpt.info
        self.family = family or family_for(ckpt)  # the one the backend was made for, when given
        self._graphs = StepGraphs() if cuda_graphs else None  # whole-step graphs, one per shape and setting
        self.backend, self.device, self.dtype = backend, device, dtype
        self.precision = precision_of(dtype)  # the engines' precision name: from_pretrained sets a quantized one (int8)
        self._widths = widths_of(ckpt)
        self.memory = memory or MemoryOptions()
        self.max_side: int | None = MAX_SIDE  # pixels a side a call may ask for (None: no limit)
        self.clip_skip = 0  # the load-time clip_skip (from_pretrained's), a call's default
        self._scheduler = default_scheduler(pipeline_scheduler_config(self.info.scheduler))
        self._progress_config: dict = {"disable": True}
        self._remake: Callable | None = None  # (device, dtype, cuda_graphs, attention_slicing) -> Backend
        self._loras = LoraWeights(lambda: self.family.modules(self.ckpt))
        self._weights_lock = SharedLock()  # calls share the weights; a LoRA change has them alone
        self._preview_vae = self._preview = None  # live previews: the tiny autoencoder, its decoder module

    from_pretrained = classmethod(from_pretrained)

    def __call__(self, prompt=None, negative_prompt=None, image=None, mask_image=None, strength=None,
                 num_inference_steps: int = 50, guidance_scale: float | None = None, scheduler=None,
                 eta: float = 0.0, generator=None, seed: int | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", callback: Callable | None = None, callback_steps: int = 1,
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs=("latents",), latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, guidance_rescale: float = 0.0, timesteps=None, sigmas=None,
                 clip_skip: int | None = None, return_dict: bool = True, prompt_2=None, negative_prompt_2=None,
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, original_size=None,
                 crops_coords_top_left=None, target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=None, negative_target_size=None, preview_every: int | None = None,
                 control_image=None, controlnet_conditioning_scale=None, control_guidance_start=0.0,
                 control_guidance_end=1.0, ip_adapter_image=None, ip_adapter_image_embeds=None,
                 prompt_syntax: str = "plain", **unsupported):
        """Generate images; keyword names and defaults are diffusers' (see the README): a None
        guidance_scale or strength is the model family's default for the mode, as its diffusers
        pipelines (SD: guidance 7.5, strength img2img 0.8, inpaint 1.0; SD-XL: guidance 5.0,
        inpaint 7.5, strength img2img 0.3, inpaint 0.9999). prompt_2 ... negative_target_size are
        StableDiffusionXLPipeline's and apply to SD-XL checkpoints only.
        `preview_every` = k (with a preview_vae loaded): every k steps, callback_on_step_end's
        callback_kwargs also hold "preview", the images of that step's clean-latent estimate as
        the preview VAE (TAESD) decodes them (PIL); out.timings["preview"] is their decode time.
        With ControlNets loaded, `control_image` (one per ControlNet: a list for several) guides
        the call as diffusers' StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline:
        `controlnet_conditioning_scale` (None: 1.0 txt2img, 0.8 img2img, 0.5 inpaint; SD-XL
        inpaint 1.0), `control_guidance_start` / `end` (fractions of the steps run; each a
        number or one per ControlNet); txt2img takes its size from the control image, inpaint
        from the image. With IP-Adapters loaded (load_ip_adapter), `ip_adapter_image` (one per
        adapter) is an image prompt, or `ip_adapter_image_embeds` its features, as in diffusers.
        `prompt_syntax`: "plain" reads prompts as diffusers (literal text, 77 tokens); "a1111"
        as AUTOMATIC1111 (`(word:1.2)` weights, `[word]`, BREAK, prompts past 77 tokens in
        chunks: fastsd/prompts.py).
        Returns a PipelineOutput, or with return_dict=False the tuple (images, None) as diffusers'
        (images, nsfw flags) without a safety checker."""
        values = dict(locals())  # the arguments, by name (as the table lists them)
        del values["self"], values["unsupported"]
        arguments.unknown(unsupported)
        given = {k: values[k] for k in ("prompt", "negative_prompt")}
        tags = self._prompt_loras(values)  # a1111: <lora:NAME:W> tags cut out of the texts
        req, text_encoders = self._request(values)
        gen, seed = self._generator(values["generator"], values["seed"], req.batch)
        preview = self._check_preview(preview_every, callback_on_step_end)
        step_callback, bar = self._step_callback(callback, callback_steps, callback_on_step_end,
                                                 callback_on_step_end_tensor_inputs, req, preview)
        try:
            with self._lora_state(tags), on_work_stream(self.device):  # on CUDA: fastsd's one work stream
                out = self._generate(Call(req, gen, text_encoders, preview=preview), step_callback)
        finally:
            if bar is not None:
                bar.close()
        out.seed = seed
        out.settings = dict(req.settings(), seed=seed, clip_skip=self.clip_skip if req.clip_skip is None
                            else req.clip_skip)
        if tags:  # the texts as given, tags included (as the web UI's infotext)
            out.settings.update({k: v for k, v in given.items() if out.settings.get(k) is not None},
                                lora_tags=[{"name": n, "scale": w} for n, w in tags])
        return out if return_dict else (out.images, None)

    def check_call(self, *args, **kwargs) -> Request:
        """Check a call's arguments as __call__ does, without running anything: raises the error
        the call would raise (a server validates each request this way before queuing it).
        Takes __call__'s arguments; returns the checked Request (`.settings()`: the call's
        settings with the defaults resolved)."""
        call = inspect.signature(self.__call__).bind(*args, **kwargs)
        call.apply_defaults()
        values = dict(call.arguments)
        arguments.unknown(values.pop("unsupported", {}))
        self._prompt_loras(values)
        req, _ = self._request(values)
        self._check_preview(values["preview_every"], values["callback_on_step_end"])
        if values["generator"] is not None:
            self._generator(values["generator"], None, req.batch)
        return req

    def _request(self, values: dict):
        """The call's checked Request and the text encoders it runs (raises for bad input)."""
        values = dict(values)
        if values["clip_skip"] is not None:
            check_clip_skip(self.ckpt, values["clip_skip"])
        values["scheduler"] = (self._scheduler if values["scheduler"] is None
                               else choose_scheduler(values["scheduler"], self._scheduler.config))
        req = make_request(self.info, values, text_width=self.info.cross_attention_dim,
                           defaults=self.family.defaults, controlnets=len(self.family.controlnets),
                           max_side=check_max_side(self.max_side), ip_adapters=len(self._ip))
        self._tiling()  # the decode's tile geometry (MemoryOptions, pipe.vae.enable_tiling()), checked now
        text_encoders = self.backend.text_encoders_for(req.clip_skip)  # refuses a clip_skip an engine cannot give
        check_fits(self.info, self._widths, req, self.dtype, self.device, self.memory)
        return req, text_encoders

    def _generate(self, call: Call, callback) -> PipelineOutput:
        req, timings = call.req, {}
        t_start = time.perf_counter()
        with self._timed(timings, "text_encoder"):
            encoders = {n: partial(f, ran=call.ran) for n, f in call.text_encoders.items()}
            unet_inputs = self.family.encode(encoders, req, self.device)
        if req.ip_images or req.ip_embeds:
            with self._timed(timings, "image_encoder"):  # an image prompt's tokens (IP-Adapter), once per call
                unet_inputs |= self._ip_inputs(req, unet_inputs["encoder_hidden_states"].shape[0], self.device,
                                               call.ran)
        config = req.scheduler_config
        sampler = SAMPLERS[req.scheduler]
        sched = sampler.schedule(config, req.steps, **req.schedule_args)  # host tables
        with self._timed(timings, "vae_encoder"):
            lat = self._prepare_latents(call, sched)
            if sampler.draws_noise(req.eta):  # every step's noise, drawn now in diffusers' order
                lat.step_noise = self._randn_steps(lat.x.shape, len(sched) - lat.start, call.gen,
                                                   sampler.last_step_noise)
        with self._timed(timings, "unet"):
            x = self._denoise(call, self._loop(call, lat, unet_inputs, sched, config), callback)
        if not torch.isfinite(x).all():  # one check after the loop, none inside it
            raise NumericalError(f"the latents became NaN or infinite while denoising in {self.dtype} "
                                 f"(guidance_scale {req.guidance_scale}); try a lower guidance_scale or dtype='fp32'")
        timings["unet_per_step"] = timings["unet"] / max(len(sched) - lat.start, 1)
        with self._timed(timings, "vae_decoder"):
            out = x if req.output_type == "latent" else self._decode(x, call.ran, timings)
        timings["vae"] = timings["vae_encoder"] + timings["vae_decoder"]
        if call.preview is not None:
            timings["preview"] = call.preview.seconds  # inside "unet": the loop waits for them
        timings["total"] = time.perf_counter() - t_start
        if req.output_type in ("pil", "np"):
            out = imgs.to_numpy(out)
            out = imgs.to_pil(out) if req.output_type == "pil" else out
        networks = (*self.backend.backends, *(self._image_encoders.networks if self._image_encoders else ()))
        return PipelineOutput(out, timings, {n: call.ran[n] for n in networks if n in call.ran})

    @staticmethod
    def _generator(generator, seed, batch: int) -> tuple[torch.Generator | list[torch.Generator], int | None]:
        """The call's generator (or diffusers' list of one per image) and its seed. Without
        either, the seed comes from the OS (torch's global generator is never read nor re-seeded)."""
        if generator is not None:
            gens = generator if isinstance(generator, (list, tuple)) else [generator]
            if not gens or not all(isinstance(g, torch.Generator) for g in gens):
                raise InvalidArgumentError("generator must be a torch.Generator or a list of them, not "
                                           f"{type(generator).__name__}")
            if isinstance(generator, (list, tuple)) and len(gens) != batch:
                raise InvalidArgumentError(f"a list of {len(gens)} generators for {batch} images: pass one per "
                                           "image (len(prompts) x num_images_per_prompt)")
            return (gens[0] if len(gens) == 1 else list(gens)), None
        seed = check_seed(seed)
        seed = draw_seed() if seed is None else seed
        return torch.Generator().manual_seed(seed), seed

    def _loop(self, call: Call, lat: Latents, unet_inputs: dict, sched, config) -> _Loop:
        """Everything the loop reads, on the device before it starts: the step rows (built on
        the host, moved in one copy), the ControlNets' images, the first state. Inside the loop
        nothing is copied between host and device (on CUDA each copy would wait for the GPU)."""
        req = call.req
        rows = step_rows(sched, req.scheduler, config, req.eta, lat.start)
        names, control, active = self._control(req, len(rows))
        rows = torch.cat([rows, control], dim=1).to(self.device)
        inputs = StepInputs(unet_inputs, lat.conditioning, lat.x0, lat.noise, lat.mask, self._control_images(req))
        shapes = tuple((n, tuple(t.shape)) for n, t in {"x": lat.x, **inputs.tensors()}.items())
        previews = call.preview is not None
        residuals = tuple(t.name for t in self.family.specs["unet"].optional_inputs
                          if t.name.startswith(RESIDUAL_PREFIXES)) if names else ()
        key = StepKey(req.scheduler, config, req.guidance_scale, req.do_cfg, lat.step_noise is not None, shapes,
                      req.guidance_rescale, previews, names, residuals)
        return _Loop(key, inputs, initial_state(req.scheduler, lat.x, previews), rows, lat.step_noise,
                     sched.host_timesteps[lat.start:], active)

    def _denoise(self, call: Call, loop: _Loop, callback):
        """The loop (see fastsd/loop.py), step by step or as replays of one captured step."""
        if self._graphs is not None:
            x = self._graphs.run(self.backend.unet, loop.key, loop.inputs, loop.state, loop.rows, loop.noises,
                                 loop.host_t, callback, call.ran, self.backend.run)
            if x is not None:
                return x
        step = make_step(partial(self.backend.unet, ran=call.ran), loop.key, loop.inputs,
                         partial(self.backend.run, ran=call.ran))
        return run_steps(step, loop.state, loop.rows, loop.noises, loop.host_t, callback, loop.key.preview,
                         loop.control)

    def _reset_graphs(self) -> None:
        """Drop the captured steps (weights or attention changed)."""
        if self._graphs is not None:
            self._graphs = StepGraphs()
