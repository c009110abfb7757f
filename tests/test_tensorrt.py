"""TensorRT: the code shared with other backends runs everywhere (profiles -> min/opt/max
shapes, refit bookkeeping in the store, fallbacks); building and running engines needs
tensorrt and a GPU, and those tests skip without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsd import Pipeline
from fastsd.checkpoint import load_checkpoint
from fastsd.cli import main
from fastsd.engines import Profile, Staging, base_manifest, entry_dir, refit_source
from fastsd.networks import network_specs


@pytest.fixture(scope="module")
def info(ckpts):
    return load_checkpoint(str(ckpts["eps"])).info


def trt_shapes(network, info, profile):
    return network_specs(info)[network].profile_shapes(profile)


def test_dynamic_profile_shapes(info):
    p = Profile.for_model(info)  # tiny: default 32 px, VAE factor 2, profile 16..64 px, 1..4 images
    s = trt_shapes("unet", info, p)
    assert s["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))  # CFG doubles the batch
    assert s["timestep"] == ((1,), (2,), (8,))
    assert s["encoder_hidden_states"] == ((1, 77, 64), (2, 77, 64), (8, 231, 64))  # texts of 1..3 chunks
    assert trt_shapes("vae_decoder", info, p)["latent"] == ((1, 4, 8, 8), (1, 4, 16, 16), (4, 4, 32, 32))
    assert trt_shapes("text_encoder", info, p)["inputs_embeds"] == ((1, 77, 64), (2, 77, 64), (8, 77, 64))


def test_static_profile_shapes(info):
    s = trt_shapes("vae_encoder", info, Profile.for_model(info, (24, 40)))
    assert s["images"] == ((1, 3, 24, 40), (1, 3, 24, 40), (4, 3, 24, 40))


def _plan_entry(root, info, fingerprint, refittable=True, facts=None):
    from dataclasses import replace

    donor_info = replace(info, fingerprint=fingerprint)
    with Staging(entry_dir(root, fingerprint, "tensorrt", "fp16")) as stage:
        (stage.dir / "unet.plan").write_bytes(b"plan bytes")
        stage.add("unet", ["unet.plan"])
        return stage.commit(base_manifest(donor_info, "tensorrt", "fp16", Profile.for_model(info),
                                          refittable=refittable, weights=fingerprint, **(facts or {})))


def test_refit_source_same_architecture_only(info, ckpts, tmp_path):
    donor = _plan_entry(tmp_path, info, "aaaaaaaaaaaaaaaa")
    assert refit_source(tmp_path, info, "tensorrt", "fp16") == donor
    other_arch = load_checkpoint(str(ckpts["inpaint9"])).info
    assert refit_source(tmp_path, other_arch, "tensorrt", "fp16") is None
    assert refit_source(tmp_path, info, "tensorrt", "fp32") is None
    (donor / "unet.plan").write_bytes(b"corrupt")  # a damaged donor is never refitted from
    assert refit_source(tmp_path, info, "tensorrt", "fp16") is None


def test_refit_source_needs_same_runtime_and_profile(info, tmp_path):
    """A plan from another TensorRT or GPU does not deserialize; one for other shapes cannot
    serve this profile: neither is a donor."""
    donor = _plan_entry(tmp_path, info, "cccccccccccccccc", facts={"tensorrt": "10.13.0", "device_key": "cuda:H100"})
    same = {"tensorrt": "10.13.0", "device_key": "cuda:H100"}
    assert refit_source(tmp_path, info, "tensorrt", "fp16", same, Profile.for_model(info)) == donor
    assert refit_source(tmp_path, info, "tensorrt", "fp16", {**same, "tensorrt": "11.0.0"}) is None
    assert refit_source(tmp_path, info, "tensorrt", "fp16", {**same, "device_key": "cuda:L4"}) is None
    assert refit_source(tmp_path, info, "tensorrt", "fp16", same, Profile.for_model(info, (32, 32))) is None


def test_refit_source_skips_own_and_non_refittable(info, tmp_path):
    _plan_entry(tmp_path, info, info.fingerprint)
    _plan_entry(tmp_path, info, "bbbbbbbbbbbbbbbb", refittable=False)
    assert refit_source(tmp_path, info, "tensorrt", "fp16") is None


def test_without_tensorrt(ckpts, tmp_path, caplog, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="tensorrt", device="cpu", engine_dir=str(tmp_path),
                                    fallback=True)
    assert set(pipe.backend.backends.values()) == {"eager"}
    assert "need the tensorrt package" in caplog.text
    assert main(["build", "--model", str(ckpts["eps"]), "--backend", "tensorrt", "--engine-dir", str(tmp_path)]) == 2
    assert "tensorrt package" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_build_refit_and_run(ckpts, tmp_path):
    """Build fp16 engines, run them against eager fp16, then refit them to other weights."""
    import shutil

    import tensorrt as trt
    import torch
    from fastsd.export import export_checkpoint
    from fastsd.export.tensorrt import build_mode, build_tensorrt
    from safetensors.torch import save_file

    store = tmp_path / "engines"
    source = build_mode(trt)[1]  # the ONNX precision this TensorRT builds from
    export_checkpoint(str(ckpts["eps"]), engine_dir=store, dtype=source)
    built = build_tensorrt(str(ckpts["eps"]), engine_dir=store, refittable=True)
    kw = dict(num_inference_steps=4, output_type="np", seed=0)
    trt_pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="tensorrt", engine_dir=str(store))
    out = trt_pipe("a fox", **kw)
    assert set(out.backends.values()) == {"tensorrt"}
    eager = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")("a fox", **kw)
    assert np.abs(out.images - eager.images).max() < 0.05
    other = shutil.copytree(ckpts["eps"], tmp_path / "other")
    unet = load_checkpoint(str(other)).unet
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in unet.state_dict().items()},
              str(other / "unet" / "diffusion_pytorch_model.safetensors"))
    export_checkpoint(str(other), engine_dir=store, dtype=source)
    refitted = build_tensorrt(str(other), engine_dir=store)
    assert refitted != built
    assert (refitted / "manifest.json").read_text().count(built.parent.name) == 1  # refitted_from


# ---- the build's decisions, against a stand-in for the tensorrt module -------------------


class _Flags:
    def __init__(self, **members):
        for name, value in members.items():
            setattr(self, name, value)


class _FakeTrt:
    """Records what build_engine asks of TensorRT. `strongly_typed`/`fp16_flag`: which of
    the two the stand-in version has (TensorRT 11: only the first; 8.6: only the second)."""

    def __init__(self, strongly_typed=True, fp16_flag=True, cache_matches=True):
        self.NetworkDefinitionCreationFlag = _Flags(**({"STRONGLY_TYPED": 1} if strongly_typed else {}))
        self.BuilderFlag = _Flags(REFIT=2, **({"FP16": 3} if fp16_flag else {}))
        self.MemoryPoolType = _Flags(WORKSPACE=0)
        self.cache_matches, self.calls = cache_matches, []
        trt = self

        class Config:
            def set_flag(self, flag):
                trt.calls.append(("flag", flag))

            def set_memory_pool_limit(self, pool, size):
                pass

            def create_timing_cache(self, data):
                trt.calls.append(("cache", bytes(data)))
                return _Flags(serialize=lambda: b"new timing cache")

            def set_timing_cache(self, cache, ignore_mismatch):
                ok = trt.cache_matches or trt.calls[-1] == ("cache", b"")
                trt.calls.append(("set_cache", ok))
                return ok

            def get_timing_cache(self):
                return _Flags(serialize=lambda: b"new timing cache")

            def add_optimization_profile(self, profile):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                trt.calls.append(("network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return _Flags(set_shape=lambda name, lo, opt, hi: trt.calls.append(("shape", name, lo, opt, hi)))

            def build_serialized_network(self, network, config):
                return b"plan"

        self.Builder = Builder
        self.OnnxParser = lambda network, logger: _Flags(parse_from_file=lambda path: True)


@pytest.mark.parametrize("strongly,fp16,want", [
    (True, False, ("strongly_typed", "fp16")),  # TensorRT 11: no FP16 flag at all
    (True, True, ("strongly_typed", "fp16")),  # 10.x: both; the FP16 flag is deprecated from 10.12
    (False, True, ("fp16_flag", "fp32")),  # before strongly typed networks
])
def test_build_mode_by_version(strongly, fp16, want):
    from fastsd.export.tensorrt import build_mode

    assert build_mode(_FakeTrt(strongly, fp16)) == want


def test_build_mode_neither_is_an_error():
    from fastsd.export.tensorrt import build_mode

    from fastsd.errors import FastSDError

    with pytest.raises(FastSDError, match="neither strongly typed"):
        build_mode(_FakeTrt(False, False))


@pytest.mark.parametrize("strongly,fp16,refit", [(True, False, False), (True, True, True), (False, True, False)])
def test_build_engine_flags(info, tmp_path, strongly, fp16, refit):
    from fastsd.export.tensorrt import build_engine

    trt = _FakeTrt(strongly, fp16)
    shapes = trt_shapes("unet", info, Profile.for_model(info))
    assert build_engine(trt, tmp_path / "unet.onnx", shapes, tmp_path / "cache", None, refit) == b"plan"
    flags = [c[1] for c in trt.calls if c[0] == "flag"]
    assert [c[1] for c in trt.calls if c[0] == "network"] == [1 << 1 if strongly else 0]
    assert (3 in flags) == (not strongly)  # FP16 only without strong typing
    assert (2 in flags) == refit  # REFIT only when asked
    assert [c[1:] for c in trt.calls if c[0] == "shape"] == [(n, *s) for n, s in shapes.items()]
    assert (tmp_path / "cache").read_bytes() == b"new timing cache"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary file left behind


def test_mismatched_timing_cache_is_replaced(info, tmp_path, caplog):
    from fastsd.export.tensorrt import build_engine

    (tmp_path / "cache").write_bytes(b"from another GPU")
    trt = _FakeTrt(cache_matches=False)
    build_engine(trt, tmp_path / "unet.onnx", {}, tmp_path / "cache", None, False)
    assert [c for c in trt.calls if c[0] in ("cache", "set_cache")] == [
        ("cache", b"from another GPU"), ("set_cache", False), ("cache", b""), ("set_cache", True)]
    assert "fresh timing cache" in caplog.text


def test_profile_comes_from_the_onnx_entry(info):
    from dataclasses import asdict

    from fastsd.export.common import entry_profile

    from fastsd.errors import FastSDError

    dynamic, static = Profile.for_model(info), Profile.for_model(info, (24, 40))
    assert entry_profile({"profile": asdict(dynamic)}, None) == dynamic
    assert entry_profile({"profile": asdict(static)}, None) == static
    assert entry_profile({"profile": asdict(static)}, (24, 40)) == static
    with pytest.raises(FastSDError, match="exported dynamic; export them with --static 24x40"):
        entry_profile({"profile": asdict(dynamic)}, (24, 40))
    with pytest.raises(FastSDError, match="exported static 24x40"):
        entry_profile({"profile": asdict(static)}, (32, 32))


def test_engine_check_refuses_disagreeing_engines():
    import torch
    from fastsd.export.tensorrt import check_engine

    from fastsd.errors import FastSDError

    module = torch.nn.Linear(4, 3)
    x = (torch.randn(2, 4),)
    with torch.no_grad():
        exact = module(*x)
    assert check_engine("unet", lambda t: exact.half(), module, x, 2e-2) < 2e-2
    with pytest.raises(FastSDError, match="disagrees with eager"):
        check_engine("unet", lambda t: exact + 1.0, module, x, 2e-2)
    with pytest.raises(FastSDError, match="relative error inf"):
        check_engine("unet", lambda t: exact * float("nan"), module, x, 2e-2)


def test_undeserializable_plan_is_a_clear_error():
    from fastsd.backends.tensorrt import deserialize

    trt = _Flags(Runtime=lambda logger: _Flags(deserialize_cuda_engine=lambda plan: None))
    with pytest.raises(RuntimeError, match="cannot deserialize unet .*another TensorRT version or GPU"):
        deserialize(trt, None, b"plan", "unet (unet.plan)")


# ---- the runner, against a stand-in tensorrt (deserialising, refit, device, buffers) -------


class _Weights:
    """What TensorRT's Weights has: dtype, size, nbytes and numpy() (no shape)."""

    def __init__(self, dtype, size, nbytes):
        self.dtype, self.size, self.nbytes = dtype, size, nbytes

    def numpy(self):
        return np.zeros(self.size, dtype=np.float16)


class _RuntimeTrt:
    """The part of tensorrt a TrtRunner touches, recording what it is asked."""

    float32, float16, bfloat16, int32, int64 = "f32", "f16", "bf16", "i32", "i64"

    def __init__(self, plan_weights: dict | None = None):
        trt, self.events, self.set = self, [], {}
        self.plan_weights = plan_weights or {}

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Engine:
            device_memory_size_v2 = 64

            def get_tensor_dtype(self, name):
                return trt.int64 if name == "timestep" else trt.float16

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                trt.events.append("deserialize")
                return Engine()

        class Refitter:
            def __init__(self, engine, logger):
                trt.events.append("refitter")

            def get_all_weights(self):
                return list(trt.plan_weights)

            def get_weights_prototype(self, name):
                size = trt.plan_weights[name]
                return _Weights(trt.float16, size, 2 * size)

            def set_named_weights(self, name, weights):
                trt.set[name] = weights
                return True

            def refit_cuda_engine(self):
                trt.events.append("refit")
                return True

        self.Logger, self.Runtime, self.Refitter = Logger, Runtime, Refitter
        self.Weights = lambda array: array


@pytest.fixture
def unet_spec(info):
    return network_specs(info)["unet"]


def _runner(monkeypatch, tmp_path, spec, trt, record=None):
    import sys

    from fastsd.backends.tensorrt import TrtRunner

    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "unet.plan").write_bytes(b"plan")
    return TrtRunner(tmp_path / "unet.plan", spec, torch.device("cpu"), None, record=record)


def test_refit_compares_size_and_dtype(monkeypatch, tmp_path, unet_spec):
    """TensorRT's weights prototype has no shape: the refit checks the number of values and
    casts to the plan's dtype (before, every LoRA load on a TensorRT engine raised)."""
    from fastsd.backends.kind import WEIGHTS_BY_NAME, RefitUnsupported

    trt = _RuntimeTrt({"conv_in.weight": 12, "proj.weight": 6})
    runner = _runner(monkeypatch, tmp_path, unet_spec, trt, {"weights_layout": WEIGHTS_BY_NAME,
                                                              "transposed": ["proj.weight"]})
    runner.set_weights({"conv_in.weight": torch.ones(4, 3), "proj.weight": torch.ones(2, 3),
                        "unused.weight": torch.ones(5)}, at_base=False)
    assert trt.events[-1] == "refit" and set(trt.set) == {"conv_in.weight", "proj.weight"}
    assert trt.set["conv_in.weight"].dtype == np.float16 and trt.set["proj.weight"].shape == (3, 2)
    with pytest.raises(RefitUnsupported, match="has 4 values, the plan's has 12"):
        runner.set_weights({"conv_in.weight": torch.ones(2, 2)}, at_base=False)


def test_runner_works_on_the_pipelines_device(monkeypatch, tmp_path, unet_spec):
    """Deserialising (and so the engine's memory) happens with the pipeline's device current,
    not whatever device is current (GPU 0) on a machine of several GPUs."""
    from contextlib import contextmanager

    from fastsd.backends import tensorrt as trt_kind

    trt, entered = _RuntimeTrt(), []

    @contextmanager
    def recording(device):
        entered.append(str(device))
        trt.events.append(f"enter {device}")
        yield
        trt.events.append(f"leave {device}")

    monkeypatch.setattr(trt_kind, "on_device", recording)
    _runner(monkeypatch, tmp_path, unet_spec, trt)
    assert trt.events == ["enter cpu", "deserialize", "leave cpu"]


def test_absent_residuals_are_zeroed_once_per_slot(ckpts, unet_spec):
    """A UNet engine built with ControlNet residual inputs, called without them: the buffer is
    zeroed on the first such call, left alone on the next, refilled when a call brings them."""
    from dataclasses import replace

    from fastsd.backends.tensorrt import TrtRunner
    from fastsd.networks import residual_specs

    residuals = residual_specs(load_checkpoint(str(ckpts["eps"])).unet.config)
    spec = replace(unet_spec, inputs=unet_spec.inputs + residuals)
    runner = object.__new__(TrtRunner)
    runner.spec = spec
    first = residuals[0].name
    shapes = spec.shapes(2, 32, 32)
    slot = {"bufs": {n: torch.full(shapes[n], 7.0) for n in spec.input_names}, "zeroed": set()}
    plain = {n: torch.rand(shapes[n]) for n in ("sample", "timestep", "encoder_hidden_states")}
    runner._fill(slot, plain)
    assert torch.equal(slot["bufs"]["sample"], plain["sample"]) and not slot["bufs"][first].any()
    slot["bufs"][first].fill_(3.0)  # not zeroed again while calls leave it out
    runner._fill(slot, plain)
    assert (slot["bufs"][first] == 3.0).all()
    given = torch.rand(shapes[first])
    runner._fill(slot, {**plain, first: given})
    assert torch.equal(slot["bufs"][first], given)
    runner._fill(slot, plain)  # a call without ControlNet after one with: zeros again
    assert not slot["bufs"][first].any()
