"""The diffusers-compatible surface of fastsd's Pipeline: its components, scheduler,
memory switches, device moves, progress-bar options, and a clear error for diffusers
methods fastsd does not have. A mixin: Pipeline (fastsd/pipeline.py) is the one class."""

from __future__ import annotations

from dataclasses import replace

import torch

from .devices import parse_device
from .engines import DTYPES, PRECISION_NAMES, compute_dtype, precision_of
from .errors import InvalidArgumentError, UnsupportedError
from .schedulers import SchedulerChoice, choose_scheduler

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
    "enable_freeu": "not supported", "save_pretrained": "not supported",
    "components": "fastsd's networks are pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer",
    "encode_prompt": "pass prompt_embeds= computed with pipe.text_encoder, or prompts",
}


def dtype_name(dtype, torch_dtype) -> str | None:
    """fastsd's precision name from dtype= ("fp16", or a torch dtype) and diffusers' torch_dtype=."""
    names = []
    for what, value in (("dtype", dtype), ("torch_dtype", torch_dtype)):
        if value is None:
            continue
        if isinstance(value, torch.dtype) and precision_of(value):
            names.append(precision_of(value))
        elif isinstance(value, str) and value in (DTYPES if what == "torch_dtype" else PRECISION_NAMES):
            names.append(value)
        elif isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype) and \
                precision_of(getattr(torch, value)):
            names.append(precision_of(getattr(torch, value)))
        else:
            raise InvalidArgumentError(f"must be one of {', '.join(PRECISION_NAMES)} (or torch.float16, "
                                       f"torch.bfloat16, torch.float32), got {value!r}", what)
    if len(set(names)) > 1:
        raise InvalidArgumentError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree")
    return names[0] if names else None


class DiffusersSurface:
    """What a diffusers pipeline offers besides its call, on fastsd's Pipeline."""

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

    def __getattr__(self, name: str):
        """A diffusers pipeline method fastsd lacks is a clear error naming it, not a bare
        AttributeError (still one: hasattr() answers False)."""
        if name in _DIFFUSERS_ONLY:
            raise UnsupportedError(f"fastsd's Pipeline does not support diffusers' {name}(): {_DIFFUSERS_ONLY[name]}")
        raise AttributeError(f"'Pipeline' object has no attribute {name!r}")

    def to(self, *args, **kwargs) -> "DiffusersSurface":
        """As diffusers: pipe.to("cuda"), pipe.to(torch.float16), pipe.to("cuda", torch.float16),
        pipe.to(device=..., dtype=...). Moving reloads the backend for the new device and
        precision (engines are per device and precision). Returns the pipeline."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise InvalidArgumentError(f"to() does not take {next(iter(kwargs))!r}")
        for a in args:
            if isinstance(a, torch.dtype) or (isinstance(a, str) and a in PRECISION_NAMES):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
            else:
                raise InvalidArgumentError(f"to() takes a device and/or a dtype, not {type(a).__name__}")
        dev = self.device if device is None else parse_device(str(device))
        precision = self.precision if dtype is None else dtype_name(dtype, None)
        if (dev, precision) == (self.device, self.precision):
            return self
        if self._graphs is not None and dev.type != "cuda":
            raise InvalidArgumentError("this pipeline was loaded with cuda_graphs, which need a CUDA device")
        if self._remake is None:
            raise InvalidArgumentError("this pipeline was built around a given backend; load it with "
                                       "Pipeline.from_pretrained(..., device=, dtype=) instead")
        with self._weights_lock.exclusive("pipe.to()"):
            self.backend = self._remake(dev, precision, self._graphs is not None, self.memory.attention_slicing)
            self.device, self.dtype, self.precision = dev, compute_dtype(precision), precision
            if self._preview is not None:
                self._preview = self._preview.to(dev, self.dtype)
            self._reset_graphs()
            modules = self.family.modules(self.ckpt)
            for network, names in self._loras.overridden().items():  # the new backend's engines take the LoRAs too
                params = dict(modules[network].named_parameters())
                self.backend.set_weights(network, {n: params[n].detach() for n in names}, False)
            self._ip_moved()
        return self

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
        self._reset_graphs()  # captured steps hold the old attention

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

    def set_progress_bar_config(self, **kwargs) -> None:
        """As diffusers: options of the per-call tqdm progress bar (`disable=False` shows it;
        fastsd shows none by default: apps that count milliseconds do not want one)."""
        self._progress_config = dict(self._progress_config, **kwargs)

    def _progress_bar(self, total: int):
        if self._progress_config.get("disable", True):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, **{k: v for k, v in self._progress_config.items() if k != "disable"})
