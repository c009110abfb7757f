"""Session fixtures: tiny random-weight checkpoints of the real SD architectures,
built once per test run in diffusers format, and the diffusers pipelines that serve
as the reference oracle."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd.backends.kind import export_module
from fastsd.synthetic import build, build_controlnet

export_module("onnx_export")  # fastsd.export also where the tests run from a source tree that was not installed

VARIANTS = {
    # name: build kwargs
    "eps": {},  # SD 1.x layout, epsilon, leading spacing, PNDM config
    "v": {"scheduler": {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, "seed": 1},
    "inpaint9": {"unet_in_channels": 9, "seed": 2},
    # scheduler config without timestep_spacing/set_alpha_to_one: each sampler's default applies
    "defaults": {"scheduler": {"timestep_spacing": None, "set_alpha_to_one": None}, "seed": 3},
}


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # two workers on two cores: one thread each (intra-op threads of both would fight for
        # the cores; the tiny networks gain nothing from a second thread)
        torch.set_num_threads(1)  # ONNX Runtime sessions follow it
        os.environ["OMP_NUM_THREADS"] = "1"  # and so do the processes tests start (servers, bench workers)


def _module_fixture_group(item) -> str | None:
    """The test module's name where `item` uses a module-scoped fixture of its own module:
    those tests go to one pytest-xdist worker (the fixture is built once, not once per worker).
    Fixtures named with a leading underscore (autouse bookkeeping) do not count."""
    module = item.getparent(pytest.Module).nodeid
    for name in item.fixturenames:
        defs = item._fixtureinfo.name2fixturedefs.get(name)
        if not name.startswith("_") and defs and defs[-1].scope == "module" and defs[-1].baseid == module:
            return module
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    # `slow` tests first: pytest-xdist hands out single tests in this order (groups, largest
    # first, before them), and a long test started last would leave the other worker idle
    items.sort(key=lambda item: "slow" not in item.keywords)
    for item in items:
        group = _module_fixture_group(item)
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="tensorrt is not importable"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the fastsd cache (synthetic models, fingerprints) inside the test run."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTSD_CACHE", str(tmp_path_factory.mktemp("fastsd-cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


def shared(tmp_path_factory, name: str, make) -> Path:
    """The folder `name`, made by `make(folder)` once per test run: under pytest-xdist, the
    first worker to ask makes it (the others wait on its lock) and every worker reads it. A
    make that fails leaves no folder behind; the next worker to ask tries again (and fails
    with its own error)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, done = root / "shared" / name, root / "shared" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(str(root / "shared" / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def _build_variants(root: Path) -> None:
    import json

    for name, kw in VARIANTS.items():
        kw = dict(kw)
        sched = kw.pop("scheduler", None)
        path = build(root / name, "tiny", scheduler=sched, **kw)
        if sched:  # None means "drop the key", as older configs do
            f = path / "scheduler" / "scheduler_config.json"
            cfg = {k: v for k, v in json.loads(f.read_text()).items() if v is not None}
            f.write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    root = shared(tmp_path_factory, "ckpts", _build_variants)
    return {name: root / name for name in VARIANTS}


# The eps checkpoint's engines, built once per run and shared by the workers (exports and
# AOTInductor builds are the suite's slowest steps). Tests copy the entries they need into
# stores of their own (copy_entries), so no test changes another's.


@pytest.fixture(scope="session")
def eps_onnx(ckpts, tmp_path_factory):
    """export_checkpoint(eps): fp32, every network, dynamic shapes."""
    from fastsd.export import export_checkpoint

    return shared(tmp_path_factory, "eps-onnx",
                  lambda root: export_checkpoint(str(ckpts["eps"]), engine_dir=root, dtype="fp32"))


@pytest.fixture(scope="session")
def tiny_controlnet(tmp_path_factory) -> Path:
    """A ControlNet of the tiny SD architecture (random weights), shared by the workers: what
    a build of the session's checkpoints with --controlnet takes. The residual inputs it gives
    the UNet have the UNet's shapes, whatever the ControlNet's weights."""
    return shared(tmp_path_factory, "controlnet", lambda root: build_controlnet(root / "tiny", "tiny")) / "tiny"


@pytest.fixture(scope="session")
def eps_compiled(ckpts, tiny_controlnet, tmp_path_factory):
    """build_compiled(eps): text encoder, UNet and VAE decoder at the checkpoint's 32x32, the
    UNet with the ControlNet residual inputs (as `fastsd build --controlnet` makes it; zeros
    where a call has no ControlNet): test_controlnet compiles its own ControlNet beside it. The
    UNet package without those inputs is SD-XL's (test_sdxl): each UNet package costs ~35 s."""
    from fastsd.export.compiled import build_compiled

    return shared(tmp_path_factory, "eps-compiled", lambda root: build_compiled(
        str(ckpts["eps"]), engine_dir=root, networks=("text_encoder", "unet", "vae_decoder"),
        controlnets=(str(tiny_controlnet),)))


def copy_entries(source, store, pattern: str):
    """Copy the entries of `source` (an engine store) whose kind folder matches `pattern` into `store`."""
    store = Path(store)
    for entry in sorted(Path(source).glob(f"*/{pattern}")):
        shutil.copytree(entry, store / entry.parent.name / entry.name)
    return store


@pytest.fixture(scope="session")
def pipes(ckpts):
    from fastsd import Pipeline

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Pipeline.from_pretrained(str(ckpts[name]), device="cpu")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def init_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # H=40, W=48


@pytest.fixture(scope="session")
def mask_image():
    m = np.zeros((40, 48), dtype=np.uint8)
    m[8:30, 10:40] = 255
    return Image.fromarray(m)


# fastsd sampler name -> the diffusers scheduler class and from_config options it matches (the
# oracle the parity tests build; written out here, not read from fastsd's own table)
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def engine_vs_module(ckpt, network: str, runner):
    """(engine output, eager fp32 module output) of `network` on sample inputs at a batch and
    size other than an entry's trace (3 images, 24x40); the text encoder gets the embeddings
    of real token ids."""
    from fastsd.families import family_for
    from fastsd.networks import wrap

    family = family_for(ckpt)
    spec = family.specs[network]
    args = spec.sample_inputs(3, 24, 40, torch.float32)
    if network == "text_encoder":
        args = tuple(family.text_inputs(network, torch.randint(0, 500, (3, 77))).values())
    with torch.no_grad():
        want = wrap(ckpt)[network](*args)
    return runner(**dict(zip(spec.input_names, args, strict=True))), want
