"""Every argument of a pipeline call, described once.

One row per argument of `Pipeline.__call__`: its name, kind, default, range, a one-line
doc, its `fastsd generate` flag, its field over HTTP and whether requests must agree on it
to share a server batch. The front ends are built from this table: `Pipeline.__call__`
keeps diffusers' explicit signature (a test holds it equal to the table), `make_request`
(fastsd/settings.py) runs the table's checks before its own cross-field rules, the CLI adds
its flags and their help from it, and the server reads its fields with it. An error names
its argument (`InvalidArgumentError.param`) and each front end shows the name its user
typed: `label(name)` here for the CLI and `field(name)` for HTTP.

Adding a call argument: a row here, the `settings.Request` field `make_request` fills from it
(none for the `run` group's, which say how a call runs), and the code that uses the value.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from .errors import InvalidArgumentError
from .sampler_names import SAMPLER_NAMES

SEED_LIMIT = 2**32  # torch's CPU generator (mt19937, diffusers' noise source) reads a seed's low 32 bits
MAX_GUIDANCE = 100.0  # front ends stop at 30; far beyond, fp16 latents overflow to NaN
MAX_ETA = 1.0  # DDIM: eta > 1 takes the square root of a negative variance
MAX_CONTROL_SCALE = 10.0  # front ends stop at 2; far beyond, residuals swamp the UNet's own activations
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class _Family:
    """The default of an argument the model family and the mode decide (None in the API)."""

    def __repr__(self) -> str:
        return "FAMILY"


FAMILY = _Family()

# Kinds, and what the table's own check takes for each (None always passes: "not given")
#   text      a string or a non-empty list of strings       int     an integer in [lo, hi]
#   float     a finite number in [lo, hi]                   numbers a non-empty list of finite numbers >= 0
#   scales    a number in [lo, hi] or a list, one per ControlNet
#   pair      two integers in [0, 10**6]                    size    an integer (pixels; the factor: later)
#   choice    one of `choices`                              sampler a fastsd sampler name or a diffusers scheduler
#   image, images, tensor, generator, callable, names, bool, any: checked where they are used
KINDS = ("text", "int", "float", "numbers", "scales", "pair", "size", "choice", "sampler", "image", "images",
         "tensor", "generator", "callable", "names", "bool", "any")


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str
    default: Any = None  # the API default; FAMILY: None there, the family's default for the mode
    doc: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    flag: str | None = None  # `fastsd generate` flag (None: the CLI has none)
    http: str | None = None  # the field over HTTP (None: not accepted there)
    batch_key: bool = False  # requests share a server batch only where they agree on it
    group: str = "call"  # call: a Request field; run: how the call runs; xl: SD-XL only; control: ControlNets;
    # ip: IP-Adapters
    default_doc: str | None = None  # the help's words for the default, where the value alone does not say it

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"argument {self.name}: unknown kind {self.kind!r}")

    @property
    def api_default(self):
        return None if self.default is FAMILY else self.default

    def help(self) -> str:
        default = self.default_doc or (None if self.default is None else str(self.default))
        return self.doc + (f" (default: {default})" if default else "")


ARGS: tuple[Arg, ...] = (
    Arg("prompt", "text", doc="what to draw", http="prompt"),
    Arg("negative_prompt", "text", doc="what to steer away from", flag="--negative-prompt",
        http="negative_prompt", default_doc="none"),
    Arg("image", "image", doc="init image: img2img, or inpainting with a mask", flag="--image", http="image"),
    Arg("mask_image", "image", doc="inpainting mask, white = repaint", flag="--mask", http="mask"),
    Arg("strength", "float", FAMILY, "how much of the image is repainted", lo=0.0, hi=1.0, flag="--strength",
        http="strength", batch_key=True, default_doc="img2img 0.8, inpaint 1.0; SD-XL 0.3, 0.9999"),
    Arg("num_inference_steps", "int", 50, "denoising steps", lo=1, flag="--steps", http="num_inference_steps",
        batch_key=True),
    Arg("guidance_scale", "float", FAMILY, "CFG scale; <= 1 disables CFG", lo=0.0, hi=MAX_GUIDANCE,
        flag="--guidance", http="guidance_scale", batch_key=True, default_doc="7.5; SD-XL 5.0, SD-XL inpaint 7.5"),
    Arg("scheduler", "sampler", None, "the sampler", flag="--scheduler", http="scheduler", batch_key=True,
        default_doc="the checkpoint's own, as diffusers"),
    Arg("eta", "float", 0.0, "DDIM's noise (0 = deterministic)", lo=0.0, hi=MAX_ETA, flag="--eta", http="eta",
        batch_key=True),
    Arg("generator", "generator", doc="a torch.Generator, or one per image", group="run"),
    Arg("seed", "int", doc="the seed of the call's generator", lo=0, hi=SEED_LIMIT - 1, flag="--seed",
        http="seed", group="run", default_doc="a random seed, reported"),
    Arg("height", "size", doc="pixels, a multiple of the VAE factor", flag="--height", http="size", batch_key=True,
        default_doc="the checkpoint's; img2img: the image's"),
    Arg("width", "size", doc="pixels, a multiple of the VAE factor", flag="--width", http="size", batch_key=True,
        default_doc="as height"),
    Arg("num_images_per_prompt", "int", 1, "images per prompt", lo=1, flag="--n", http="n"),
    Arg("output_type", "choice", "pil", "pil | np | pt | latent", choices=OUTPUT_TYPES),
    Arg("callback", "callable", doc="callback(step, t, latents) after sampler steps", group="run"),
    Arg("callback_steps", "int", 1, "call `callback` every this many steps", lo=1, group="run"),
    Arg("callback_on_step_end", "callable", doc="diffusers' callback(pipe, step, t, kwargs)", group="run"),
    Arg("callback_on_step_end_tensor_inputs", "names", ("latents",), "tensors callback_on_step_end receives",
        group="run"),
    Arg("latents", "tensor", doc="the initial noise instead of drawing it"),
    Arg("prompt_embeds", "tensor", doc="text embeddings instead of prompts"),
    Arg("negative_prompt_embeds", "tensor", doc="negative text embeddings"),
    Arg("guidance_rescale", "float", 0.0, "rescales CFG's output toward the conditional one's spread (Lin et "
        "al. 2023)", lo=0.0, hi=1.0, flag="--guidance-rescale", http="guidance_rescale", batch_key=True),
    Arg("timesteps", "numbers", doc="a custom schedule of timesteps (samplers that take one)",
        flag="--timesteps", http="timesteps", batch_key=True),
    Arg("sigmas", "numbers", doc="a custom schedule of sigmas, ending where sampling ends", flag="--sigmas",
        http="sigmas", batch_key=True),
    Arg("clip_skip", "int", doc="text embeddings from CLIP layer -(N+1)", lo=0, default_doc="the load-time setting"),
    Arg("return_dict", "bool", True, "False: the tuple (images, None)", group="run"),
    Arg("prompt_2", "text", doc="SD-XL: the second text encoder's prompt", flag="--prompt-2", group="xl",
        default_doc="the prompt"),
    Arg("negative_prompt_2", "text", doc="SD-XL: the second text encoder's negative prompt",
        flag="--negative-prompt-2", group="xl", default_doc="the negative prompt"),
    Arg("pooled_prompt_embeds", "tensor", doc="SD-XL: pooled embeddings with prompt_embeds", group="xl"),
    Arg("negative_pooled_prompt_embeds", "tensor", doc="SD-XL: pooled negative embeddings", group="xl"),
    Arg("original_size", "pair", doc="SD-XL micro-conditioning: H,W", flag="--original-size", group="xl",
        default_doc="the image size"),
    Arg("crops_coords_top_left", "pair", doc="SD-XL micro-conditioning: TOP,LEFT", flag="--crops-coords-top-left",
        group="xl", default_doc="0,0"),
    Arg("target_size", "pair", doc="SD-XL micro-conditioning: H,W", flag="--target-size", group="xl",
        default_doc="the image size"),
    Arg("negative_original_size", "pair", doc="SD-XL negative micro-conditioning: H,W", group="xl",
        flag="--negative-original-size"),
    Arg("negative_crops_coords_top_left", "pair", doc="SD-XL negative micro-conditioning: TOP,LEFT", group="xl",
        flag="--negative-crops-coords-top-left"),
    Arg("negative_target_size", "pair", doc="SD-XL negative micro-conditioning: H,W", group="xl",
        flag="--negative-target-size"),
    Arg("preview_every", "int", doc="a TAESD preview every K steps, to callback_on_step_end", lo=1, group="run"),
    Arg("control_image", "images", doc="the conditioning image of each ControlNet", flag="--control-image",
        http="control_image", group="control"),
    Arg("controlnet_conditioning_scale", "scales", FAMILY, "ControlNet scale, one for all or one per ControlNet",
        lo=0.0, hi=MAX_CONTROL_SCALE, flag="--control-scale", http="controlnet_conditioning_scale", batch_key=True,
        group="control", default_doc="1.0 txt2img, 0.8 img2img, 0.5 inpaint"),
    Arg("control_guidance_start", "scales", 0.0, "the fraction of steps before a ControlNet acts", lo=0.0, hi=1.0,
        flag="--control-start", http="control_guidance_start", batch_key=True, group="control"),
    Arg("control_guidance_end", "scales", 1.0, "the fraction of steps after which it stops", lo=0.0, hi=1.0,
        flag="--control-end", http="control_guidance_end", batch_key=True, group="control"),
    Arg("ip_adapter_image", "images", doc="the image prompt of each IP-Adapter (pipe.load_ip_adapter)",
        flag="--ip-image", http="ip_adapter_image", group="ip"),
    Arg("ip_adapter_image_embeds", "any", doc="precomputed image prompt features, one tensor per IP-Adapter",
        group="ip"),
    Arg("prompt_syntax", "choice", "plain", "how prompts are read: plain (diffusers: literal text, 77 tokens) | "
        "a1111 (AUTOMATIC1111's: (word:1.2) weights, BREAK, prompts past 77 tokens)", choices=("plain", "a1111"),
        flag="--prompt-syntax", http="prompt_syntax", batch_key=True,
        default_doc="plain in the Python API, a1111 in the CLI and the server"),
)
BY_NAME: dict[str, Arg] = {a.name: a for a in ARGS}
GROUP: dict[str, tuple[str, ...]] = {g: tuple(a.name for a in ARGS if a.group == g)
                                     for g in ("call", "run", "xl", "control", "ip")}


def defaults() -> dict[str, Any]:
    """Every argument at its API default."""
    return {a.name: a.api_default for a in ARGS}


def label(name: str) -> str:
    """How the CLI names an argument: its flag (its API name where it has none)."""
    arg = BY_NAME.get(name)
    return arg.flag if arg is not None and arg.flag else name


def field(name: str) -> str:
    """How the server names an argument: its HTTP field (its API name where it has none)."""
    arg = BY_NAME.get(name)
    return arg.http if arg is not None and arg.http else name


def bad_value(name: str, detail: str, *also: str) -> InvalidArgumentError:
    return InvalidArgumentError(detail, name, also=also)


def _got(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__} ({text[:40]}...)"


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else f"{x:g}"


def _bounds(lo, hi) -> str:
    if hi is None:
        return f">= {_num(lo)}"
    return f"in [{_num(lo)}, {_num(hi)}]"


def _real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _float(arg: Arg, value) -> float:
    if not _real(value):
        raise bad_value(arg.name, f"must be a finite number, got {_got(value)}")
    if (arg.lo is not None and value < arg.lo) or (arg.hi is not None and value > arg.hi):
        raise bad_value(arg.name, f"must be {_bounds(arg.lo, arg.hi)}, got {_num(value)}")
    return float(value)


def _int(arg: Arg, value) -> int:
    in_range = isinstance(value, numbers.Integral) and (arg.lo is None or value >= arg.lo) and (
        arg.hi is None or value <= arg.hi)
    if isinstance(value, bool) or not in_range:
        bounds = f" {_bounds(arg.lo, arg.hi)}" if arg.lo is not None else ""
        raise bad_value(arg.name, f"must be an integer{bounds}, got {_got(value)}")
    return int(value)


def _numbers(arg: Arg, value) -> tuple[float, ...]:
    items = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(items, (list, tuple)) or not items or not all(_real(v) and v >= 0 for v in items):
        raise bad_value(arg.name, f"must be a non-empty list of finite numbers >= 0, got {_got(value)}")
    return tuple(float(v) for v in items)


def _scales(arg: Arg, value):
    if isinstance(value, (list, tuple)):
        if not value:
            raise bad_value(arg.name, "must be a number or a list of one per ControlNet, got []")
        return tuple(_float(arg, v) for v in value)
    return _float(arg, value)


def _pair(arg: Arg, value) -> tuple[int, int]:
    items = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(items, (list, tuple)) or len(items) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= 10**6 for v in items):
        raise bad_value(arg.name, f"must be two integers in [0, 10**6], got {_got(value)}")
    return int(items[0]), int(items[1])


def _size(arg: Arg, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # the pipeline checks its factor
        raise bad_value(arg.name, f"must be a positive multiple of the VAE factor (pixels), got {_got(value)}")
    return int(value)


def _choice(arg: Arg, value):
    if value not in arg.choices:
        raise bad_value(arg.name, f"must be one of {', '.join(arg.choices)}, got {_got(value)}")
    return value


def _sampler(arg: Arg, value):
    if isinstance(value, str) and value not in SAMPLER_NAMES:
        raise bad_value(arg.name, f"must be one of fastsd's samplers ({', '.join(SAMPLER_NAMES)}), got {value!r}")
    return value  # a scheduler object is mapped (or refused) by schedulers.choose_scheduler


def _text(arg: Arg, value):
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
        raise bad_value(arg.name, f"must be a string or a non-empty list of strings, got {_got(value)}")
    for p in items:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: not text any tokenizer can read
            raise bad_value(arg.name, f"is not valid Unicode text (lone surrogate {p[e.start]!r} at position "
                                      f"{e.start})") from None
    return value


def _callable(arg: Arg, value):
    if not callable(value):
        raise bad_value(arg.name, f"must be callable, not {type(value).__name__}")
    return value


def _bool(arg: Arg, value):
    if not isinstance(value, bool):
        raise bad_value(arg.name, f"must be True or False, got {_got(value)}")
    return value


_CHECKS: dict[str, Callable[[Arg, Any], Any]] = {
    "text": _text, "int": _int, "float": _float, "numbers": _numbers, "scales": _scales, "pair": _pair,
    "size": _size, "choice": _choice, "sampler": _sampler, "callable": _callable, "bool": _bool}


def check_value(name: str, value):
    """`value` checked (and normalised: floats, tuples) as the table's row `name` says; None
    passes (not given). Raises InvalidArgumentError naming the argument."""
    arg = BY_NAME[name]
    check = _CHECKS.get(arg.kind)
    return value if value is None or check is None else check(arg, value)


def check_values(values: dict[str, Any]) -> dict[str, Any]:
    """Every given value checked by its row, in the table's order (the first bad one raises)."""
    return {name: check_value(name, value) if name in BY_NAME else value for name, value in values.items()}


def unknown(names) -> None:
    """Raise for arguments that are not the table's (diffusers' arguments fastsd lacks)."""
    names = [n for n in names if n not in BY_NAME]
    if names:
        more = f" (nor {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""
        raise InvalidArgumentError(f"fastsd's pipeline does not support the argument {names[0]!r}{more}")


def cli_value(name: str, text: str):
    """A flag's text as the argument's value (int and float flags are converted by argparse)."""
    arg = BY_NAME[name]
    try:
        if arg.kind == "numbers":
            return [float(v) for v in text.split(",") if v.strip()]
        if arg.kind == "pair":
            return [int(v) for v in text.split(",")]
    except ValueError:
        what = "numbers" if arg.kind == "numbers" else "two integers"
        raise bad_value(name, f"must be {what} separated by commas, got {text!r}") from None
    return text


def form_value(name: str, text: str):
    """A form field's text (multipart: every value is a string) as the argument's value."""
    arg = BY_NAME[name]
    try:
        if arg.kind == "int":
            return int(text.strip())
        if arg.kind == "float":
            return float(text.strip())
        if arg.kind in ("numbers", "scales"):
            items = [float(v) for v in text.split(",") if v.strip()]
            return items[0] if arg.kind == "scales" and len(items) == 1 else items
    except ValueError:
        what = {"int": "an integer", "float": "a number"}.get(arg.kind, "numbers separated by commas")
        raise bad_value(name, f"must be {what}, got {text!r}") from None
    return text
