"""The images API's requests and errors, as OpenAI's: parsing and checking, no web framework.

A generations body is JSON; an edits body is multipart form data, whose values arrive as
strings (the `openai` client sends numbers as text there), so each field is read by kind.
Everything is checked before a request is queued; a problem is an APIError that the app
turns into OpenAI's error JSON.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..arguments import ARGS, BY_NAME, SEED_LIMIT, check_value, field, form_value
from ..errors import InvalidArgumentError
from ..images import as_mask, as_rgb
from ..prompts import A1111, lora_tags
from ..settings import check_size, draw_seed

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_SIZE = re.compile(r"^\s*(\d{1,6})\s*x\s*(\d{1,6})\s*$")


class APIError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: no upload, prompt, image count or size is unbounded."""

    max_n: int = 10  # images per request (OpenAI's own limit)
    max_side: int = 2048  # pixels per side, of the output and of uploaded images
    max_prompt_chars: int = 4000  # DALL-E 3's limit; CLIP reads the first 77 tokens anyway
    max_steps: int = 200
    max_upload_bytes: int = 25 * 2**20  # a whole edits body
    max_json_bytes: int = 1 * 2**20  # a whole generations body


@dataclass(frozen=True)
class ImageRequest:
    """One checked request: fastsd's arguments plus how to return the images."""

    prompt: str
    negative_prompt: str | None
    n: int
    width: int | None  # None: the checkpoint's size (edits: the image's)
    height: int | None
    seed: int  # image j uses seed + j, alone or batched
    settings: tuple[tuple[str, Any], ...]  # the call arguments given that a batch shares (the table's batch keys)
    output_format: str
    output_compression: int
    image: Image.Image | None = None  # edits: RGB
    mask: Image.Image | None = None  # edits: L, white = repaint
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale) of the server's LoRAs to fuse, in order
    control_image: tuple[Image.Image, ...] = ()  # one per ControlNet of the server (none: no ControlNet)
    ip_image: tuple[Image.Image, ...] = ()  # ip_adapter_image: one per IP-Adapter of the server (none: no image prompt)
    hires: Any = None  # a hires fix (fastsd.hires.Hires): the batch runs Pipeline.hires_fix

    @property
    def mode(self) -> str:
        return "txt2img" if self.image is None else "img2img" if self.mask is None else "inpaint"

    @property
    def lora_tags(self) -> tuple:
        """The <lora:NAME:W> tags of its texts (prompt_syntax a1111): a batch runs on one set."""
        if dict(self.settings).get("prompt_syntax") != A1111:
            return ()
        try:
            return tuple(tag for text in (self.prompt, self.negative_prompt or "") for tag in lora_tags(text)[1])
        except InvalidArgumentError:
            return ()  # the pipeline's check names the problem

    def call_kwargs(self) -> dict:
        """Pipeline keywords shared by every image of the request (not prompt, seed or n)."""
        return {**dict(self.settings), "height": self.height, "width": self.width}

    def control_kwargs(self, images: list[tuple[Image.Image, ...]] | None = None) -> dict:
        """control_image for the pipeline: this request's (or, for a batch, `images`: each
        request's), a list per ControlNet where there are several."""
        if not self.control_image:
            return {}
        rows = images if images is not None else [self.control_image]
        per_net = [[r[j] for r in rows] for j in range(len(self.control_image))]
        per_net = [imgs[0] if len(imgs) == 1 else imgs for imgs in per_net]
        return {"control_image": per_net[0] if len(per_net) == 1 else per_net}


    @property
    def ip_key(self) -> tuple:
        """Its image prompts' pixels, hashed: a batch shares one image prompt per adapter."""
        return tuple(hashlib.sha256(im.tobytes()).hexdigest() for im in self.ip_image)

    def ip_kwargs(self) -> dict:
        """ip_adapter_image for the pipeline (the batch's: every request of it has the same)."""
        if not self.ip_image:
            return {}
        return {"ip_adapter_image": self.ip_image[0] if len(self.ip_image) == 1 else list(self.ip_image)}


def argument_error(e: InvalidArgumentError) -> APIError:
    """A pipeline argument's error as OpenAI's 400, naming the field the client sent."""
    return bad(e.named(lambda name: f"'{field(name)}'"), field(e.param) if e.param else None, "invalid_value")


# ---- fields ------------------------------------------------------------------------------

# the table's fields read with OpenAI's own rules (or as uploads)
_OWN = ("prompt", "n", "size", "image", "mask", "control_image", "ip_adapter_image")
_TABLE = tuple(a for a in ARGS if a.http is not None and a.http not in _OWN)  # read by the table's kinds
_FASTSD = tuple(a.http for a in _TABLE) + ("lora", "control_image", "ip_adapter_image")
MAX_LORA_SCALE = 10.0
_OPENAI = ("prompt", "n", "size", "response_format", "output_format", "output_compression", "model", "user",
           "quality", "style", "background", "moderation", "stream", "partial_images", "input_fidelity")
# OpenAI settings fastsd has no counterpart for: the values that mean "nothing special" pass
_ONLY = {"quality": ("auto", "standard"), "background": ("auto", "opaque"), "moderation": ("auto", "low"),
         "input_fidelity": ("low",), "style": (), "stream": (False, "false"), "partial_images": (0, "0")}
_HINT = {"quality": "set num_inference_steps instead", "style": "describe the style in the prompt",
         "background": "fastsd draws opaque images", "stream": "the images come back in one response",
         "partial_images": "the images come back in one response"}


class _Fields:
    """Reads typed fields from a JSON object (typed values) or a form (strings)."""

    def __init__(self, data: dict, form: bool):
        self.data, self.form = data, form

    def raw(self, name: str):
        v = self.data.get(name)
        return None if v is None or (self.form and v == "") else v

    def text(self, name: str, limit: int | None = None, required: bool = False) -> str | None:
        v = self.raw(name)
        if v is None:
            if required:
                raise bad(f"'{name}' is required", name, "missing_required_parameter")
            return None
        if not isinstance(v, str):
            raise bad(f"'{name}' must be a string, got {_kind(v)}", name, "invalid_type")
        if limit is not None and len(v) > limit:
            raise bad(f"'{name}' is {len(v)} characters long; the limit is {limit}", name, "string_above_max_length")
        return v

    def _parsed(self, name: str, convert, what: str):
        """The field's value; in a form, text converted (None when absent)."""
        v = self.raw(name)
        if v is not None and self.form and isinstance(v, str):
            try:
                return convert(v.strip())
            except ValueError:
                raise bad(f"'{name}' must be {what}, got {v!r}", name, "invalid_type") from None
        return v

    def integer(self, name: str, default: int | None, lo: int, hi: int | None) -> int | None:
        v = self._parsed(name, int, "an integer")
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer() and not self.form:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(f"'{name}' must be an integer, got {_kind(v)}", name, "invalid_type")
        if v < lo or (hi is not None and v > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise bad(f"'{name}' must be {bounds}, got {v}", name, "invalid_value")
        return v


def _kind(v) -> str:
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else f"a string of {len(v)} characters"
    return {bool: "a boolean", dict: "an object", list: "an array", int: repr(v), float: repr(v)}.get(type(v), repr(v))


def _size(value: str | None) -> tuple[int | None, int | None]:
    """OpenAI's size "WIDTHxHEIGHT" (or "auto": the default)."""
    if value is None or value == "auto":
        return None, None
    m = _SIZE.match(value)
    if not m:
        raise bad(f"'size' must be WIDTHxHEIGHT in pixels (for example 512x512), got {value!r}", "size",
                  "invalid_value")
    return int(m.group(1)), int(m.group(2))


def parse_loras(value, form: bool, available: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """The `lora` field: a name ("name", "name:0.7", "name.safetensors"), an object {"name",
    "scale"}, or a list of those; a form field takes "name[:scale]" items separated by
    commas. Only the server's own LoRAs (--lora / --lora-dir) can be named."""
    if value is None:
        return ()
    if form and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    items = value if isinstance(value, list) else [value]
    out: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, dict):
            extra = [k for k in item if k not in ("name", "scale")]
            if extra or not isinstance(item.get("name"), str):
                raise bad("each 'lora' object is {\"name\": ..., \"scale\": ...}", "lora", "invalid_type")
            name, scale = item["name"], item.get("scale", 1.0)
        elif isinstance(item, str):
            name, sep, tail = item.rpartition(":")
            if not sep:
                name, scale = item, 1.0
            else:
                try:
                    scale = float(tail)
                except ValueError:
                    raise bad(f"'lora' {item!r}: the scale after ':' is not a number", "lora",
                              "invalid_value") from None
        else:
            raise bad(f"'lora' must be a name, an object or a list of them, got {_kind(item)}", "lora", "invalid_type")
        name = name.removesuffix(".safetensors")
        if name not in available:
            have = ", ".join(available) or "none (start the server with --lora or --lora-dir)"
            raise bad(f"unknown LoRA {name!r}; this server has: {have}", "lora", "lora_not_found")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) <= MAX_LORA_SCALE:
            raise bad(f"a LoRA scale must be a number in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], got {scale!r}",
                      "lora", "invalid_value")
        if any(n == name for n, _ in out):
            raise bad(f"LoRA {name!r} is named twice", "lora", "invalid_value")
        out.append((name, float(scale)))
    return tuple(out)


def parse_control(f: "_Fields", form: bool, limits: Limits, uploads: list[bytes] | None = None,
                  name: str = "control_image") -> tuple:
    """`control_image` (or `ip_adapter_image`): in JSON a base64 image, or a data URL, or a list
    of them, one per ControlNet (IP-Adapter); in a form, the uploaded files, in order (its
    settings are table fields)."""
    raw = f.raw(name)
    if form:
        if raw is not None:
            raise bad(f"'{name}' must be a file upload", name, "invalid_type")
        images = [read_upload(data, name, limits) for data in uploads or ()]
    else:
        encoded = raw if isinstance(raw, list) else [] if raw is None else [raw]
        if not all(isinstance(e, str) for e in encoded) or (isinstance(raw, list) and not raw):
            raise bad(f"'{name}' must be a base64-encoded image (or a data URL), or a list of them", name,
                      "invalid_type")
        images = [read_upload(decode_base64(e, name), name, limits) for e in encoded]
    return tuple(as_rgb(im) for im in images)


def _table_value(f: "_Fields", form: bool, name: str, http: str):
    """Field `http` as argument `name`: form text converted by the row's kind, then checked by
    the table (None: absent). Raises InvalidArgumentError."""
    value = f.raw(http)
    if form and isinstance(value, str):
        value = form_value(name, value)
    return check_value(name, value)


def _arguments(f: "_Fields", form: bool) -> dict[str, Any]:
    """The table's fields the body has, by API name, checked by the table (form text converted first)."""
    try:
        values = {arg.name: _table_value(f, form, arg.name, arg.http) for arg in _TABLE}
    except InvalidArgumentError as e:
        raise argument_error(e) from None
    negative = values.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):  # the API takes a list; a request is one prompt
        raise bad(f"'negative_prompt' must be a string, got {_kind(negative)}", "negative_prompt", "invalid_type")
    values["prompt_syntax"] = values["prompt_syntax"] or A1111  # the server reads prompts as the web UI does
    return {k: v for k, v in values.items() if v is not None}


def _limit(args: dict, name: str, hi: int, why: str) -> None:
    if args.get(name) is not None and (len(args[name]) if isinstance(args[name], str) else args[name]) > hi:
        raise bad(f"'{field(name)}' {why}", field(name), "invalid_value")


def decode_base64(text: str, param: str) -> bytes:
    """A base64 field's bytes (a data URL's too); not base64: a 400 naming `param`."""
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"'{param}' is not valid base64", param, "invalid_image") from None


def parse_request(data, *, form: bool, limits: Limits, factor: int, model_names: tuple[str, ...],
                  image: Image.Image | None = None, mask: Image.Image | None = None,
                  loras: tuple[str, ...] = (), control_uploads: list[bytes] | None = None,
                  ip_uploads: list[bytes] | None = None) -> ImageRequest:
    """Check a generations (JSON) or edits (form) body; `image` / `mask` are the decoded
    uploads, `control_uploads` / `ip_uploads` the control_image / ip_adapter_image files of an
    edits body."""
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {_kind(data)}")
    unknown = [k for k in data if k not in _OPENAI and k not in _FASTSD]
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    f = _Fields(data, form)
    model = f.text("model")
    if model is not None and model not in model_names:
        raise APIError(404, f"The model '{model}' does not exist; this server runs "
                            f"{' / '.join(repr(m) for m in model_names)}", "model", "model_not_found")
    f.text("user", limit=256)
    for name, allowed in _ONLY.items():
        v = f.raw(name)
        if v is not None and v not in allowed:
            hint = _HINT.get(name)
            raise bad(f"'{name}' {v!r} is not supported by fastsd" + (f": {hint}" if hint else ""), name,
                      "unsupported_value")
    prompt = f.text("prompt", limits.max_prompt_chars, required=True)
    if not prompt.strip():
        raise bad("'prompt' is empty", "prompt", "invalid_value")
    fmt = f.text("response_format") or "b64_json"
    if fmt != "b64_json":
        raise bad(f"'response_format' {fmt!r} is not supported: fastsd returns images inline; use 'b64_json'",
                  "response_format", "unsupported_value")
    out = (f.text("output_format") or "png").lower()
    if out not in OUTPUT_FORMATS:
        raise bad(f"'output_format' must be one of {', '.join(OUTPUT_FORMATS)}, got {out!r}", "output_format",
                  "invalid_value")
    compression = f.integer("output_compression", 100, 0, 100)
    args = _arguments(f, form)
    n = _sizes(f, form, factor, limits, args)
    _limit(args, "negative_prompt", limits.max_prompt_chars, f"is longer than {limits.max_prompt_chars} characters")
    _limit(args, "num_inference_steps", limits.max_steps, f"must be at most {limits.max_steps} on this server")
    _limit(args, "seed", SEED_LIMIT - n, f"must be at most {SEED_LIMIT - n} with n={n} (image j uses seed + j)")
    seed = args.pop("seed", None)
    lora = parse_loras(f.raw("lora"), form, loras)
    control_image = parse_control(f, form, limits, control_uploads)
    ip_image = parse_control(f, form, limits, ip_uploads, "ip_adapter_image")
    negative = args.pop("negative_prompt", None)
    width, height = args.pop("width", None), args.pop("height", None)
    if image is not None and width is None:  # an edit is the image's size, with a mask too, as OpenAI's (the
        # Python API's inpaint defaults to the checkpoint's, as diffusers'), down to a multiple of the VAE factor
        width, height = (max(side // factor * factor, factor) for side in image.size)
    settings = tuple((k, v) for k, v in args.items() if BY_NAME[k].batch_key)
    return ImageRequest(prompt, negative, n, width, height, draw_seed(n) if seed is None else seed, settings, out,
                        compression, image, mask, lora, control_image, ip_image)


def _sizes(f: "_Fields", form: bool, factor: int, limits: Limits, args: dict) -> int:
    """`n` and `size` (OpenAI's fields for num_images_per_prompt and width x height) into
    `args`, checked by the table, then by the server's limits; returns n."""
    try:
        n = _table_value(f, form, "num_images_per_prompt", "n")
        width, height = _size(f.text("size"))
        for name, value in (("width", width), ("height", height)):
            if value is not None:
                args[name] = check_size(value, factor, name, limits.max_side)
    except InvalidArgumentError as e:
        raise argument_error(e) from None
    n = 1 if n is None else n
    if n > limits.max_n:
        raise bad(f"'n' must be at most {limits.max_n} on this server, got {n}", "n", "invalid_value")
    return n


# ---- uploads ---------------------------------------------------------------------------


def read_upload(data: bytes, param: str, limits: Limits) -> Image.Image:
    """Decode an uploaded image without trusting it: not an image, truncated, or over the
    size limit (checked from the header, before the pixels are decoded) is a 400."""
    if not data:
        raise bad(f"'{param}' is an empty file", param, "invalid_image")
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w > limits.max_side or h > limits.max_side:
            raise bad(f"'{param}' is {w}x{h}; the server takes images of at most {limits.max_side} pixels a side",
                      param, "image_too_large")
        im.load()
    except APIError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise bad(f"'{param}' is not an image fastsd can read (PNG, JPEG or WebP)", param, "invalid_image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise bad(f"'{param}' could not be decoded: {e}", param, "invalid_image") from None
    return im


def edit_inputs(image: Image.Image, mask: Image.Image | None) -> tuple[Image.Image, Image.Image | None]:
    """OpenAI's edit semantics in fastsd's terms: where the mask is fully transparent (alpha 0)
    is repainted; a mask with no transparent pixel is read as diffusers reads one (white =
    repaint). Without a mask, an image with transparent pixels has those repainted (OpenAI's
    dall-e-2 edits), and an opaque image is img2img. A mask must have the image's size."""
    if mask is not None and mask.size != image.size:
        raise bad(f"'mask' is {mask.size[0]}x{mask.size[1]} but 'image' is {image.size[0]}x{image.size[1]}: they "
                  "must have the same size", "mask", "invalid_image")
    if mask is not None:
        mask = _transparent(mask) or as_mask(mask)
    else:
        mask = _transparent(image)
    return as_rgb(image), mask


def _transparent(im: Image.Image) -> Image.Image | None:
    """White where `im` is fully transparent, black elsewhere; None if no pixel is."""
    if not (im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)):
        return None
    clear = im.convert("RGBA").getchannel("A").point(lambda a: 255 if a == 0 else 0)
    return clear if clear.getextrema()[1] > 0 else None


def encode_image(im: Image.Image, fmt: str, compression: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, "PNG")
    else:
        im.save(buf, OUTPUT_FORMATS[fmt], quality=max(compression, 1))
    return buf.getvalue()
