"""The `fastsd` console script. Bad input: one line on stderr, exit code 2, no file written."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path

from . import phases, status
from .components import quiet_loading_bars
from .errors import FastSDError, InvalidArgumentError, OutputPathError
from .files import created_mode
from .sampler_names import SAMPLER_NAMES
from .version import __version__

log = logging.getLogger("fastsd")
EXIT_BAD_INPUT = 2
PNG_KEY = "fastsd"  # PNG text chunk with the JSON settings
PNG_PARAMETERS_KEY = "parameters"  # human-readable line, the key other SD tools read


BACKEND_HELP = ("auto (the fastest engine kind whose engines exist, else eager), an engine kind (`fastsd info` "
                "lists them), or eager (PyTorch)")
# from_pretrained's arguments under their flags (call arguments: the table's, fastsd/arguments.py)
LOAD_FLAGS = {"clip_skip": "--clip-skip", "prediction_type": "--prediction-type", "engine_dir": "--engine-dir",
              "allow_pickle": "--allow-pickle", "cuda_graphs": "--cuda-graphs", "dtype": "--dtype",
              "device": "--device", "backend": "--backend", "variant": "--variant", "max_side": "--max-side",
              "vae": "--vae", "controlnet": "--controlnet"}


FALLBACK_HELP = ("with --backend KIND: run eager PyTorch (with a warning) where that kind has no engine for any "
                 "network, instead of exiting with an error (auto always falls back)")


def flag_label(name: str) -> str:
    """An argument as the CLI user typed it: a call argument's flag, else a load flag."""
    from .arguments import BY_NAME, label

    return label(name) if name in BY_NAME and BY_NAME[name].flag else LOAD_FLAGS.get(name, name)


def _sampler_help(arg) -> str:
    return f"{arg.doc}: {' | '.join(SAMPLER_NAMES)}" + (f" (default: {arg.default_doc})" if arg.default_doc else "")


_CLI_KINDS = {"int": {"type": int, "metavar": "N"}, "size": {"type": int, "metavar": "PIXELS"},
              "float": {"type": float, "metavar": "X"},
              "scales": {"type": float, "action": "append", "metavar": "X"},
              "images": {"action": "append", "metavar": "IMG"}, "image": {"metavar": "IMG"},
              "numbers": {"metavar": "X,Y,..."}, "pair": {"metavar": "A,B"}, "text": {"metavar": "TEXT"},
              "sampler": {"metavar": "NAME"}}


def _call_flags(g) -> None:
    """`fastsd generate`'s flags for call arguments, one per row of the table that has one."""
    from .arguments import ARGS

    for arg in ARGS:
        if arg.flag is None:
            continue
        kind = dict(_CLI_KINDS.get(arg.kind, {}))
        if arg.kind == "sampler":
            help_text = _sampler_help(arg)
        else:
            order = "--ip-adapter" if arg.group == "ip" else "--controlnet"
            repeat = f"; repeatable, in {order} order" if kind.get("action") == "append" else ""
            help_text = arg.help() + repeat
        g.add_argument(arg.flag, dest=arg.name, default=None, help=help_text, **kind)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `fastsd: error: ...`, exit code 2, no usage dump."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"fastsd: error: {message} (see {self.prog} --help)\n")


def _generate_parser(sub_parser) -> None:
    """`fastsd generate`: the call's flags come from the table of call arguments."""
    g = sub_parser("generate", help="generate images from a prompt (txt2img, img2img, inpaint)")
    g.add_argument("prompt", help="what to draw")
    g.add_argument("--model", required=True,
                   help="diffusers folder, single .safetensors file, hub id, or "
                        "synthetic:tiny|sd15|lcm-sd15|sd21|sd-turbo|sdxl|tiny-xl")
    _call_flags(g)
    g.add_argument("--max-side", type=int, default=2048,
                   help="refuse sizes over this many pixels a side (default 2048; a guard against calls that "
                        "would run for hours)")
    g.add_argument("--out", default="fastsd.png", help="output PNG; N images get -0, -1, ... suffixes")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _runtime_flags(g)
    g.add_argument("--vae", default=None,
                   help="a VAE folder, .safetensors file or hub id replacing the checkpoint's (e.g. an fp16-safe "
                        "SD-XL VAE, or TAESD for a fast final decode)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA (.safetensors, kohya or diffusers/PEFT) at SCALE (default 1); repeatable")
    g.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="the folder <lora:NAME:W> prompt tags name NAME.safetensors files in (a1111 syntax)")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual inversion embedding; its token (default: the file's name) is a word of prompts; "
                        "repeatable")
    _guide_flags(g)
    g.add_argument("--hires", type=float, default=None, metavar="SCALE",
                   help="hires fix: generate at the size asked, upscale by SCALE, repaint with img2img "
                        "(Pipeline.hires_fix)")
    g.add_argument("--hires-upscaler", default="Latent", metavar="NAME",
                   help="Latent, Latent (bicubic), ... (the web UI's latent modes), Lanczos, Nearest, or a model "
                        "upscaler: a file, or a name in --upscaler-dir (default: Latent)")
    g.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="the second pass's steps (default: --steps)")
    g.add_argument("--hires-strength", type=float, default=0.7, metavar="S",
                   help="the second pass's denoising strength (default 0.7)")
    g.add_argument("--upscaler-dir", default=None, metavar="DIR",
                   help="the folder of upscaler models (.safetensors: ESRGAN and the others spandrel reads)")
    g.add_argument("--preview", default=None, metavar="FILE.png",
                   help="keep a live preview PNG of the first image updated while denoising (TAESD decodes)")
    g.add_argument("--preview-every", type=int, default=1, metavar="K", help="a preview every K steps (default 1)")
    g.add_argument("--preview-vae", default=None, metavar="M",
                   help="the tiny autoencoder for previews: a TAESD folder or hub id (default: madebyollin/taesd, "
                        "taesdxl for SD-XL, from the hub cache; synthetic:taesd for synthetic models)")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.bin pickle checkpoints")
    g.add_argument("--prediction-type", default=None, help="epsilon | v_prediction (override the checkpoint's)")
    g.add_argument("--clip-skip", type=int, default=0, help="text embeddings from CLIP layer -(N+1)")
    g.add_argument("--attention-slicing", action="store_true", help="less memory for attention (slower)")
    g.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    g.add_argument("--vae-tiling", action="store_true", help="decode in overlapping tiles (large images)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="capture each denoising step (UNet, CFG, sampler update) as a CUDA graph and replay it")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.set_defaults(func=cmd_generate)


def _runtime_flags(g) -> None:
    """What runs the model (generate and serve): backend, device, precision, store, variant."""
    g.add_argument("--backend", default="auto", help=BACKEND_HELP)
    g.add_argument("--allow-fallback", action="store_true", help=FALLBACK_HELP)
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 | int8 (OpenVINO int8 entries)")
    g.add_argument("--engine-dir", default=None,
                   help="engine store (default: $FASTSD_ENGINE_DIR, else ~/.cache/fastsd/engines)")
    g.add_argument("--variant", default=None, help="diffusers folder weight variant, e.g. fp16")


def _guide_flags(g) -> None:
    """generate's ControlNet and IP-Adapter flags (--control-image, --ip-image: the table's)."""
    g.add_argument("--controlnet", action="append", default=[], metavar="M",
                   help="a ControlNet (diffusers folder, .safetensors file, hub id or synthetic:controlnet-<arch>); "
                        "repeatable (multi-ControlNet), one --control-image each, in the same order")
    g.add_argument("--ip-adapter", action="append", default=[], metavar="M",
                   help="an IP-Adapter (its .safetensors file, or a folder holding one, with image_encoder/ beside it; "
                        "synthetic:ip-adapter[-plus]-<arch>): --ip-image is then an image prompt; repeatable, one "
                        "--ip-image each, in the same order")
    g.add_argument("--ip-scale", type=float, action="append", default=[], metavar="S",
                   help="the IP-Adapter's scale (default 1.0): one for all or one per --ip-adapter")
    g.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="the CLIP image encoder of the IP-Adapters (default: the image_encoder/ folder beside each)")


def _export_parser(sub_parser) -> None:
    """`fastsd export`: ONNX into the engine store."""
    e = sub_parser("export", help="export a checkpoint's networks to ONNX into the engine store")
    e.add_argument("--model", required=True, help="as for generate")
    e.add_argument("--dtype", default="fp32", help="fp32 | fp16 (graph precision)")
    e.add_argument("--static", default=None, metavar="HxW", help="fixed height x width (batch stays dynamic)")
    e.add_argument("--engine-dir", default=None,
                   help="engine store (default: $FASTSD_ENGINE_DIR, else ~/.cache/fastsd/engines)")
    e.add_argument("--networks", default=None, help="comma-separated subset to export (default: all the model's)")
    e.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    e.add_argument("--clip-skip", type=int, default=0, help="bake text embeddings from CLIP layer -(N+1)")
    e.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.bin pickle checkpoints")
    e.add_argument("--vae", default=None, help="a VAE folder or .safetensors file replacing the model's")
    e.add_argument("--controlnet", action="append", default=[], metavar="M",
                   help="also export this ControlNet (into an entry of its own) and the UNet with its residual "
                        "inputs; repeatable")
    e.add_argument("--ip-adapter", action="append", default=[], metavar="M",
                   help="the UNet takes this IP-Adapter's image tokens and scale too (its projections as weights: "
                        "another adapter of the same shapes is a refit at load); repeatable")
    e.add_argument("--no-refit", action="store_true",
                   help="trace from scratch even where an entry of the same architecture could be refitted")
    e.add_argument("--no-cpu-graph", action="store_true",
                   help="fp32: do not keep the graphs as ONNX Runtime optimises them for this CPU (they load ~8x "
                        "faster on it; SD 1.5 takes 2.3 GB more disk)")
    e.add_argument("--max-prompt-chunks", type=int, default=None, metavar="K",
                   help="the longest prompt the UNet and ControlNets take, in chunks of 77 tokens (default 3: 225 "
                        "prompt tokens with --prompt-syntax a1111; 1: 77 tokens, as before)")
    e.set_defaults(func=cmd_export)


def _build_parser(sub_parser) -> None:
    """`fastsd build`: an engine kind's engines into the engine store."""
    c = sub_parser("build", help="build an engine kind's engines into the engine store")
    c.add_argument("--model", required=True, help="as for generate")
    c.add_argument("--backend", required=True, help="an engine kind (`fastsd info` lists them and what each needs)")
    c.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default: fp16 on cuda, fp32 on cpu) | int8 "
                   "(openvino: the UNet quantized, calibrated on the checkpoint; needs nncf)")
    c.add_argument("--static", default=None, metavar="HxW", help="image size (default: the checkpoint's)")
    c.add_argument("--device", default=None, help="cuda | cpu: the device the engines are for")
    c.add_argument("--engine-dir", default=None, help="engine store (as for export)")
    c.add_argument("--networks", default=None, help="comma-separated subset to build (default: all the model's)")
    c.add_argument("--clip-skip", type=int, default=0, help="bake text embeddings from CLIP layer -(N+1)")
    c.add_argument("--refittable", action="store_true",
                   help="tensorrt: plans that can take other weights by refit (LoRA, new checkpoints; may run "
                        "slower). compiled packages are refittable unless --frozen")
    c.add_argument("--frozen", action="store_true",
                   help="compiled: weights folded into the code (faster on CPU; no refit, so LoRA and new "
                        "checkpoints need eager or a rebuild)")
    c.add_argument("--no-refit", action="store_true",
                   help="build from scratch even where an entry of the same architecture could be refitted")
    c.add_argument("--max-prompt-chunks", type=int, default=None, metavar="K",
                   help="the longest prompt the UNet and ControlNets take, in chunks of 77 tokens (default 3: 225 "
                        "prompt tokens with --prompt-syntax a1111; tensorrt: the ONNX graphs')")
    c.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.bin pickle checkpoints")
    c.add_argument("--vae", default=None, help="a VAE folder or .safetensors file replacing the model's")
    c.add_argument("--controlnet", action="append", default=[], metavar="M",
                   help="also build this ControlNet (into an entry of its own) and the UNet with its residual "
                        "inputs; repeatable")
    c.add_argument("--ip-adapter", action="append", default=[], metavar="M",
                   help="the UNet takes this IP-Adapter's image tokens and scale too (its projections as weights: "
                        "another adapter of the same shapes is a refit at load); repeatable")
    c.set_defaults(func=cmd_build)


def _engines_parser(sub_parser) -> None:
    """`fastsd engines list|prune`."""
    s = sub_parser("engines", help="list or prune the engine store")
    s.add_argument("action", choices=["list", "prune"], help="list entries (with profiles), or prune unusable ones")
    s.add_argument("--engine-dir", default=None, help="engine store (as for export)")
    s.add_argument("--all", action="store_true", help="prune: remove every entry, not only unusable ones")
    s.add_argument("--dry-run", action="store_true", help="prune: only say what would go")
    s.set_defaults(func=cmd_engines)


def _bench_parser(sub_parser) -> None:
    """`fastsd bench`, and `bench compare`."""
    b = sub_parser("bench", help="benchmark backends side by side with diffusers; or: bench compare A.json B.json")
    b.add_argument("action", nargs="*", help="empty to run, or: compare REPORT.json REPORT.json ...")
    b.add_argument("--model", default=None, help="as for generate; synthetic:sd15 etc. run offline")
    b.add_argument("--backends", default=None,
                   help="comma list of eager,eager+graphs,compiled,onnxruntime,openvino,tensorrt,diffusers")
    b.add_argument("--height", type=int, default=None, help="image height (default: the model's, <= 256 on CPU)")
    b.add_argument("--width", type=int, default=None, help="image width (as --height)")
    b.add_argument("--sizes", default=None, help="comma list of HxW (instead of --height/--width)")
    b.add_argument("--batch", default=None, help="comma list of prompts per call")
    b.add_argument("--steps", default=None, help="comma list of step counts")
    b.add_argument("--schedulers", default=None, help=f"comma list of samplers: {','.join(SAMPLER_NAMES)}")
    b.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7.5)")
    b.add_argument("--warmup", type=int, default=None, help="untimed calls per configuration")
    b.add_argument("--runs", type=int, default=None, help="timed calls per configuration (median, p90)")
    b.add_argument("--device", default=None, help="cuda | cpu")
    b.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 | int8 (openvino rows only)")
    b.add_argument("--engine-dir", default=None, help="engine store (as for export)")
    b.add_argument("--export-missing", action="store_true",
                   help="export ONNX / build compiled engines a backend lacks (timed)")
    b.add_argument("--controlnet", action="append", default=[], metavar="M",
                   help="run every call with this ControlNet too (a synthetic control image; diffusers: its "
                        "ControlNet pipeline); repeatable")
    b.add_argument("--cold-start", action="store_true", help="also time a new process to its first image")
    b.add_argument("--sequential", action="store_true", default=None,
                   help="run the backends one after another, not interleaved (default: only when their processes "
                        "would not fit in memory together, e.g. full-size SD-XL on a CPU)")
    b.add_argument("--out", default="fastsd-bench", help="folder for bench.json, bench.md, bench.png")
    b.set_defaults(func=_cmd_bench)


def _serve_parser(sub_parser) -> None:
    """`fastsd serve`: OpenAI's images API over HTTP."""
    v = sub_parser("serve", help="serve OpenAI's images API and AUTOMATIC1111's /sdapi/v1 over HTTP (dynamic "
                   "batching; Ray Serve with --ray)")
    v.add_argument("--model", required=True, help="as for generate")
    _runtime_flags(v)
    v.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.bin pickle checkpoints")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--max-batch", type=int, default=4, help="images per UNet batch (default 4; 1 = no batching)")
    v.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests to join (default 10)")
    v.add_argument("--max-queue", type=int, default=64, help="requests waiting before new ones get 429 (default 64)")
    v.add_argument("--model-name", default=None, help="the id clients pass as `model` (default: the model's name)")
    v.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="a LoRA requests may name (by its file's stem) in `lora`; repeatable")
    v.add_argument("--controlnet", action="append", default=[], metavar="M",
                   help="a ControlNet; requests then may pass `control_image` (one per --controlnet, in order); "
                        "repeatable")
    v.add_argument("--ip-adapter", action="append", default=[], metavar="M",
                   help="an IP-Adapter (as for generate); requests then may pass `ip_adapter_image` (one per "
                        "--ip-adapter, in order); repeatable")
    v.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="every .safetensors LoRA in DIR, by stem, may be named in requests")
    v.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="textual inversions loaded at start: each file's stem is its prompt token")
    v.add_argument("--upscaler-dir", default=None, metavar="DIR",
                   help="upscaler models (.safetensors ESRGAN and the others spandrel reads) the hires fix may name")
    v.add_argument("--preview-vae", default=None, metavar="M",
                   help="a TAESD: /sdapi/v1/progress then returns the running batch's image (current_image)")
    v.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where A1111 requests with save_images true have their PNGs written (default: not saved)")
    v.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require this key (Authorization: Bearer KEY; repeatable). Shown in the process list: "
                        "prefer --api-key-file or $FASTSD_API_KEY")
    v.add_argument("--api-key-file", action="append", default=[], metavar="FILE",
                   help="API keys, one per line (or separated by commas)")
    v.add_argument("--api-auth", action="append", default=[], metavar="USER:PASS[,USER:PASS]",
                   help="require HTTP Basic with one of these users (the web UI's --api-auth); or "
                        "--api-auth-file / $FASTSD_API_AUTH")
    v.add_argument("--api-auth-file", action="append", default=[], metavar="FILE",
                   help="users as USER:PASS, one per line (or separated by commas)")
    v.add_argument("--metrics-public", action="store_true", help="serve /metrics without credentials")
    v.add_argument("--max-n", type=int, default=10, help="images per request (default 10)")
    v.add_argument("--max-side", type=int, default=2048, help="pixels per side, output and uploads (default 2048)")
    v.add_argument("--max-steps", type=int, default=200, help="num_inference_steps per request (default 200)")
    v.add_argument("--max-upload-mb", type=float, default=25.0, help="edits request body in MiB (default 25)")
    v.add_argument("--drain-seconds", type=float, default=0.0,
                   help="on SIGTERM, keep serving this long with /healthz answering 503 \"draining\" (so load "
                        "balancers stop routing here) before closing the listener (default 0)")
    v.add_argument("--ray", action="store_true", help="run as a Ray Serve application")
    v.add_argument("--replicas", type=int, default=1, help="--ray: replicas, one per GPU (default 1)")
    v.add_argument("--ray-address", default=None, help="--ray: an existing cluster (default: a local instance)")
    v.add_argument("--autoscaling", default=None, metavar="JSON",
                   help="--ray: Ray Serve's autoscaling_config, e.g. '{\"min_replicas\": 1, \"max_replicas\": 4}'")
    v.set_defaults(func=cmd_serve)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # options every subcommand takes, after its name too
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress details (also before the subcommand)")
    p = _Parser(prog="fastsd", description="Fast Stable Diffusion inference.")
    p.add_argument("--version", action="version", version=f"fastsd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add = sub.add_parser

    def sub_parser(name, **kw):
        return add(name, parents=[common], **kw)

    for make in (_generate_parser, _export_parser, _build_parser, _engines_parser, _bench_parser,
                 _serve_parser):
        make(sub_parser)
    i = sub_parser("info", help="devices, installed backends, versions")
    i.set_defaults(func=cmd_info)
    return p


def output_paths(out: str, count: int, overwrite: bool) -> list[Path]:
    """The files `count` images go to; checked (names, folder, writability) before any work."""
    base = Path(out)
    if base.suffix.lower() != ".png":
        raise OutputPathError(f"output must be a .png file: {out}")
    if not base.parent.is_dir():
        raise OutputPathError(f"output directory does not exist: {base.parent}")
    paths = [base] if count == 1 else [base.with_name(f"{base.stem}-{k}{base.suffix}") for k in range(count)]
    for path in paths:
        if path.is_dir():
            raise OutputPathError(f"{path} is a folder, not a file")
        if path.exists() and not overwrite:
            raise OutputPathError(f"{path} exists; pass --overwrite to replace it")
    try:  # a read-only folder, a pseudo file system, a full disk: find out now, not after generating
        fd, probe = tempfile.mkstemp(prefix=".fastsd-probe-", dir=base.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write to {base.parent}: {e.strerror or e}") from None
    return paths


def write_pngs(images: list, paths: list[Path], settings: dict, overwrite: bool) -> None:
    """Write every image or none: each goes to a temp file in its folder first, then all are
    moved into place; if one cannot be placed, those already placed are undone (files they
    replaced are restored). An existing file is never replaced without `overwrite`."""
    mode = created_mode()  # as open() would create them (mkstemp makes 0600)
    temps: list[str] = []
    try:
        for k, (image, path) in enumerate(zip(images, paths, strict=True)):
            temps.append(_write_temp(image, path, dict(settings, index=k), mode))
        _place_all(temps, paths, overwrite)
    except OSError as e:
        raise OutputPathError(f"cannot write {e.filename or 'the output'}: {e.strerror or e}") from None
    finally:
        for tmp in temps:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _write_temp(image, path: Path, settings: dict, mode: int) -> str:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text(PNG_KEY, json.dumps(settings))
    meta.add_text(PNG_PARAMETERS_KEY, _parameters_line(settings))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            image.save(f, format="PNG", pnginfo=meta)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _place_all(temps: list[str], paths: list[Path], overwrite: bool) -> None:
    placed: list[tuple[Path, str | None]] = []  # (path, backup of the file it replaced)
    try:
        for tmp, path in zip(temps, paths, strict=True):
            if overwrite and path.exists():
                backup = str(path.with_name(f".{path.name}.{secrets.token_hex(4)}.bak"))
                os.link(path, backup)
                placed.append((path, backup))
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if the name was taken meanwhile: never clobber
                except FileExistsError:
                    raise OutputPathError(f"{path} exists; pass --overwrite to replace it") from None
                placed.append((path, None))
    except BaseException:
        for path, backup in reversed(placed):
            if backup is None:
                path.unlink(missing_ok=True)
            else:
                os.replace(backup, path)
        raise
    for _, backup in placed:
        if backup is not None:
            os.unlink(backup)


def _parameters_line(s: dict) -> str:
    """The settings as the one-line "parameters" text other SD tools read (A1111's form)."""
    neg = f"\nNegative prompt: {s['negative_prompt']}" if s.get("negative_prompt") else ""
    return (f"{s['prompt']}{neg}\nSteps: {s['num_inference_steps']}, Sampler: {s['scheduler']}, "
            f"CFG scale: {s['guidance_scale']:g}, Seed: {s['seed']}, Size: {s['width']}x{s['height']}, "
            f"Model hash: {s['model_fingerprint']}" + _hires_items(s.get("hires")))


def _hires_items(h: dict | None) -> str:
    if not h:
        return ""
    return (f", Denoising strength: {h['strength']:g}, Hires upscale: {h['scale']:g}, Hires steps: {h['steps']}, "
            f"Hires upscaler: {h['upscaler']}")


def _call_values(args) -> dict:
    """The call arguments given as flags, by API name, as values (files not read yet)."""
    from .arguments import ARGS, cli_value

    values = {}
    for arg in ARGS:
        value = getattr(args, arg.name, None) if arg.flag or arg.name == "prompt" else None
        if value is None:
            continue
        if arg.kind in ("numbers", "pair"):
            value = cli_value(arg.name, value)
        elif arg.kind == "scales" and len(value) == 1:
            value = value[0]
        elif arg.kind == "text":
            value = _argv_text(value)
        values[arg.name] = value
    values.setdefault("prompt_syntax", "a1111")  # the CLI reads prompts as the web UI does (the API: plain)
    return values


def _check_generate(args, values: dict) -> None:
    """What can be checked before the model loads (the table's checks and the flags' own)."""
    from .arguments import check_values
    from .checkpoint import peek_vae_factor
    from .lora import parse_lora_arg
    from .settings import check_max_side, check_size

    check_values({k: v for k, v in values.items() if k not in ("image", "mask_image", "control_image",
                                                                "ip_adapter_image")})
    if args.preview_every < 1:
        raise FastSDError(f"--preview-every must be >= 1, got {args.preview_every}")
    if args.preview is not None:
        preview = Path(args.preview)
        if preview.suffix.lower() != ".png" or not preview.parent.is_dir():
            raise FastSDError(f"--preview {args.preview}: a .png file in an existing folder")
        if preview.resolve() in {p.resolve() for p in output_paths(args.out, values.get("num_images_per_prompt", 1),
                                                                   True)}:
            raise FastSDError("--preview must not be the output file")
    elif args.preview_vae is not None:
        raise FastSDError("--preview-vae is for --preview")
    if args.hires is None and (args.hires_steps is not None or args.hires_upscaler != "Latent"
                               or args.hires_strength != 0.7):
        raise FastSDError("--hires-upscaler, --hires-steps and --hires-strength are for --hires SCALE")
    if args.hires is not None and any(values.get(k) is not None for k in ("image", "mask_image", "control_image")):
        raise FastSDError("--hires is txt2img: not with --image, --mask or --control-image")
    for path, _ in map(parse_lora_arg, args.lora):
        if not Path(path).is_file():
            raise FastSDError(f"--lora {path}: no such file")
    _check_control(args, values)
    _check_ip(args, values)
    check_max_side(args.max_side)
    factor = peek_vae_factor(args.model) or 1
    for name in ("height", "width"):
        if name in values:
            check_size(values[name], factor, name, args.max_side)


def _check_one_each(n: int, images: list, model_flag: str, image_flag: str) -> None:
    """One image flag per model flag (a ControlNet's, an IP-Adapter's), each an existing file."""
    if images and not n:
        raise FastSDError(f"{image_flag} needs {model_flag}")
    if n and len(images) != n:
        raise FastSDError(f"{n} {model_flag} need {n} {image_flag} (one each, in the same order), got {len(images)}")
    for path in images:
        if not Path(path).is_file():
            raise FastSDError(f"{image_flag} {path}: no such file")


def _check_control(args, values: dict) -> None:
    """The ControlNet flags: one --control-image per --controlnet; scales and the window one
    for all or one per ControlNet (their ranges are the table's)."""
    n = len(args.controlnet)
    _check_one_each(n, values.get("control_image", []), "--controlnet", "--control-image")
    for name in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"):
        value = values.get(name)
        if value is not None and not n:
            raise FastSDError(f"{flag_label(name)} needs --controlnet")
        if isinstance(value, list) and len(value) != n:
            raise FastSDError(f"{flag_label(name)}: give one value for all ControlNets or one per --controlnet ({n})")


def _check_ip(args, values: dict) -> None:
    """The IP-Adapter flags: one --ip-image per --ip-adapter; --ip-scale one for all or one each."""
    n = len(args.ip_adapter)
    _check_one_each(n, values.get("ip_adapter_image", []), "--ip-adapter", "--ip-image")
    if args.ip_scale and not n:
        raise FastSDError("--ip-scale needs --ip-adapter")
    if len(args.ip_scale) not in (0, 1, n):
        raise FastSDError(f"--ip-scale: give one value for all IP-Adapters or one per --ip-adapter ({n})")
    if args.image_encoder is not None and not n:
        raise FastSDError("--image-encoder is for --ip-adapter")


def _load_ip_adapters(pipe, args) -> list[dict]:
    """--ip-adapter ...: loaded (with --image-encoder) at --ip-scale; what the PNG records."""
    if not args.ip_adapter:
        return []
    pipe.load_ip_adapter(list(args.ip_adapter), image_encoder=args.image_encoder, allow_pickle=args.allow_pickle)
    scales = args.ip_scale or [1.0]
    pipe.set_ip_adapter_scale(scales if len(scales) > 1 else scales[0])
    scales = scales * len(args.ip_adapter) if len(scales) == 1 else scales
    return [{"model": m, "image": i, "scale": s}
            for m, i, s in zip(args.ip_adapter, args.ip_adapter_image, scales, strict=True)]


def _read_images(values: dict) -> dict:
    """The image flags' files read as images (one control image per --controlnet)."""
    from .images import load_image

    out = dict(values)
    for name in ("image", "mask_image"):
        if name in out:
            out[name] = load_image(out[name])
    for name in ("control_image", "ip_adapter_image"):
        if name in out:
            images = [load_image(p) for p in out[name]]
            out[name] = images[0] if len(images) == 1 else images
    return out


def _load(args):
    from .pipeline import MemoryOptions, Pipeline

    memory = MemoryOptions(attention_slicing=args.attention_slicing, vae_slicing=args.vae_slicing,
                           vae_tiling=args.vae_tiling)
    return Pipeline.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                                    memory=memory, cuda_graphs=args.cuda_graphs,
                                    engine_dir=args.engine_dir, allow_pickle=args.allow_pickle,
                                    prediction_type=args.prediction_type, clip_skip=args.clip_skip,
                                    variant=args.variant, vae=args.vae, controlnet=args.controlnet or None,
                                    max_side=args.max_side, lora_dir=args.lora_dir,
                                    upscaler_dir=getattr(args, "upscaler_dir", None),
                                    fallback=True if args.allow_fallback else None)


def _load_loras(pipe, files: list[str]) -> list[dict]:
    from .lora import parse_lora_arg

    loras = []
    for path, scale in map(parse_lora_arg, files):
        name = pipe.load_lora(path, scale=scale, name=_free_name(Path(path).stem, [lr["name"] for lr in pipe.loras]))
        lora = pipe.loras[-1]
        print(f"lora {name}: scale {scale:g}, {lora['weights']} weights of {', '.join(lora['networks'])} fused "
              f"in {lora['seconds']:.2f}s")
        loras.append({"path": path, "scale": scale})
    return loras


def _load_embeddings(pipe, specs: list[str], allow_pickle: bool) -> list[dict]:
    """--embedding FILE[:TOKEN] ...: each loaded, its token printed."""
    out = []
    for spec in specs:
        path, sep, token = spec.rpartition(":")
        if not (sep and path and Path(path).is_file() and not Path(spec).is_file()):
            path, token = spec, None
        token = pipe.load_textual_inversion(path, token or None, allow_pickle=allow_pickle)
        print(f"embedding {token}: {pipe.textual_inversions[-1]['vectors']} vector(s) from {Path(path).name}")
        out.append({"path": path, "token": token})
    return out


def cmd_generate(args) -> int:
    with status.slow("loading %s (backend %s): its weights and engines", args.model, args.backend):  # from launch
        with phases.phase(phases.IMPORTS):  # fastsd's runtime and torch, timed apart from loading (diffusers' and
            from . import pipeline  # noqa: F401 - transformers' model classes load with the networks they build)
        values = _call_values(args)
        _check_generate(args, values)
        paths = output_paths(args.out, values.get("num_images_per_prompt", 1), args.overwrite)
        call = _read_images(values)
        pipe = _load(args)
    loras = _load_loras(pipe, args.lora)
    embeddings = _load_embeddings(pipe, args.embedding, args.allow_pickle)
    ip_adapters = _load_ip_adapters(pipe, args)
    preview = None
    if args.preview:
        pipe.load_preview_vae(args.preview_vae or _default_preview_vae(args.model, pipe.info))
        preview = _PreviewWriter(Path(args.preview))
    req = pipe.check_call(**call)  # all checked before any work; the bar's length is the call's loop
    hires = {} if args.hires is None else {
        "hr_scale": args.hires, "hr_upscaler": args.hires_upscaler, "hr_second_pass_steps": args.hires_steps,
        "denoising_strength": args.hires_strength}
    if hires:
        _check_hires(pipe, hires)
    bar = None if args.no_progress else _Bar(None if hires else req)
    on_step_end = None
    if bar or preview:
        def on_step_end(_pipe, step, t, kwargs):
            if bar:
                bar.update()
            if preview and "preview" in kwargs:
                preview.submit(kwargs["preview"][0])
            return {}
    try:
        run = partial(pipe.hires_fix, **hires) if hires else pipe
        phases.mark(phases.READY)
        if bar:
            bar.open()
        with phases.phase(phases.FIRST_CALL):
            out = run(**call, callback_on_step_end=on_step_end, preview_every=args.preview_every if preview else None)
    finally:
        if bar:
            bar.close()
        if preview:
            preview.close()
    settings = {**out.settings, "image": args.image, "mask_image": args.mask_image,
                "model": args.model, "vae": args.vae, "loras": loras,
                **({"embeddings": embeddings} if embeddings else {}),
                **({"controlnets": [{"model": m, "image": i} for m, i in zip(args.controlnet, args.control_image,
                                                                             strict=True)]} if args.controlnet else {}),
                **({"ip_adapters": ip_adapters} if ip_adapters else {}),
                "model_fingerprint": pipe.info.fingerprint,
                "fastsd": __version__}
    write_pngs(out.images, paths, settings, args.overwrite)
    _report(out, paths, preview, args.preview)
    phases.write_if_asked()
    _finished.set()
    return 0


def _report(out, paths: list, preview, preview_path) -> None:
    """generate's lines: what it wrote, the seed and the time per stage, what ran each network."""
    for path in paths:
        print(f"wrote {path}")
    t = out.timings
    image = f" | image_encoder {t['image_encoder']:.3f}s" if "image_encoder" in t else ""
    print(f"seed {out.seed} | text_encoder {t['text_encoder']:.3f}s{image} | unet {t['unet']:.3f}s "
          f"({t['unet_per_step'] * 1000:.1f} ms/step) | vae {t['vae']:.3f}s | total {t['total']:.3f}s")
    print("backends: " + ", ".join(f"{k}={v}" for k, v in out.backends.items()))
    if preview:
        print(f"previews: {preview.written} written to {preview_path} (decoding {t['preview']:.3f}s of the unet's "
              f"{t['unet']:.3f}s)")


def _check_hires(pipe, hires: dict) -> None:
    """--hires's settings, checked before any work (the upscaler model loaded)."""
    from .errors import InvalidArgumentError
    from .hires import Hires, check_hires
    from .upscale import LATENT_MODES, RESAMPLERS, model_files

    flags = {"hr_scale": "--hires", "hr_upscaler": "--hires-upscaler", "hr_second_pass_steps": "--hires-steps",
             "denoising_strength": "--hires-strength"}
    try:
        check_hires(Hires(hires["hr_scale"], upscaler=hires["hr_upscaler"], steps=hires["hr_second_pass_steps"],
                          strength=hires["denoising_strength"]), model_files(pipe.upscaler_dir))
    except InvalidArgumentError as e:
        raise FastSDError(e.named(lambda name: flags.get(name, name))) from None
    if hires["hr_upscaler"] not in LATENT_MODES and hires["hr_upscaler"] not in RESAMPLERS:
        pipe.upscaler(hires["hr_upscaler"])


def _default_preview_vae(model: str, info) -> str:
    """TAESD for the model's family: the released one from the hub cache, a random-weight one
    of the same architecture for synthetic models."""
    from .synthetic import SYNTHETIC_PREFIX

    if str(model).startswith(SYNTHETIC_PREFIX):
        return "synthetic:taesd" if info.vae_factor == 8 else "synthetic:taesd-tiny"
    return "madebyollin/taesdxl" if info.family == "sdxl" else "madebyollin/taesd"


class _PreviewWriter:
    """Keeps the preview PNG current from a background thread: the loop hands over the newest
    image and goes on; a write replaces the file atomically; images the writer had no time
    for are skipped (only the newest counts)."""

    def __init__(self, path: Path):
        import threading

        self.path, self.written = path, 0
        self._latest, self._done = None, False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="fastsd-preview", daemon=True)
        self._thread.start()

    def submit(self, image) -> None:
        with self._cond:
            self._latest = image
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._latest is None and not self._done:
                    self._cond.wait()
                image, self._latest = self._latest, None
                if image is None:
                    return
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            image.save(tmp, format="PNG", compress_level=1)
            os.replace(tmp, self.path)
            self.written += 1

    def close(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify()
        self._thread.join()


def _free_name(name: str, taken: list[str]) -> str:
    """`name`, or name-2, name-3... where LoRA files share a stem."""
    k, out = 1, name
    while out in taken:
        k += 1
        out = f"{name}-{k}"
    return out


def _argv_text(text: str | None) -> str | None:
    """Command-line text as Unicode: bytes that are not UTF-8 (kept by Python as lone
    surrogates) become U+FFFD, with a warning, instead of failing in the tokenizer."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            fixed = os.fsencode(text).decode("utf-8", errors="replace")
        except UnicodeEncodeError:  # a surrogate that did not come from undecodable bytes
            fixed = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
        log.warning("the prompt is not valid UTF-8; undecodable bytes were replaced: %r", fixed)
        return fixed


class _Bar:
    """A tqdm bar, opened when the call starts (its arguments checked, so an input error never
    leaves an empty bar; the text encoder and the first step show as 0 of N). It counts
    the sampler's steps, as diffusers' bar does (`--steps 20` under PNDM: 20, not its 21 UNet
    calls; Heun: a step per two calls), from the UNet calls made (`req.steps_done`); a hires
    fix's two passes (no request known ahead) count UNet calls."""

    def __init__(self, req=None):
        self.req, self.calls, self.bar = req, 0, None

    def open(self):
        if self.bar is None:
            from tqdm import tqdm

            status.said()
            total = None if self.req is None else self.req.sampler_steps
            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, leave=False)

    def update(self):
        self.open()
        self.calls += 1
        self.bar.update((self.calls if self.req is None else self.req.steps_done(self.calls)) - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _progress_line(loaded: threading.Event, line: str) -> None:
    loaded.set()
    status.said()
    print(line, flush=True)


def _build(kind_name: str, args, **options) -> int:
    """Build (or export) an entry of one engine kind, with the options the command has. Until
    the build's first line, what it does (importing, loading the checkpoint) is said once it
    takes 2 s."""
    with status.slow("loading %s for the build", args.model) as loaded:
        return _build_entry(kind_name, args, loaded, **options)


def _build_entry(kind_name: str, args, loaded: threading.Event, **options) -> int:
    import time

    from .backends.kind import BuildOptions
    from .backends.registry import ENGINE_KINDS

    kind = ENGINE_KINDS.get(kind_name)
    if kind is None:
        raise FastSDError(f"unknown build backend {kind_name!r}; choose one of {', '.join(ENGINE_KINDS)}")
    if options.get("refittable") is not None and not kind.refit_optional:
        flag = "--refittable" if options["refittable"] else "--frozen"
        choosing = ", ".join(k.name for k in ENGINE_KINDS.values() if k.refit_optional)
        raise FastSDError(f"{flag} applies to engine kinds built refittable or not ({choosing}), not {kind.name} "
                          "(whose engines always take other weights)")
    t0 = time.perf_counter()
    networks = tuple(n.strip() for n in args.networks.split(",") if n.strip()) if args.networks else None
    opts = BuildOptions(args.model, engine_dir=args.engine_dir, networks=networks, allow_pickle=args.allow_pickle,
                        clip_skip=args.clip_skip, static=args.static, progress=partial(_progress_line, loaded),
                        **options)
    try:
        out = kind.build(opts)
    except ImportError as e:
        raise FastSDError(f"building {kind.name} engines needs packages that are not installed ({e}); "
                          "for ONNX: pip install 'fastsd[onnx]'") from None
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_export(args) -> int:
    return _build("onnxruntime", args, dtype=args.dtype, simplify=not args.no_simplify, vae=args.vae,
                  refit=not args.no_refit, controlnets=tuple(args.controlnet), ip_adapters=tuple(args.ip_adapter),
                  max_chunks=args.max_prompt_chunks, cpu_graph=not args.no_cpu_graph)


def cmd_build(args) -> int:
    if args.refittable and args.frozen:
        raise FastSDError("--refittable and --frozen contradict each other")
    refittable = True if args.refittable else False if args.frozen else None
    return _build(args.backend, args, dtype=args.dtype, device=args.device, refittable=refittable,
                  vae=args.vae, refit=not args.no_refit, controlnets=tuple(args.controlnet),
                  ip_adapters=tuple(args.ip_adapter),
                  max_chunks=args.max_prompt_chunks)


def cmd_engines(args) -> int:
    from .engines import default_engine_dir, list_entries, prune

    root = Path(args.engine_dir) if args.engine_dir else default_engine_dir()
    if args.action == "list":
        rows = list_entries(root)
        if not rows:
            print(f"no engines in {root}")
        for r in rows:
            state = "ok" if not r["problems"] else "UNUSABLE: " + "; ".join(r["problems"])
            donors = sorted({rec.get("refitted_from") for rec in r["manifest"].get("networks", {}).values()
                             if rec.get("weights_at_load")})
            linked = f"  (refit of {','.join(map(str, donors))}: files shared, weights at load)" if donors else ""
            print(f"{r['checkpoint']}/{r['kind']}  {r['size'] / 2**20:9.1f} MiB  {r['profile']}  "
                  f"fastsd {r['fastsd']}  {','.join(r['networks'])}  {r['source']}  {state}{linked}")
        return 0
    gone = prune(root, everything=args.all, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for p in gone:
        print(f"{verb} {p}")
    print(f"{verb} {len(gone)} item(s) from {root}")
    return 0


def _cmd_bench(args) -> int:
    from .bench.command import cmd_bench

    return cmd_bench(args)


def _check_serve_flags(args) -> dict | None:
    """The serving flags checked before anything loads; returns --autoscaling parsed."""
    checks = (("--port", args.port, 0, 65535), ("--max-batch", args.max_batch, 1, None),
              ("--max-queue", args.max_queue, 1, None), ("--max-n", args.max_n, 1, None),
              ("--max-side", args.max_side, 8, None), ("--max-steps", args.max_steps, 1, None),
              ("--replicas", args.replicas, 1, None))
    for flag, value, lo, hi in checks:
        if value < lo or (hi is not None and value > hi):
            raise FastSDError(f"{flag} must be " + (f"in [{lo}, {hi}]" if hi is not None else f">= {lo}")
                              + f", got {value}")
    if not args.batch_window_ms >= 0:
        raise FastSDError(f"--batch-window-ms must be >= 0, got {args.batch_window_ms}")
    if not 0 <= args.drain_seconds <= 3600:
        raise FastSDError(f"--drain-seconds must be in [0, 3600], got {args.drain_seconds}")
    if args.ray and args.drain_seconds:
        raise FastSDError("--drain-seconds applies to a single server; Ray Serve drains its replicas itself")
    if not args.max_upload_mb > 0:
        raise FastSDError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    autoscaling = None
    if args.autoscaling is not None:
        try:
            autoscaling = json.loads(args.autoscaling)
        except ValueError as e:
            raise FastSDError(f"--autoscaling is not JSON: {e}") from None
        if not isinstance(autoscaling, dict):
            raise FastSDError("--autoscaling must be a JSON object (Ray Serve's autoscaling_config)")
    if not args.ray and (args.replicas != 1 or args.ray_address or autoscaling):
        raise FastSDError("--replicas, --ray-address and --autoscaling need --ray")
    return autoscaling


def cmd_serve(args) -> int:
    autoscaling = _check_serve_flags(args)
    from .backends.registry import BACKEND_NAMES
    from .checkpoint import model_source
    from .devices import parse_device
    from .engines import PRECISION_NAMES

    if args.backend not in BACKEND_NAMES:
        raise FastSDError(f"--backend must be one of {', '.join(BACKEND_NAMES)}, got {args.backend!r}")
    if args.dtype is not None and args.dtype not in PRECISION_NAMES:
        raise FastSDError(f"--dtype must be one of {', '.join(PRECISION_NAMES)}, got {args.dtype!r}")
    if not args.ray:  # Ray replicas pick their own devices
        parse_device(args.device)
    model = args.model
    model_source(model)  # raises for a path that does not exist (before the server starts)
    if not args.ray:
        _check_port(args.host, args.port)
    try:
        from .serve.api import Limits
        from .serve.app import ServeOptions
    except ImportError as e:
        raise FastSDError(f"fastsd serve needs the serve extra ({e.name} is missing): "
                          "pip install 'fastsd[serve]'") from None
    from .serve.auth import open_warning, read_auth

    auth = read_auth(args.api_key, args.api_key_file, args.api_auth, args.api_auth_file, args.metrics_public)
    for flag, folder in (("--embeddings-dir", args.embeddings_dir), ("--upscaler-dir", args.upscaler_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise FastSDError(f"{flag} {folder}: no such folder")
    limits = Limits(max_n=args.max_n, max_side=args.max_side, max_steps=args.max_steps,
                    max_upload_bytes=int(args.max_upload_mb * 2**20))
    options = ServeOptions(model=model, backend=args.backend, fallback=args.allow_fallback, device=args.device,
                           dtype=args.dtype, engine_dir=args.engine_dir, variant=args.variant,
                           allow_pickle=args.allow_pickle,
                           max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                           max_queue=args.max_queue, limits=limits, model_name=args.model_name,
                           loras=_serve_loras(args.lora, args.lora_dir), controlnets=tuple(args.controlnet),
                           ip_adapters=tuple(args.ip_adapter),
                           lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                           upscaler_dir=args.upscaler_dir, preview_vae=args.preview_vae, output_dir=args.output_dir,
                           auth=auth)
    warning = open_warning(args.host, auth)
    if warning:
        print(warning, file=sys.stderr)
    if args.ray:
        try:
            from .serve import ray_serve
        except ImportError as e:
            raise FastSDError(f"fastsd serve --ray needs Ray Serve ({e.name} is missing): "
                              "pip install 'fastsd[ray]'") from None
        return ray_serve.run(options, args.replicas, args.host, args.port, args.ray_address, autoscaling)
    from .serve import server

    return server.run(options, args.host, args.port, "debug" if getattr(args, "verbose", False) else "info",
                      args.drain_seconds)


def _serve_loras(files: list[str], folder: str | None) -> tuple[tuple[str, str], ...]:
    """(name, absolute path) of the LoRAs a server offers: --lora files and --lora-dir's
    .safetensors, named by stem (two of one name are an error)."""
    paths = [Path(f) for f in files]
    if folder is not None:
        if not Path(folder).is_dir():
            raise FastSDError(f"--lora-dir {folder}: no such folder")
        paths += sorted(Path(folder).glob("*.safetensors"))
    out: dict[str, str] = {}
    for p in paths:
        if not p.is_file() or p.suffix != ".safetensors":
            raise FastSDError(f"--lora {p}: no such .safetensors file")
        if p.stem in out:
            raise FastSDError(f"two LoRAs are named {p.stem!r} ({out[p.stem]} and {p}); rename one")
        out[p.stem] = str(p.resolve())
    return tuple(out.items())


def _check_port(host: str, port: int) -> None:
    """Fail now, in one line, where the address cannot be listened on (in use, not ours)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise FastSDError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise FastSDError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_info(args) -> int:
    """What this installation has and can run, read without importing torch or loading a model."""
    from .catalog import KINDS, cpu_name, cuda_devices, installed
    from .engines import default_engine_dir, list_entries

    print(f"fastsd {__version__} | python {platform.python_version()} | torch {installed('torch') or 'not installed'}")
    print("devices:")
    print(f"  cpu: {cpu_name()}, {os.cpu_count()} cores")
    gpus = cuda_devices()
    for k, gpu in enumerate(gpus):
        print(f"  cuda:{k} {gpu['name']} sm_{gpu['sm']} {gpu['memory'] / 2**30:.1f} GiB")
    if not gpus:
        print("  cuda: not available (cpu only)")
    store = default_engine_dir()
    origin = "$FASTSD_ENGINE_DIR" if os.environ.get("FASTSD_ENGINE_DIR") else "default; set $FASTSD_ENGINE_DIR"
    entries = list_entries(store)
    print(f"engine store: {store} ({origin} or --engine-dir to use another); {len(entries)} entr"
          f"{'y' if len(entries) == 1 else 'ies'}")
    print("engine kinds (auto tries them in this order, then eager PyTorch):")
    for kind in KINDS.values():
        why = kind.unavailable()
        state = f"not available: {why}" if why else f"available ({kind.details()})"
        print(f"  {kind.name}: {state}")
        print(f"    needs: {kind.needs}; built by `{kind.build_command}`")
    for package in ("diffusers", "transformers", "onnx", "onnxruntime", "onnxslim", "openvino", "tensorrt"):
        print(f"{package} {installed(package)}" if installed(package) else f"{package}: not installed")
    return 0


class _Lines(logging.Formatter):
    """`fastsd: LEVEL: message`; a status line (fastsd/status.py) as `fastsd: message`."""

    def __init__(self):
        super().__init__("fastsd: %(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.name == status.LOGGER and record.levelno == logging.INFO:
            return f"fastsd: {record.getMessage()}"
        return super().format(record)


QUIET_LIBRARIES = {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}  # unless the user says


def _quiet_libraries(verbose: bool) -> None:
    """fastsd's own lines on stderr; diffusers' and transformers' warnings (fastsd says what it
    does) and their bars over loading a model off, without importing them (~2 s, where engines
    serve every network and nothing else needs them): the warnings through the level they read
    from the environment when first imported, the bars where fastsd builds a model with them."""
    handler = logging.StreamHandler()
    handler.setFormatter(_Lines())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger(status.LOGGER).setLevel(logging.INFO)  # what a step taking seconds is doing: always shown
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        lib = sys.modules.get(name)
        if lib is not None:
            lib.set_verbosity_error()
    quiet_loading_bars()


def main(argv: list[str] | None = None) -> int:
    phases.since_launch(phases.IMPORTS)  # interpreter start and fastsd's own imports, where the launcher says when
    args = _parser().parse_args(argv)
    if isinstance(getattr(args, "model", None), str):  # a checkpoint seen for the first time: hashed meanwhile
        from .checkpoint import prefetch_checkpoint

        prefetch_checkpoint(args.model, bool(getattr(args, "allow_pickle", False)), getattr(args, "variant", None))
    _quiet_libraries(args.verbose)
    try:
        return args.func(args)
    except FastSDError as e:
        # generate, export and build take API arguments under their own flag names
        named = isinstance(e, InvalidArgumentError) and args.command in ("generate", "export", "build")
        text = e.named(flag_label) if named else str(e)
        print(f"fastsd: error: {text}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fastsd: interrupted", file=sys.stderr)
        return 130


_finished = threading.Event()  # set by a one-shot command (generate) whose work is all written


def run() -> None:
    """The `fastsd` command: `main`, then the exit. Once `generate` has written its images and
    printed its lines, the process ends at once (output flushed, os._exit): Python's teardown of
    torch, the engines and gigabytes of weights took ~1.2 s of an SD 1.5 cold start, and nothing
    is left to clean up (every file the command writes is closed, digest records saved)."""
    rc = main()
    if _finished.is_set():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
