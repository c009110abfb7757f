"""fastsd.Pipeline: txt2img, img2img and inpaint over any backend.

encode prompt -> prepare latents -> denoise loop -> decode. Random draws happen in the
same order and shapes as diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline, so the
same generator gives the same image.
"""

from __future__ import annotations

import inspect
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import arguments
from . import images as imgs
from .backends import Backend, on_work_stream
from .backends.eager import Fp32VaeDecoder
from .backends.registry import BACKEND_NAMES
from .backends.select import make_backend
from .budget import check_fits, widths_of
from .checkpoint import check_clip_skip, load_checkpoint
from .controlnet import load_controlnets
from .devices import parse_device
from .engines import DTYPES, PRECISIONS, default_engine_dir
from .errors import InvalidArgumentError, NumericalError, UnsupportedError
from .families import controlnet_names, family_for
from .locks import SharedLock
from .loop import StepGraphs, StepInputs, StepKey, initial_state, make_step, run_steps, step_rows
from .lora import LoraWeights, check_scale, lora_name, read_lora
from .model_files import Checkpoint
from .schedulers import (
    PREDICTION_TYPES,
    SAMPLERS,
    SchedulerChoice,
    add_noise,
    choose_scheduler,
    default_scheduler,
    pipeline_scheduler_config,
    start_index,
)
from .settings import MAX_SIDE, Request, check_max_side, check_seed, draw_seed, make_request
from .tiling import decode_sliced, decode_tiled, encode_tiled

log = logging.getLogger(__name__)



_OFFLOAD = "fastsd keeps each network where it runs; use MemoryOptions or engines for small GPUs"
_DIFFUSERS_ONLY = {  # diffusers pipeline methods fastsd does not have, and what to do instead
    "enable_model_cpu_offload": _OFFLOAD, "enable_sequential_cpu_offload": _OFFLOAD,
    "enable_group_offload": _OFFLOAD,
    "enable_xformers_memory_efficient_attention": "fastsd already runs PyTorch's SDPA attention; drop the call",
    "load_lora_weights": "use pipe.load_lora(path, scale=1.0, name=None), which also fuses it",
    "fuse_lora": "pipe.load_lora(path, scale=...) fuses as it loads",
    "set_adapters": "use pipe.set_lora_scale(name, scale) per LoRA (pipe.unload_lora(name) drops one)",
    "unfuse_lora": "use pipe.unload_lora(name) (None: all), which restores the base weights exactly",
    "unload_lora_weights": "use pipe.unload_lora() (restores the base weights exactly)",
    "load_textual_inversion": "not supported",
    "load_ip_adapter": "not supported", "enable_freeu": "not supported", "save_pretrained": "not supported",
    "components": "fastsd's networks are pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer",
    "encode_prompt": "pass prompt_embeds= computed with pipe.text_encoder, or prompts",
}


def _dtype_name(dtype, torch_dtype) -> str | None:
    """fastsd's precision name from dtype= ("fp16", or a torch dtype) and diffusers' torch_dtype=."""
    names = []
    for what, value in (("dtype", dtype), ("torch_dtype", torch_dtype)):
        if value is None:
            continue
        if isinstance(value, torch.dtype) and value in PRECISIONS:
            names.append(PRECISIONS[value])
        elif isinstance(value, str) and value in DTYPES:
            names.append(value)
        elif isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype) and \
                getattr(torch, value) in PRECISIONS:
            names.append(PRECISIONS[getattr(torch, value)])
        else:
            raise InvalidArgumentError(f"must be one of {', '.join(DTYPES)} (or torch.float16, torch.bfloat16, "
                                       f"torch.float32), got {value!r}", what)
    if len(set(names)) > 1:
        raise InvalidArgumentError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree")
    return names[0] if names else None


@dataclass(frozen=True)
class MemoryOptions:
    """Load-time memory savers for small GPUs (each costs some speed)."""

    attention_slicing: bool = False  # eager UNet: attention in slices (diffusers' "auto"); set when loading
    vae_slicing: bool = False  # decode a batch one image at a time
    vae_tiling: bool = False  # decode in overlapping latent tiles (large images)
    tile: int | None = None  # latent pixels per tile; None: the VAE's sample size (64 for SD), as diffusers
    tile_overlap: int | None = None  # latent pixels shared by neighbouring tiles; None: a quarter tile


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
class _Latents:
    """Initial latents plus what inpainting needs inside the loop."""

    x: torch.Tensor  # (B, C, h, w)
    start: int  # first schedule index to run
    conditioning: torch.Tensor | None = None  # 9-channel UNets: (B or 2B, 1 + C, h, w)
    x0: torch.Tensor | None = None  # 4-channel inpaint: clean image latents
    noise: torch.Tensor | None = None  # 4-channel inpaint: the noise that made x
    mask: torch.Tensor | None = None  # 4-channel inpaint: (B, 1, h, w), 1 = repaint
    step_noise: torch.Tensor | None = None  # (steps, B, C, h, w): fresh noise of each step, if the sampler takes it


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


@dataclass
class _Call:
    """One call's own state: its settings, its generator, and what ran each network."""

    req: Request
    gen: torch.Generator | list[torch.Generator]
    text_encoders: dict[str, Callable]  # the backend's, for the call's clip_skip
    ran: dict[str, str] = field(default_factory=dict)
    preview: "_Preview | None" = None  # live previews of this call


@dataclass
class _Preview:
    """A call's previews: every `every` loop steps, the preview VAE decodes x0; `seconds` adds up."""

    every: int
    seconds: float = 0.0


class Pipeline:
    def __init__(self, ckpt: Checkpoint, backend: Backend, device: torch.device, dtype: torch.dtype,
                 memory: MemoryOptions | None = None, cuda_graphs: bool = False, family=None):
        if cuda_graphs and device.type != "cuda":
            raise InvalidArgumentError("cuda_graphs needs a CUDA device")
        self.ckpt, self.info = ckpt, ckpt.info
        self.family = family or family_for(ckpt)  # the one the backend was made for, when given
        self._graphs = StepGraphs() if cuda_graphs else None  # whole-step graphs, one per shape and setting
        self.backend, self.device, self.dtype = backend, device, dtype
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

    @property
    def scheduler(self) -> SchedulerChoice:
        """The sampler a call with scheduler=None runs (at load: the checkpoint's own). `.name`
        is fastsd's name, `.config` a diffusers config: `pipe.scheduler =
        EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)` works as in diffusers."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        """A fastsd sampler name or a diffusers scheduler object (mapped by class and config);
        one fastsd cannot run raises InvalidArgumentError and leaves the scheduler as it was."""
        self._scheduler = choose_scheduler(value, self._scheduler.config)

    @classmethod
    def from_pretrained(cls, model: str, backend: str = "auto", device: str | None = None,
                        dtype: str | None = None, engine_dir: str | None = None,
                        allow_pickle: bool = False, prediction_type: str | None = None,
                        clip_skip: int = 0, memory: MemoryOptions | None = None,
                        cuda_graphs: bool = False, *, torch_dtype=None, variant: str | None = None,
                        safety_checker=None, requires_safety_checker: bool | None = None,
                        feature_extractor=None, use_safetensors: bool | None = None,
                        local_files_only: bool = False, vae=None, preview_vae=None, controlnet=None,
                        max_side: int | None = MAX_SIDE, **unsupported) -> "Pipeline":
        """Load `model` (see the README). `allow_pickle` permits .ckpt/.bin files;
        `prediction_type` ("epsilon" | "v_prediction") overrides the checkpoint's scheduler
        config, for single files whose config cannot be known (SD 2.x 512-base vs 768-v);
        `clip_skip` = k takes text embeddings from CLIP layer -(k + 1) by default (engines
        bake it in; a call may ask another where the text encoder runs eagerly).
        diffusers' loading arguments work as there: `torch_dtype` (torch.float16, ...; same as
        dtype="fp16"), `variant` ("fp16": model.fp16.safetensors), `safety_checker=None` (fastsd
        has none), `use_safetensors`, `local_files_only`, `vae` (a VAE folder, .safetensors file or
        AutoencoderKL replacing the checkpoint's, e.g. an fp16-safe SD-XL VAE, or a tiny
        autoencoder such as TAESD for fast decoding, as diffusers' vae=AutoencoderTiny);
        `preview_vae` (a TAESD folder, hub id in the hub cache, synthetic:taesd or an
        AutoencoderTiny) decodes live previews (see __call__'s preview_every); `controlnet` (a
        diffusers folder, a single file, a hub id in the hub cache, synthetic:controlnet-<arch>,
        a ControlNetModel, or a list of these: multi-ControlNet) lets calls pass control_image;
        others raise InvalidArgumentError."""
        if unsupported:
            raise InvalidArgumentError(f"from_pretrained does not support the argument {next(iter(unsupported))!r}")
        for name, value in (("safety_checker", safety_checker), ("feature_extractor", feature_extractor)):
            if value is not None:
                raise InvalidArgumentError(f"fastsd runs no safety checker: pass {name}=None (or leave it out)")
        if use_safetensors is False and not allow_pickle:
            raise InvalidArgumentError("use_safetensors=False loads pickle files, which run code: "
                                       "pass allow_pickle=True")
        dtype = _dtype_name(dtype, torch_dtype)
        if backend not in BACKEND_NAMES:
            raise InvalidArgumentError(f"must be one of {', '.join(BACKEND_NAMES)}, got {backend!r}", "backend")
        dev = parse_device(device)
        if cuda_graphs and dev.type != "cuda":
            raise InvalidArgumentError("cuda_graphs needs a CUDA device")
        dtype = dtype or ("fp16" if dev.type == "cuda" else "fp32")
        if variant is not None and not isinstance(variant, str):
            raise InvalidArgumentError(f"must be a string such as 'fp16', got {variant!r}", "variant")
        if memory is not None and memory.tile is not None and (isinstance(memory.tile, bool) or not isinstance(
                memory.tile, int) or memory.tile < 1):
            raise InvalidArgumentError(f"tile must be a positive integer (latent pixels), got {memory.tile!r}")
        if memory is not None and memory.tile_overlap is not None and not 0 <= memory.tile_overlap < (
                memory.tile or 10**9):
            raise InvalidArgumentError(f"tile_overlap must be in [0, tile={memory.tile}), got {memory.tile_overlap}")
        ckpt = load_checkpoint(model, allow_pickle=allow_pickle, variant=variant, local_files_only=local_files_only,
                               vae=vae)
        check_clip_skip(ckpt, clip_skip)
        if prediction_type is not None:
            if prediction_type not in PREDICTION_TYPES:
                raise InvalidArgumentError(f"must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}",
                                           "prediction_type")
            ckpt.info = replace(ckpt.info, scheduler=dict(ckpt.info.scheduler, prediction_type=prediction_type))
        store = Path(engine_dir) if engine_dir is not None else default_engine_dir()
        family = family_for(ckpt, load_controlnets(controlnet, ckpt, allow_pickle, local_files_only))

        vae_fp32 = Fp32VaeDecoder(ckpt.vae)  # the weights as loaded, before any backend casts them

        def remake(dev: torch.device, dt: torch.dtype, graphs: bool, slicing: bool) -> Backend:
            return make_backend(ckpt, family, backend, dev, dt, store, clip_skip, graphs, attention_slicing=slicing,
                                vae_fp32=vae_fp32)

        pipe = cls(ckpt, remake(dev, DTYPES[dtype], cuda_graphs, bool(memory and memory.attention_slicing)), dev,
                   DTYPES[dtype], memory, cuda_graphs, family)
        pipe._remake = remake
        pipe.clip_skip = clip_skip
        pipe.max_side = check_max_side(max_side)
        if preview_vae is not None:
            pipe.load_preview_vae(preview_vae)
        return pipe

    # ---- live previews --------------------------------------------------------------------

    def load_preview_vae(self, vae) -> None:
        """Use a tiny autoencoder (TAESD; anything from_pretrained's vae= takes) to decode live
        previews; it runs in eager PyTorch beside the pipeline's own networks (TAESD's decoder
        is about 1 M parameters)."""
        from .checkpoint import check_vae_fits, is_tiny_vae, load_vae
        from .networks import TinyVaeDecoder

        model, _, source = load_vae(vae)
        if not is_tiny_vae(model):
            raise InvalidArgumentError(f"preview_vae must be a tiny autoencoder (TAESD, diffusers' AutoencoderTiny); "
                                       f"{source} is an {type(model).__name__}")
        check_vae_fits(model, self.info, source, "preview VAE")
        self._preview_vae = model
        self._preview = TinyVaeDecoder(model).to(self.device, self.dtype).eval()

    @property
    def preview_vae(self):
        """The preview VAE (an AutoencoderTiny), or None."""
        return self._preview_vae

    def _check_preview(self, every, on_step_end) -> "_Preview | None":
        if every is None:
            return None
        if self._preview is None:
            raise InvalidArgumentError("preview_every needs a preview VAE: Pipeline.from_pretrained(..., "
                                       "preview_vae='madebyollin/taesd') or pipe.load_preview_vae(...)")
        if on_step_end is None:
            raise InvalidArgumentError("preview_every delivers previews to callback_on_step_end (its "
                                       "callback_kwargs['preview']); pass one")
        return _Preview(every)

    def _preview_images(self, x0: torch.Tensor) -> list:
        scale = float(self._preview_vae.config.scaling_factor)
        shift = float(getattr(self._preview_vae.config, "shift_factor", None) or 0.0)
        with torch.inference_mode():
            images = self._preview((x0 / scale + shift).to(self.device, self.dtype)).float()
        return imgs.to_pil(imgs.to_numpy((images / 2 + 0.5).clamp(0, 1)))

    # ---- diffusers' pipeline methods -------------------------------------------------

    def __getattr__(self, name: str):
        """A diffusers pipeline method fastsd lacks is a clear error naming it, not a bare
        AttributeError (still one: hasattr() answers False)."""
        if name in _DIFFUSERS_ONLY:
            raise UnsupportedError(f"fastsd's Pipeline does not support diffusers' {name}(): {_DIFFUSERS_ONLY[name]}")
        raise AttributeError(f"'Pipeline' object has no attribute {name!r}")

    def to(self, *args, **kwargs) -> "Pipeline":
        """As diffusers: pipe.to("cuda"), pipe.to(torch.float16), pipe.to("cuda", torch.float16),
        pipe.to(device=..., dtype=...). Moving reloads the backend for the new device and
        precision (engines are per device and precision). Returns the pipeline."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise InvalidArgumentError(f"to() does not take {next(iter(kwargs))!r}")
        for a in args:
            if isinstance(a, torch.dtype) or (isinstance(a, str) and a in DTYPES):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
            else:
                raise InvalidArgumentError(f"to() takes a device and/or a dtype, not {type(a).__name__}")
        dev = self.device if device is None else parse_device(str(device))
        dt = self.dtype if dtype is None else DTYPES[_dtype_name(None, dtype)]
        if (dev, dt) == (self.device, self.dtype):
            return self
        if self._graphs is not None and dev.type != "cuda":
            raise InvalidArgumentError("this pipeline was loaded with cuda_graphs, which need a CUDA device")
        if self._remake is None:
            raise InvalidArgumentError("this pipeline was built around a given backend; load it with "
                                       "Pipeline.from_pretrained(..., device=, dtype=) instead")
        with self._weights_lock.exclusive("pipe.to()"):
            self.backend = self._remake(dev, dt, self._graphs is not None, self.memory.attention_slicing)
            self.device, self.dtype = dev, dt
            if self._preview is not None:
                self._preview = self._preview.to(dev, dt)
            if self._graphs is not None:
                self._graphs = StepGraphs()
            modules = self.family.modules(self.ckpt)
            for network, names in self._loras.overridden().items():  # the new backend's engines take the LoRAs too
                params = dict(modules[network].named_parameters())
                self.backend.set_weights(network, {n: params[n].detach() for n in names}, False)
        return self

    # ---- LoRA ---------------------------------------------------------------------------

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Fuse a LoRA (.safetensors: kohya / A1111, or diffusers / PEFT) into the UNet and text
        encoder weights it targets, on eager and, by refit, on engines (an engine that cannot
        be refitted leaves those networks to eager PyTorch while the LoRA is loaded): it costs
        nothing per step. Several may be loaded; each weight is recomputed from its original
        and the LoRAs loaded, in load order. Returns its name (default: the file's stem). A
        file whose keys do not match this model is an InvalidArgumentError naming some."""
        name, scale = lora_name(path, name), check_scale(scale)
        t0 = time.perf_counter()
        lora = read_lora(path, self.family.modules(self.ckpt), name, scale)  # checked before anything changes
        with self._weights_lock.exclusive("load_lora"):
            self._weights_changed(self._loras.add(lora))
        lora.seconds = time.perf_counter() - t0
        log.info("LoRA %s: %d weights of %s fused in %.2fs", name, len(lora.deltas), ", ".join(lora.networks),
                 lora.seconds)
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Re-weight a loaded LoRA (0 disables it) without reading its file again."""
        scale = check_scale(scale)
        t0 = time.perf_counter()
        with self._weights_lock.exclusive("set_lora_scale"):
            self._weights_changed(self._loras.set_scale(name, scale))
            lora = self._loras.loras[name]
            lora.seconds = time.perf_counter() - t0
        log.info("LoRA %s: scale %g in %.2fs", name, scale, lora.seconds)

    def unload_lora(self, name: str | None = None) -> None:
        """Unload one LoRA, or all (None): the weights no LoRA touches any more get their
        original values back, bit for bit."""
        with self._weights_lock.exclusive("unload_lora"):
            self._weights_changed(self._loras.remove(name))

    @property
    def loras(self) -> list[dict]:
        """The loaded LoRAs in load order: name, path, scale, weights, networks, and how long
        its last load or scale change took (fusing and refitting engines), in seconds."""
        return [lora.describe() for lora in self._loras.loras.values()]

    def _weights_changed(self, changed: dict[str, dict[str, torch.Tensor]]) -> None:
        """Weights changed: engines are refitted, captured steps dropped."""
        overridden = self._loras.overridden()
        for network, weights in changed.items():
            self.backend.set_weights(network, weights, network not in overridden)
        if self._graphs is not None:
            self._graphs = StepGraphs()

    @property
    def vae(self):
        """The checkpoint's VAE (diffusers' AutoencoderKL): `pipe.vae.enable_slicing()` and
        `enable_tiling()` (diffusers >= 0.35's spelling) apply to fastsd's decode too."""
        return self.ckpt.vae

    @property
    def unet(self):
        return self.ckpt.unet

    @property
    def controlnet(self):
        """The ControlNet (diffusers' ControlNetModel), a list of them (multi-ControlNet), or None."""
        models = [cn.model for cn in self.family.controlnets.values()]
        return None if not models else models[0] if len(models) == 1 else models

    @property
    def text_encoder(self):
        return self.ckpt.text_encoder

    @property
    def tokenizer(self):
        return self.ckpt.tokenizer

    @property
    def text_encoder_2(self):
        """SD-XL's second text encoder (None for SD 1.x/2.x)."""
        return self.ckpt.text_encoder_2

    @property
    def tokenizer_2(self):
        return self.ckpt.tokenizer_2

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """Attention in slices in the eager UNet (less memory, slower); engines keep theirs."""
        self.ckpt.unet.set_attention_slice(slice_size)
        self.memory = replace(self.memory, attention_slicing=slice_size is not None)
        if self._graphs is not None:
            self._graphs = StepGraphs()  # captured steps hold the old attention

    def disable_attention_slicing(self) -> None:
        self.enable_attention_slicing(None)

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time."""
        self.memory = replace(self.memory, vae_slicing=True)

    def disable_vae_slicing(self) -> None:
        self.memory = replace(self.memory, vae_slicing=False)

    def enable_vae_tiling(self) -> None:
        """Decode in overlapping latent tiles (large images in bounded memory)."""
        self.memory = replace(self.memory, vae_tiling=True)

    def disable_vae_tiling(self) -> None:
        self.memory = replace(self.memory, vae_tiling=False)

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
                 control_guidance_end=1.0, **unsupported):
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
        from the image. Without control_image the call runs without them.
        Returns a PipelineOutput, or with return_dict=False the tuple (images, None) as diffusers'
        (images, nsfw flags) without a safety checker."""
        values = dict(locals())  # the arguments, by name (as the table lists them)
        del values["self"], values["unsupported"]
        arguments.unknown(unsupported)
        req, text_encoders = self._request(values)
        gen, seed = self._generator(values["generator"], values["seed"], req.batch)
        total = req.loop_steps
        preview = self._check_preview(preview_every, callback_on_step_end)
        step_callback, bar = self._step_callback(callback, callback_steps, callback_on_step_end,
                                                 callback_on_step_end_tensor_inputs, total,
                                                 SAMPLERS[req.scheduler].order, preview)
        try:
            with self._weights_lock.shared(), on_work_stream(self.device):  # on CUDA: fastsd's one work stream
                out = self._generate(_Call(req, gen, text_encoders, preview=preview), step_callback)
        finally:
            if bar is not None:
                bar.close()
        out.seed = seed
        out.settings = dict(req.settings(), seed=seed, clip_skip=self.clip_skip if req.clip_skip is None
                            else req.clip_skip)
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
        req, _ = self._request(values)
        self._check_preview(values["preview_every"], values["callback_on_step_end"])
        if values["generator"] is not None:
            self._generator(values["generator"], None, req.batch)
        return req

    def _request(self, values: dict):
        """The call's checked Request and the text encoders it runs (raises for bad input)."""
        values = arguments.check_values(values)
        if values["clip_skip"] is not None:
            check_clip_skip(self.ckpt, values["clip_skip"])
        if values["scheduler"] is not None:
            values["scheduler"] = choose_scheduler(values["scheduler"], self._scheduler.config)
        else:
            values["scheduler"] = self._scheduler
        req = make_request(self.info, values, text_width=self.info.cross_attention_dim,
                           defaults=self.family.defaults, controlnets=len(self.family.controlnets),
                           max_side=check_max_side(self.max_side))
        text_encoders = self.backend.text_encoders_for(req.clip_skip)  # refuses a clip_skip an engine cannot give
        check_fits(self.info, self._widths, req, self.dtype, self.device, self.memory)
        return req, text_encoders

    def _generate(self, call: _Call, callback) -> PipelineOutput:
        req, timings = call.req, {}
        t_start = time.perf_counter()
        with self._timed(timings, "text_encoder"):
            encoders = {n: partial(f, ran=call.ran) for n, f in call.text_encoders.items()}
            unet_inputs = self.family.encode(encoders, req, self.device)
        cfg = req.scheduler_config
        sampler = SAMPLERS[req.scheduler]
        custom = {k: v for k, v in (("timesteps", req.timesteps), ("sigmas", req.sigmas)) if v is not None}
        sched = sampler.schedule(cfg, req.steps, **custom)  # host tables
        with self._timed(timings, "vae_encoder"):
            lat = self._prepare_latents(call, sched)
            if sampler.draws_noise(req.eta):  # every step's noise, drawn now in diffusers' order
                lat.step_noise = self._randn_steps(lat.x.shape, len(sched) - lat.start, call.gen,
                                                   sampler.last_step_noise)
        with self._timed(timings, "unet"):
            x = self._denoise(call, self._loop(call, lat, unet_inputs, sched, cfg), callback)
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
        return PipelineOutput(out, timings, {n: call.ran[n] for n in self.backend.backends if n in call.ran})

    # ---- stages ---------------------------------------------------------------------

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

    def _step_callback(self, callback, callback_steps, on_step_end, tensor_inputs, total: int, order: int = 1,
                       preview: _Preview | None = None):
        """One per-step callback of the loop, callback(k, t, latents) -> new latents or None,
        from diffusers' two kinds: the legacy callback(step, t, latents) every `callback_steps`
        loop steps that complete a sampler step (Heun: every second UNet call, step = k // 2),
        and callback_on_step_end(pipe, k, t, {"latents": ...}) -> dict after every UNet call,
        whose "latents" replace the loop's. Also returns the progress bar (None unless enabled)."""
        names = [tensor_inputs] if isinstance(tensor_inputs, str) else list(tensor_inputs or ())
        if any(n != "latents" for n in names):
            raise InvalidArgumentError(f"callback_on_step_end_tensor_inputs: fastsd passes only 'latents', "
                                       f"not {', '.join(repr(n) for n in names if n != 'latents')}")
        bar = self._progress_bar(total)
        if callback is None and on_step_end is None and bar is None:
            return None, None

        def step_callback(k, t, latents, x0=None):
            if bar is not None:
                bar.update(1)
            completes = (k + 1) % order == 0 or k == total - 1
            if callback is not None and completes and k % callback_steps == 0:
                callback(k // order, t, latents)
            if on_step_end is not None:
                kwargs = {n: latents for n in names}
                if preview is not None and x0 is not None and (k + 1) % preview.every == 0:
                    t0 = time.perf_counter()
                    kwargs["preview"] = self._preview_images(x0)
                    preview.seconds += time.perf_counter() - t0
                got = on_step_end(self, k, torch.tensor(t), kwargs)
                if isinstance(got, dict) and got.get("latents") is not None:
                    if not isinstance(got["latents"], torch.Tensor) or got["latents"].shape != latents.shape:
                        raise InvalidArgumentError(f"callback_on_step_end returned latents that are not a tensor of "
                                                   f"shape {tuple(latents.shape)}")
                    return got["latents"]
            return None

        return step_callback, bar

    def set_progress_bar_config(self, **kwargs) -> None:
        """As diffusers: options of the per-call tqdm progress bar (`disable=False` shows it;
        fastsd shows none by default: apps that count milliseconds do not want one)."""
        self._progress_config = dict(self._progress_config, **kwargs)

    def _progress_bar(self, total: int):
        if self._progress_config.get("disable", True):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, **{k: v for k, v in self._progress_config.items() if k != "disable"})

    @contextmanager
    def _timed(self, timings: dict, stage: str):
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[stage] = time.perf_counter() - t0

    def _draw(self, shape, gen) -> torch.Tensor:
        """As diffusers' randn_tensor: draw on the generator's device in the model dtype; with a
        list of generators, image i draws from generator i."""
        first = gen[0] if isinstance(gen, list) else gen
        rand_device = "cpu" if first.device.type == "cpu" else self.device
        if isinstance(gen, list):
            one = (1, *shape[1:])
            return torch.cat([torch.randn(one, generator=gen[i], device=rand_device, dtype=self.dtype)
                              for i in range(shape[0])])
        return torch.randn(shape, generator=gen, device=rand_device, dtype=self.dtype)

    def _randn(self, shape, gen) -> torch.Tensor:
        return self._draw(shape, gen).to(self.device).float()

    def _randn_steps(self, shape, steps: int, gen, last: bool = True) -> torch.Tensor:
        """`steps` draws of `shape`, one after the other as a sampler draws them in diffusers'
        loop (the generator is used for nothing else in between), moved to the device at once.
        `last` False: the last step draws none (LCM), its noise is zeros."""
        draws = [self._draw(shape, gen).to(self.device).float() for _ in range(steps if last else steps - 1)]
        draws += [] if last else [torch.zeros(shape, device=self.device)]
        return torch.stack(draws)

    def _encode_image(self, images: torch.Tensor, gen, ran: dict | None = None) -> torch.Tensor:
        """Sample scaled latents from the VAE posterior (one draw of the mean's shape; with a
        list of generators, image i from generator i). A tiny autoencoder (TAESD) gives the
        latents themselves: no draw, as diffusers' retrieve_latents."""
        encoder, tiling = partial(self.backend.vae_encoder, ran=ran), self._tiling()
        images = images.to(self.device)
        moments = encoder(images) if tiling is None else encode_tiled(encoder, images, self.info.vae_factor, *tiling)
        if self.info.tiny_vae:
            z = moments.float()
        else:
            mean, logvar = moments.chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * self._randn(mean.shape, gen)
        return self.info.vae_scale * (z - self.info.vae_shift)

    @staticmethod
    def _spread(t: torch.Tensor, b: int) -> torch.Tensor:
        """`t` repeated to batch `b` (copies of the whole batch, as diffusers repeats it); the
        Request has checked that image and mask counts divide the batch."""
        return t if t.shape[0] == b else t.repeat(b // t.shape[0], 1, 1, 1)

    def _prepare_latents(self, call: _Call, sched) -> _Latents:
        req, gen = call.req, call.gen
        b = req.batch
        f, c = self.info.vae_factor, self.info.latent_channels
        shape = (b, c, req.height // f, req.width // f)
        start = start_index(req.scheduler, req.steps, req.strength)
        if req.image is None and self.info.unet_in_channels == c:  # txt2img
            noise = self._randn(shape, gen) if req.latents is None else req.latents.to(self.device).float()
            return _Latents(noise * sched.init_noise_sigma, start)
        if req.image is None:  # a 9-channel UNet without an image: repaint everything
            return self._prepare_inpaint(call, sched, torch.zeros(1, 3, req.height, req.width), shape, start)
        image, is_latent = imgs.image_batch(req.image, req.height, req.width, c)
        if req.mask_image is None and self.info.unet_in_channels == c:  # img2img
            if is_latent:  # latents given as the image: used as they are (diffusers)
                x0 = image.to(self.device).float()
            else:
                if isinstance(gen, list):  # one encode per image, each with its own generator
                    image = self._spread(image, b)
                x0 = self._encode_image(image, gen, call.ran)
            x0 = self._spread(x0, b)
            return _Latents(add_noise(sched, x0, self._randn(x0.shape, gen), start), start)
        if is_latent:
            raise InvalidArgumentError("inpainting takes RGB images, not latents")
        return self._prepare_inpaint(call, sched, image, shape, start)

    def _prepare_inpaint(self, call: _Call, sched, image, shape, start) -> _Latents:
        """As StableDiffusionInpaintPipeline: image latents, noise, masked-image latents."""
        req, gen = call.req, call.gen
        b, c, h, w = shape
        nine = self.info.unet_in_channels != c
        full = req.strength == 1.0
        mask = (imgs.mask_batch(req.mask_image, req.height, req.width) if req.mask_image is not None
                else torch.ones(1, 1, req.height, req.width))  # 9-channel UNet without mask: repaint all
        needs_x0 = not nine or (req.latents is None and not full)
        x0 = self._spread(self._encode_image(image, gen, call.ran), b) if needs_x0 else None
        if req.latents is None:
            noise = self._randn(shape, gen)
            x = noise * sched.init_noise_sigma if full else add_noise(sched, x0, noise, start)
        else:  # given latents are the noise, scaled as pure noise whatever the strength (diffusers)
            noise = req.latents.to(self.device).float()
            x = noise * sched.init_noise_sigma
        mask_lat = self._spread(F.interpolate(mask, size=(h, w)), b).to(self.device)  # nearest
        masked_image = image * (mask < imgs.MASK_THRESHOLD)
        if not nine:  # diffusers encodes the masked image here even for 4-channel UNets:
            if not self.info.tiny_vae:  # consume the same draws (a tiny VAE draws none), skip the unused encode
                self._randn((masked_image.shape[0], c, h, w), gen)
            return _Latents(x, start, x0=x0, noise=noise, mask=mask_lat)
        masked = self._spread(self._encode_image(masked_image, gen, call.ran), b)
        cond = torch.cat([mask_lat, masked], dim=1)
        return _Latents(x, start, conditioning=torch.cat([cond, cond]) if req.do_cfg else cond)

    def _loop(self, call: _Call, lat: _Latents, unet_inputs: dict, sched, cfg) -> _Loop:
        """Everything the loop reads, on the device before it starts: the step rows (built on
        the host, moved in one copy), the ControlNets' images, the first state. Inside the loop
        nothing is copied between host and device (on CUDA each copy would wait for the GPU)."""
        req = call.req
        rows = step_rows(sched, req.scheduler, cfg, req.eta, lat.start)
        names, control, active = self._control(req, len(rows))
        rows = torch.cat([rows, control], dim=1).to(self.device)
        inputs = StepInputs(unet_inputs, lat.conditioning, lat.x0, lat.noise, lat.mask, self._control_images(req))
        shapes = tuple((n, tuple(t.shape)) for n, t in {"x": lat.x, **inputs.tensors()}.items())
        previews = call.preview is not None
        residuals = tuple(t.name for t in self.family.specs["unet"].optional_inputs) if names else ()
        key = StepKey(req.scheduler, cfg, req.guidance_scale, req.do_cfg, lat.step_noise is not None, shapes,
                      req.guidance_rescale, previews, names, residuals)
        return _Loop(key, inputs, initial_state(req.scheduler, lat.x, previews), rows, lat.step_noise,
                     sched.host_timesteps[lat.start:], active)

    def _denoise(self, call: _Call, loop: _Loop, callback):
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

    @staticmethod
    def _control(req: Request, steps: int) -> tuple[tuple[str, ...], torch.Tensor, tuple[bool, ...] | None]:
        """The ControlNets a call runs, their scale at each of its `steps` loop steps ((steps, K)
        float32: the scale inside the guidance window, 0 outside, as diffusers' controlnet_keep:
        step i of N is kept where i / N >= start and (i + 1) / N <= end), and whether any runs
        at each step (where none does, the step skips them: zero residuals change nothing;
        None without ControlNets)."""
        names = controlnet_names(len(req.control_images))
        keep = [[1.0 - float(i / steps < s or (i + 1) / steps > e) for s, e in zip(req.control_start,
                                                                                   req.control_end, strict=True)]
                for i in range(steps)]
        scales = torch.tensor([[c * k for c, k in zip(req.control_scales, row, strict=True)] for row in keep],
                              dtype=torch.float32).reshape(steps, len(names))
        return names, scales, tuple(bool((row != 0).any()) for row in scales) if names else None

    def _control_images(self, req: Request) -> tuple[torch.Tensor, ...]:
        """Each ControlNet's conditioning image at the call's size, in [0, 1], one per image of
        the batch ([uncond; cond] with CFG), as diffusers' prepare_image."""
        out = []
        for images in req.control_images:
            t = imgs.control_batch(images, req.height, req.width)
            t = t.repeat_interleave(req.batch if t.shape[0] == 1 else req.n, dim=0)
            out.append((torch.cat([t, t]) if req.do_cfg else t).to(self.device))
        return tuple(out)

    def _decode(self, latents: torch.Tensor, ran: dict, timings: dict) -> torch.Tensor:
        """(B, 3, H, W) float32 in [0, 1] on the device (diffusers' "pt" output). In fp16, a VAE
        whose config says force_upcast (SD-XL's) decodes in fp32 up front, as diffusers; one that
        overflows (NaN/inf pixels) decodes again in fp32. timings["vae_decoder_fp32"]: the
        seconds of an fp32 decode, when there was one."""
        z = latents / self.info.vae_scale + self.info.vae_shift
        fp32 = partial(self.backend.vae_decoder_fp32, ran=ran)
        if self.dtype == torch.float16 and getattr(self.ckpt.vae.config, "force_upcast", False):
            with self._timed(timings, "vae_decoder_fp32"):
                images = self._decode_with(fp32, z)
        else:
            images = self._decode_with(partial(self.backend.vae_decoder, ran=ran), z)
            if not torch.isfinite(images).all():
                log.warning("VAE decode overflowed in %s (NaN/inf); decoding again in fp32", self.dtype)
                with self._timed(timings, "vae_decoder_fp32"):
                    images = self._decode_with(fp32, z)
        if not torch.isfinite(images).all():
            raise NumericalError("the VAE decoder gave NaN or infinite pixels even in fp32")
        return (images / 2 + 0.5).clamp(0, 1)

    def _tiling(self) -> tuple[int, int] | None:
        """(tile, overlap) in latent pixels when VAE tiling is on (MemoryOptions.vae_tiling or
        diffusers' pipe.vae.enable_tiling()): by default diffusers' own geometry, the VAE's
        sample size and a quarter of it."""
        m, vae = self.memory, self.ckpt.vae
        if not (m.vae_tiling or getattr(vae, "use_tiling", False)):
            return None
        size = vae.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        tile = m.tile or max(int(size / self.info.vae_factor), 1)
        overlap = m.tile_overlap if m.tile_overlap is not None else tile - int(tile * 0.75)
        if not 0 <= overlap < tile:
            raise InvalidArgumentError(f"tile_overlap {overlap} must be in [0, tile={tile})")
        return tile, overlap

    def _decode_with(self, decoder, z: torch.Tensor) -> torch.Tensor:
        tiling = self._tiling()
        if self.memory.vae_slicing or getattr(self.ckpt.vae, "use_slicing", False):  # one image at a time
            return decode_sliced(lambda one: self._decode_one(decoder, one, tiling), z)
        return self._decode_one(decoder, z, tiling)

    def _decode_one(self, decoder, z: torch.Tensor, tiling) -> torch.Tensor:
        return decoder(z) if tiling is None else decode_tiled(decoder, z, self.info.vae_factor, *tiling)
