"""The hires fix (Pipeline.hires_fix) is exactly its three steps, and model upscalers
(spandrel) run tiled as untiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd.errors import InvalidArgumentError
from fastsd.upscale import ModelUpscaler, load_model_upscaler, upscale_latents

STEPS = 3


@pytest.fixture(scope="module")
def pipe(pipes):
    return pipes("eps")


class TinyCompact(torch.nn.Module):
    """A Real-ESRGAN Compact (SRVGGNetCompact) network, written here: the layout of
    realesr-general-x4v3's weights, which spandrel detects by its keys."""

    def __init__(self, feat: int = 8, convs: int = 3, scale: int = 2):
        super().__init__()
        layers = [torch.nn.Conv2d(3, feat, 3, 1, 1), torch.nn.PReLU(feat)]
        for _ in range(convs):
            layers += [torch.nn.Conv2d(feat, feat, 3, 1, 1), torch.nn.PReLU(feat)]
        layers.append(torch.nn.Conv2d(feat, 3 * scale * scale, 3, 1, 1))
        self.body, self.scale = torch.nn.ModuleList(layers), scale

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        up = torch.nn.functional.pixel_shuffle(out, self.scale)
        return up + torch.nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest")


class Described:
    """What fastsd reads of spandrel's ImageModelDescriptor: the module, its scale, the call."""

    def __init__(self, model):
        self.model, self.scale = model.eval(), model.scale

    def __call__(self, x):
        with torch.inference_mode():
            return self.model(x).clamp(0, 1)


def tiny_upscaler(seed: int = 0) -> TinyCompact:
    torch.manual_seed(seed)
    model = TinyCompact()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model.eval()


def make_upscaler(path, seed: int = 0):
    """The tiny upscaler's weights as a .safetensors file (what --upscaler-dir holds)."""
    from safetensors.torch import save_file

    save_file(tiny_upscaler(seed).state_dict(), str(path))
    return path


def spandrel_works() -> bool:
    """spandrel needs torchvision, and CPU-only torch has none on PyPI (CI): there, the tests
    that load files through spandrel are skipped; the tiling and the hires fix with a model are not."""
    from fastsd.errors import FastSDError
    from fastsd.upscale import import_spandrel

    try:
        import_spandrel()
    except FastSDError:
        return False
    return True


def test_latent_hires_fix_is_exactly_the_two_passes(pipe):
    kw = {"num_inference_steps": STEPS, "negative_prompt": "fog", "width": 24, "height": 16}
    out = pipe.hires_fix("a red barn", hr_scale=2.0, hr_upscaler="Latent (bicubic)", denoising_strength=0.6,
                         hr_second_pass_steps=4, seed=7, output_type="np", **kw)
    g = torch.Generator().manual_seed(7)
    lat = pipe("a red barn", generator=g, output_type="latent", **kw).images
    lat = upscale_latents(lat, 16, 24, "Latent (bicubic)")  # 48x32 pixels at the tiny VAE's factor 2
    ref = pipe("a red barn", image=lat, strength=0.6, generator=g, output_type="np", num_inference_steps=4,
               negative_prompt="fog")
    assert out.images.shape == (1, 32, 48, 3)
    assert np.array_equal(out.images, ref.images)
    assert out.seed == 7 and out.settings["hires"]["upscaler"] == "Latent (bicubic)"
    assert out.settings["first_pass"]["width"] == 24 and out.settings["width"] == 48
    assert {"first_pass", "upscale", "second_pass", "total"} <= set(out.timings)


def test_image_hires_fix_with_resize_and_crop_is_exactly_the_two_passes(pipe):
    kw = {"num_inference_steps": STEPS, "width": 24, "height": 16, "num_images_per_prompt": 2}
    out = pipe.hires_fix("a castle", hr_resize_x=40, hr_resize_y=40, hr_upscaler="Lanczos", seed=3,
                         hr_prompt="a castle, detailed", output_type="np", **kw)
    g = torch.Generator().manual_seed(3)
    first = pipe("a castle", generator=g, **kw).images
    ups = [im.resize((60, 40), Image.Resampling.LANCZOS).crop((10, 0, 50, 40)) for im in first]  # cover, then crop
    ref = pipe(["a castle, detailed"] * 2, image=ups, strength=0.7, generator=g, num_inference_steps=STEPS,
               output_type="np")
    assert out.images.shape == (2, 40, 40, 3) and np.array_equal(out.images, ref.images)


def test_model_upscaler_tiled_equals_untiled_and_drives_the_hires_fix(pipe, tmp_path):
    up = ModelUpscaler("tiny-x2", tmp_path / "tiny-x2.safetensors", Described(tiny_upscaler()))
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    whole, tiled = up.run(x, 0), up.run(x, 32)
    assert whole.shape == (1, 3, 140, 180) and float((whole - tiled).abs().max()) <= 1e-3
    assert float((whole - up.run(x, 7)).abs().max()) <= 1e-3  # tiles smaller than their context
    assert up(im, 180, 140, tile=0).size == (180, 140) and up(im, 300, 200, tile=64).size == (300, 200)

    out = pipe.hires_fix("a castle", hr_upscaler=up, hr_tile=16, seed=5, num_inference_steps=STEPS, width=24,
                         height=16, output_type="np")
    g = torch.Generator().manual_seed(5)
    first = pipe("a castle", generator=g, num_inference_steps=STEPS, width=24, height=16).images
    ups = [up(im, 48, 32, tile=16) for im in first]
    ref = pipe("a castle", image=ups, strength=0.7, generator=g, num_inference_steps=STEPS, output_type="np")
    assert np.array_equal(out.images, ref.images) and out.settings["hires"]["upscaler"] == "tiny-x2"


def test_upscaler_files_load_through_spandrel(pipe, tmp_path):
    if not spandrel_works():
        pytest.skip("spandrel cannot be imported here (it needs a torchvision built for this torch)")
    path = make_upscaler(tmp_path / "tiny-x2.safetensors")
    up = load_model_upscaler(path)
    assert up.scale == 2 and up.name == "tiny-x2" and up.model.architecture.name == "RealESRGAN Compact"
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        ref = tiny_upscaler()(x).clamp(0, 1)
    assert float((up.run(x, 0) - ref).abs().max()) <= 1e-5  # spandrel built the same network
    old = pipe.upscaler_dir
    pipe.upscaler_dir = str(tmp_path)
    try:
        out = pipe.hires_fix("a castle", hr_upscaler="tiny-x2", seed=5, num_inference_steps=STEPS, width=24,
                             height=16, output_type="np")
    finally:
        pipe.upscaler_dir = old
    assert out.images.shape == (1, 32, 48, 3)


def test_hires_fix_bad_input_is_refused_before_work(pipe, tmp_path):
    with pytest.raises(InvalidArgumentError) as e:
        pipe.hires_fix("x", hr_upscaler="ESRGAN_4x", num_inference_steps=STEPS)
    assert e.value.param == "hr_upscaler" and "Latent" in str(e.value)
    with pytest.raises(InvalidArgumentError) as e:
        pipe.hires_fix("x", denoising_strength=0.0)
    assert e.value.param == "denoising_strength"
    with pytest.raises(InvalidArgumentError) as e:
        pipe.hires_fix("x", hr_scale=20)
    assert e.value.param == "hr_scale"
    with pytest.raises(InvalidArgumentError) as e:
        pipe.hires_fix("x", image=Image.new("RGB", (16, 16)))
    assert e.value.param == "image"
    pickle = tmp_path / "model.pth"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(InvalidArgumentError, match="pickle"):
        load_model_upscaler(pickle)


def test_cli_hires(ckpts, tmp_path, capsys):
    import json

    from fastsd.cli import main

    base = ["generate", "a fox", "--model", str(ckpts["eps"]), "--steps", "2", "--width", "24", "--height", "16",
            "--no-progress", "--seed", "4"]
    assert main([*base, "--out", str(tmp_path / "a.png"), "--hires", "2", "--hires-upscaler", "Nearest",
                 "--hires-strength", "0.5"]) == 0
    im = Image.open(tmp_path / "a.png")
    settings = json.loads(im.text["fastsd"])
    assert im.size == (48, 32) and settings["hires"]["upscaler"] == "Nearest" and settings["seed"] == 4
    assert "Size: 48x32" in im.text["parameters"] and "Hires upscale: 2, Hires steps: 2" in im.text["parameters"]
    assert main([*base, "--out", str(tmp_path / "b.png"), "--hires-steps", "3"]) == 2
    assert main([*base, "--out", str(tmp_path / "c.png"), "--hires", "2", "--hires-upscaler", "x4"]) == 2
    err = capsys.readouterr().err
    assert "--hires-upscaler must be one of" in err and "are for --hires SCALE" in err
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()
