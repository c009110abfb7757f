"""Bad input of every kind gets one clear error (FastSDError in the API, one line and exit
code 2 in the CLI) before any work, and never a crash, a half-written file or a wrong image."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastsd import Pipeline
from fastsd.checkpoint import load_checkpoint
from fastsd.cli import main, write_pngs
from fastsd.errors import CheckpointError, ImageError, InvalidArgumentError, NumericalError, OutputPathError
from fastsd.images import image_to_tensor, load_image, mask_to_tensor
from fastsd.single_file import to_original_layout

FAST = dict(num_inference_steps=2, output_type="np")


@pytest.fixture
def pipe(pipes):
    return pipes("eps")


@pytest.fixture
def model(ckpts):
    return str(ckpts["eps"])


def gen(model, out, *extra):
    return ["generate", "a lighthouse", "--model", model, "--steps", "2", "--no-progress", "--out", str(out), *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastsd: error: "), err
    return err[0]


# ---- 4. non-finite and absurd numbers; NaN mid-run ------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_scale=1e30), r"guidance_scale must be in \[0, 100\], got 1e\+30"),
    (dict(eta=float("inf")), "eta must be a finite number"),
    (dict(eta=2.0), r"eta must be in \[0, 1\], got 2"),
    (dict(guidance_scale="7"), "guidance_scale must be a finite number"),
])
def test_non_finite_and_absurd_numbers(pipe, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        pipe("a cat", **{**FAST, **kwargs})


def test_cli_infinite_guidance_is_refused(model, tmp_path, capsys):
    assert main(gen(model, tmp_path / "o.png", "--guidance", "inf")) == 2
    assert "--guidance must be a finite number, got inf" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_nan_in_the_latents_is_an_error_not_a_black_image(ckpts, monkeypatch):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), device="cpu")
    real = pipe.backend.unet
    monkeypatch.setattr(pipe.backend, "unet", lambda *a, **kw: real(*a, **kw) * float("nan"))
    with pytest.raises(NumericalError, match="NaN or infinite while denoising"):
        pipe("a cat", **FAST)


def test_vae_nan_even_in_fp32_is_an_error(ckpts, monkeypatch):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), device="cpu")
    nan = lambda latent, ran=None: torch.full((latent.shape[0], 3, 32, 32), float("nan"))  # noqa: E731
    monkeypatch.setattr(pipe.backend, "vae_decoder", nan)
    monkeypatch.setattr(pipe.backend, "vae_decoder_fp32", nan)
    with pytest.raises(NumericalError, match="even in fp32"):
        pipe("a cat", **FAST)


# ---- 6. one Pipeline from several threads -------------------------------------------------


def test_threads_get_the_images_they_would_get_alone(pipe):
    prompts = ["a", "a red fox in the snow at dawn", "x" * 120, "lighthouse", "b" * 40, "a cat"]
    jobs = [(p, seed) for seed in range(3) for p in prompts]
    run = lambda p, seed: pipe(p, seed=seed, num_inference_steps=2, scheduler="euler_a",  # noqa: E731
                               output_type="np").images  # per-step noise: each call's own generator
    alone = [run(p, seed) for p, seed in jobs]
    together: list = [None] * len(jobs)
    barrier = threading.Barrier(4)

    def worker(k):
        barrier.wait()
        for i in range(k, len(jobs), 4):
            together[i] = run(*jobs[i])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))


def test_tokenizer_under_thread_contention(pipe):
    """The shared tokenizer keeps truncation/padding state between calls: without a lock,
    one thread's ids come out padded to another thread's length (about 1 call in 20 here)."""
    texts = [["a"], ["x" * 120], ["a red fox", ""], ["b" * 40, "c"]]
    want = [pipe.family.token_ids(t, pipe.device) for t in texts]
    wrong = []

    def worker(k):
        for i in range(200):
            j = (i + k) % len(texts)
            got = pipe.family.token_ids(texts[j], pipe.device)
            if got.shape != want[j].shape or not torch.equal(got, want[j]):
                wrong.append(tuple(got.shape))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


# ---- 7. sizes and batches no device can hold ------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(height=10**6, width=10**6), dict(height=8192, width=8192 * 64),
                                    dict(num_images_per_prompt=10**7)])
def test_impossible_sizes_are_refused_before_allocating(pipe, kwargs):
    """The memory check, with max_side lifted (by default max_side refuses these sizes first)."""
    pipe.max_side = None
    try:
        with pytest.raises(InvalidArgumentError, match="GiB"):
            pipe("a cat", **{**FAST, **kwargs})
    finally:
        pipe.max_side = 2048


def test_cli_impossible_size(model, tmp_path, capsys):
    big = ["--height", "1000000", "--width", "1000000"]
    assert main(gen(model, tmp_path / "o.png", *big, "--max-side", "1000000")) == 2
    assert "GiB" in one_line_error(capsys)
    assert main(gen(model, tmp_path / "o.png", *big)) == 2
    assert "--height 1000000 is over this pipeline's max_side of 2048" in one_line_error(capsys)


# ---- 8. seeds and prompts --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**32, 2**64, -1, 1.5, "5", True])
def test_bad_seeds(pipe, seed):
    with pytest.raises(InvalidArgumentError, match=r"seed must be an integer in \[0, 4294967295\], got "):
        pipe("a cat", seed=seed, **FAST)


def test_seeds_are_32_bit_because_the_generator_reads_32_bits(pipe):
    """torch's CPU generator seeds mt19937 with a seed's low 32 bits: s and s + 2**32 draw
    the same noise. So the seed range is [0, 2**32), where every seed counts."""
    import torch

    same = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (5, 5 + 2**32)]
    assert torch.equal(*same)
    top = pipe("a cat", seed=2**32 - 1, **FAST).images
    assert not np.array_equal(top, pipe("a cat", seed=2**31 - 1, **FAST).images)


def test_largest_seed_and_numpy_seed_work(pipe):
    assert pipe("a cat", seed=2**32 - 1, **FAST).images.shape == (1, 32, 32, 3)
    assert np.array_equal(pipe("a", seed=np.int64(7), **FAST).images, pipe("a", seed=7, **FAST).images)


def test_generator_must_be_a_generator(pipe):
    with pytest.raises(InvalidArgumentError, match="generator must be a torch.Generator"):
        pipe("a cat", generator=42, **FAST)


def test_cli_seed_out_of_range(model, tmp_path, capsys):
    assert main(gen(model, tmp_path / "o.png", "--seed", str(2**32))) == 2
    assert "seed must be an integer" in one_line_error(capsys)


def test_lone_surrogate_prompt(pipe):
    with pytest.raises(InvalidArgumentError, match="not valid Unicode"):
        pipe("a \ud800 cat", **FAST)
    with pytest.raises(InvalidArgumentError, match="negative_prompt is not valid Unicode"):
        pipe("a cat", negative_prompt="\udcff", **FAST)


def test_cli_non_utf8_prompt_is_replaced(model, tmp_path, caplog):
    out = tmp_path / "o.png"
    args = gen(model, out)
    args[1] = os.fsdecode(b"caf\xe9 \xff")  # bytes a Latin-1 terminal sends: lone surrogates in Python
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    assert json.loads(Image.open(out).text["fastsd"])["prompt"] == "caf\ufffd \ufffd"
    assert "not valid UTF-8" in caplog.text


# ---- 9. outputs that cannot be written --------------------------------------------------------


def test_unwritable_outputs_are_refused_before_generating(model, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "multi-1.png").mkdir()
    cases = [(Path("/proc/fastsd.png"), [], "cannot write to /proc"),
             (tmp_path / "folder.png", ["--overwrite"], "is a folder"),
             (tmp_path / "multi.png", ["--n", "2"], "multi-1.png is a folder")]
    for out, extra, message in cases:
        assert main(gen(model, out, *extra)) == 2
        assert message in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "multi-1.png"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(model, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert main(gen(model, ro / "o.png")) == 2
        assert "cannot write to" in one_line_error(capsys)
    finally:
        ro.chmod(stat.S_IRWXU)


SETTINGS = {"prompt": "p", "num_inference_steps": 1, "scheduler": "ddim", "guidance_scale": 1, "seed": 1, "width": 8,
            "height": 8, "model_fingerprint": "f"}


def test_multi_image_write_is_all_or_nothing(tmp_path):
    class Boom:
        def save(self, f, **kw):
            raise OSError("disk full")

    good = Image.new("RGB", (8, 8))
    paths = [tmp_path / "a-0.png", tmp_path / "a-1.png"]
    with pytest.raises(OutputPathError):
        write_pngs([good, Boom()], paths, SETTINGS, overwrite=False)
    assert list(tmp_path.iterdir()) == []
    for p in paths:
        p.write_bytes(b"old")
    (tmp_path / "a-2.png").mkdir()  # the third cannot be placed: the first two must be restored
    with pytest.raises(OutputPathError):
        write_pngs([good, good, good], paths + [tmp_path / "a-2.png"], SETTINGS, overwrite=True)
    assert [p.read_bytes() for p in paths] == [b"old", b"old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-0.png", "a-1.png", "a-2.png"]


# ---- 10. malformed safetensors, missing and transposed tensors ----------------------------------


def _with_header(path: Path, header) -> None:
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data + b"\0" * 16)


@pytest.mark.parametrize("header,match", [
    ([1, 2, 3], "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": ["0", "16"]}}, "malformed"),
    ({"w": {"dtype": "F32", "shape": [2, 2]}}, "lacks dtype, shape or data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, "do not hold"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, "malformed"),
    ("a string", "not a JSON object"),
])
def test_malformed_safetensors_headers(ckpts, tmp_path, header, match):
    folder = shutil.copytree(ckpts["eps"], tmp_path / "m")
    _with_header(folder / "vae" / "diffusion_pytorch_model.safetensors", header)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(str(folder))
    _with_header(tmp_path / "single.safetensors", header)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(str(tmp_path / "single.safetensors"))


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_folder_with_a_missing_tensor(ckpts, tmp_path, component):
    from safetensors.torch import load_file

    folder = shutil.copytree(ckpts["eps"], tmp_path / "m")
    f = next((folder / component).glob("*.safetensors"))
    weights = load_file(str(f))
    weights.pop(sorted(weights)[len(weights) // 2])
    save_file(weights, str(f))
    with pytest.raises(CheckpointError, match="incomplete: 1 weight"):
        load_checkpoint(str(folder))


def _single_file(ckpts, tmp_path, change) -> Path:
    sd = to_original_layout(load_checkpoint(str(ckpts["eps"])), "sd15")
    change(sd)
    save_file(sd, str(tmp_path / "m.safetensors"))
    shutil.copytree(ckpts["eps"] / "tokenizer", tmp_path / "tokenizer")
    return tmp_path / "m.safetensors"


def test_single_file_with_a_transposed_tensor(ckpts, tmp_path):
    def transpose(sd):
        key = next(k for k in sd if k.endswith("layers.1.mlp.fc1.weight"))
        sd[key] = sd[key].t().contiguous()  # same element count, wrong layout

    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(str(_single_file(ckpts, tmp_path, transpose)))


def test_single_file_missing_an_architecture_tensor(ckpts, tmp_path):
    def drop(sd):
        sd.pop(next(k for k in sd if k.endswith("middle_block.1.proj_in.weight")))

    with pytest.raises(CheckpointError, match="is incomplete"):
        load_checkpoint(str(_single_file(ckpts, tmp_path, drop)))


# ---- 11. wide images, huge images, devices --------------------------------------------------------


def test_sixteen_bit_and_float_images_by_value_range():
    gray16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert gray16.mode.startswith("I")
    assert abs(float(image_to_tensor(gray16, 8, 8).mean())) < 0.01  # mid-gray, not white
    gray_float = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert abs(float(image_to_tensor(gray_float, 8, 8).mean())) < 0.01
    mask16 = np.zeros((8, 8), dtype=np.uint16)
    mask16[:, 4:] = 65535
    mask16[:4, :4] = 20000  # below half: keep
    m = mask_to_tensor(Image.fromarray(mask16), 8, 8)
    assert m[0, 0, :, 4:].eq(1).all() and m[0, 0, :, :4].eq(0).all()


def test_decompression_bomb_is_a_one_line_error(tmp_path, model, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb)
    assert main(gen(model, tmp_path / "o.png", "--image", str(bomb))) == 2
    assert "too large" in one_line_error(capsys)


@pytest.mark.parametrize("device", ["xpu9", "tpu", "cuda:99", "", 3])
def test_bad_devices(ckpts, device):
    with pytest.raises(InvalidArgumentError, match="device"):
        Pipeline.from_pretrained(str(ckpts["eps"]), device=device)


def test_cli_bad_device(model, tmp_path, capsys):
    assert main(gen(model, tmp_path / "o.png", "--device", "xpu9")) == 2
    assert "--device must be 'cpu', 'cuda' or 'cuda:N', got 'xpu9'" in one_line_error(capsys)


# ---- 13, 14. truncation warning, file modes, broken configs -----------------------------------------


def test_long_prompt_warning_is_short_and_names_the_prompts_words(pipe, caplog):
    long = " ".join(f"word{k}" for k in range(2000))  # ~10,000 characters
    with caplog.at_level(logging.WARNING):
        pipe(["a cat", long], **FAST)
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and len(warnings[0]) < 400, warnings
    assert "endoftext" not in warnings[0] and "w o r d" not in warnings[0].replace("word", "")
    assert "characters)" in warnings[0]


def test_output_files_honour_the_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(gen(model, tmp_path / "a.png", "--n", "2")) == 0
        os.umask(0o077)
        assert main(gen(model, tmp_path / "b.png")) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a-0.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a-1.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.png").stat().st_mode) == 0o600


@pytest.mark.parametrize("config", ["unet/config.json", "vae/config.json", "model_index.json",
                                    "scheduler/scheduler_config.json", "text_encoder/config.json"])
def test_broken_config_is_reported_as_invalid(ckpts, tmp_path, config, capsys):
    folder = shutil.copytree(ckpts["eps"], tmp_path / "m")
    (folder / config).write_text('{"in_channels": 4,')
    with pytest.raises(CheckpointError, match="invalid config file"):
        load_checkpoint(str(folder))
    assert main(gen(str(folder), tmp_path / "o.png")) == 2
    line = one_line_error(capsys)
    assert "invalid config file" in line and "huggingface" not in line


# ---- sizes that would run for hours ---------------------------------------------------------------


def test_max_side_guards_the_api_and_the_cli(pipe, model, tmp_path, capsys):
    """A 4000x4000 call (on the tiny model it passes the memory check and would run for
    hours) is refused before any work past max_side (default 2048, as the server's): asked
    for, or set by an input image. pipe.max_side = N / None, from_pretrained(max_side=) and
    the CLI's --max-side raise the limit."""
    from PIL import Image

    from fastsd import Pipeline

    with pytest.raises(InvalidArgumentError, match="height 4000 is over this pipeline's max_side of 2048"):
        pipe.check_call("a cat", height=4000, width=4000)
    big = Image.new("RGB", (2056, 64))
    with pytest.raises(InvalidArgumentError, match="width 2056 .from the input image. is over"):
        pipe.check_call("a cat", image=big)
    pipe.check_call("a cat", height=2048, width=64)
    try:
        pipe.max_side = None
        pipe.check_call("a cat", height=2056, width=64)
        pipe.max_side = 16
        with pytest.raises(InvalidArgumentError, match="max_side of 16"):
            pipe("a cat", height=24, width=16, **FAST)
        pipe.max_side = "big"
        with pytest.raises(InvalidArgumentError, match="max_side must be an integer >= 8"):
            pipe.check_call("a cat")
    finally:
        pipe.max_side = 2048
    assert Pipeline.from_pretrained(model, max_side=4096).max_side == 4096
    assert main(gen(model, tmp_path / "o.png", "--height", "4000", "--width", "64")) == 2
    assert "--height 4000 is over this pipeline's max_side of 2048" in one_line_error(capsys)
    assert main(gen(model, tmp_path / "o.png", "--height", "40", "--width", "48", "--max-side", "32")) == 2
    assert "--height 40 is over this pipeline's max_side of 32" in one_line_error(capsys)
    assert not (tmp_path / "o.png").exists()
