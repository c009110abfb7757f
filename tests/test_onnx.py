"""ONNX export, the engine store, and the ONNX Runtime backend against eager PyTorch."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import copy_entries, engine_vs_module

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxslim")

from fastsd.export import (
    export_checkpoint,  # noqa: E402
    onnx_export,  # noqa: E402
)

from fastsd import Pipeline  # noqa: E402
from fastsd.backends.onnxruntime import OrtRunner  # noqa: E402
from fastsd.checkpoint import load_checkpoint  # noqa: E402
from fastsd.cli import main  # noqa: E402
from fastsd.engines import Profile, entry_dir, list_entries, prune  # noqa: E402
from fastsd.errors import InvalidArgumentError  # noqa: E402
from fastsd.families import family_for  # noqa: E402
from fastsd.networks import SD_NETWORKS  # noqa: E402

TOL = 1e-3
ALL_ORT = {n: "onnxruntime" for n in SD_NETWORKS}


@pytest.fixture(scope="module")
def store(ckpts, eps_onnx, tmp_path_factory):
    root = copy_entries(eps_onnx, tmp_path_factory.mktemp("engines"), "onnxruntime-*")  # eps, fp32
    export_checkpoint(str(ckpts["v"]), engine_dir=root, dtype="fp32")  # eps's architecture: refitted
    # the 9-channel UNet only: its text encoder and VAE are eps's graphs with other weights
    export_checkpoint(str(ckpts["inpaint9"]), engine_dir=root, dtype="fp32", networks=("unet",))
    export_checkpoint(str(ckpts["eps"]), engine_dir=root, dtype="fp16")
    return root


def pipe_pair(ckpts, pipes, store, variant):
    return Pipeline.from_pretrained(str(ckpts[variant]), backend="onnxruntime", engine_dir=str(store)), pipes(variant)


@pytest.mark.parametrize("network", SD_NETWORKS)
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 5e-2)])
def test_each_network_matches_pytorch(ckpts, store, network, precision, tol):
    """Each graph alone vs its fp32 PyTorch module, at a batch and size other than the trace's.
    fp16 graphs: max abs error <= 5e-2 relative to the output's max magnitude."""
    ckpt = load_checkpoint(str(ckpts["eps"]))
    info = ckpt.info
    entry = entry_dir(store, info.fingerprint, "onnxruntime", precision)
    profile = Profile(**json.loads((entry / "manifest.json").read_text())["profile"])
    spec = family_for(ckpt).specs[network]
    runner = OrtRunner(entry / f"{network}.onnx", spec, torch.device("cpu"), profile)
    got, want = engine_vs_module(ckpt, network, runner)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= tol * max(1.0, want.abs().max())


def test_sessions_take_torchs_thread_count(ckpts, store):
    """An application's torch.set_num_threads limits ONNX Runtime's sessions too (threads=0);
    an explicit count wins."""
    ckpt = load_checkpoint(str(ckpts["eps"]))
    entry = entry_dir(store, ckpt.info.fingerprint, "onnxruntime", "fp32")
    profile = Profile(**json.loads((entry / "manifest.json").read_text())["profile"])
    spec = family_for(ckpt).specs["text_encoder"]
    before = torch.get_num_threads()
    try:
        for torch_threads, threads, want in ((1, 0, 1), (2, 0, 2), (1, 3, 3)):
            torch.set_num_threads(torch_threads)
            runner = OrtRunner(entry / "text_encoder.onnx", spec, torch.device("cpu"), profile, threads=threads)
            assert runner.session.get_session_options().intra_op_num_threads == want
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("network", SD_NETWORKS)
def test_cpu_graph_loads_optimised_and_runs_the_same(ckpts, store, network, caplog):
    """An fp32 export keeps each graph as ONNX Runtime optimised it for this CPU; the runner
    loads that one, with nothing left to optimise, and it gives the exported graph's outputs
    bit for bit. Only the weights the optimiser changed are in its own data file, the others
    point into the exported graph's. Made on another machine or onnxruntime: the exported graph."""
    import onnx
    import onnxruntime as ort

    from fastsd.backends.onnxruntime import cpu_signature

    caplog.set_level("INFO", "fastsd")
    ckpt = load_checkpoint(str(ckpts["eps"]))
    entry = entry_dir(store, ckpt.info.fingerprint, "onnxruntime", "fp32")
    manifest = json.loads((entry / "manifest.json").read_text())
    record, profile = manifest["networks"][network], Profile(**manifest["profile"])
    assert record["cpu_graph"] == {"file": f"{network}.cpu.onnx", "for": cpu_signature()}
    assert {f"{network}.cpu.onnx", f"{network}.cpu.onnx.data"} <= set(record["sha256"])
    locations = {e.value for t in onnx.load(str(entry / f"{network}.cpu.onnx"), load_external_data=False
                                            ).graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {f"{network}.onnx.data", f"{network}.cpu.onnx.data"}
    spec = family_for(ckpt).specs[network]
    moved = {**record, "cpu_graph": {**record["cpu_graph"], "for": "onnxruntime 0.1, other"}}
    cpu, exported, elsewhere = (OrtRunner(entry / f"{network}.onnx", spec, torch.device("cpu"), profile, record=r)
                                for r in (record, None, moved))
    levels = ort.GraphOptimizationLevel
    assert cpu.session.get_session_options().graph_optimization_level == levels.ORT_DISABLE_ALL
    for other in (exported, elsewhere):
        assert other.session.get_session_options().graph_optimization_level == levels.ORT_ENABLE_ALL
    assert "was made for onnxruntime 0.1, other" in caplog.text
    torch.manual_seed(0)
    got, want = engine_vs_module(ckpt, network, cpu)
    torch.manual_seed(0)
    again, _ = engine_vs_module(ckpt, network, exported)
    assert torch.equal(got, again) and (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max())


def test_cpu_graph_is_not_what_a_refit_links(ckpts, store):
    """A refitted entry (the v checkpoint's, from eps's entry) links the exported graphs, not
    the donor's CPU graphs (they hold the donor's weights); fp16 entries have none."""
    for variant, precision in (("v", "fp32"), ("eps", "fp16")):
        entry = entry_dir(store, load_checkpoint(str(ckpts[variant])).info.fingerprint, "onnxruntime", precision)
        manifest = json.loads((entry / "manifest.json").read_text())
        assert not any("cpu_graph" in r for r in manifest["networks"].values())
        assert not list(entry.glob("*.cpu.onnx*"))


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint4", "inpaint9"])
def test_pipeline_onnx_matches_eager(ckpts, pipes, store, init_image, mask_image, mode, scheduler):
    variant = "inpaint9" if mode == "inpaint9" else "eps"
    kw = dict(num_inference_steps=4, scheduler=scheduler, output_type="np", seed=1)
    if mode != "txt2img":
        kw.update(image=init_image, strength=0.9)
    if mode.startswith("inpaint"):
        kw.update(mask_image=mask_image)
    ours, eager = pipe_pair(ckpts, pipes, store, variant)
    a, b = ours("a lighthouse", **kw), eager("a lighthouse", **kw)
    assert np.abs(a.images - b.images).max() <= TOL
    used = {"text_encoder", "unet", "vae_decoder"} | ({"vae_encoder"} if mode != "txt2img" else set())
    assert all(a.backends[n] == "onnxruntime" for n in (used if variant == "eps" else {"unet"}))


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_sde_karras", "unipc", "heun", "lcm"])
@pytest.mark.parametrize("mode", ["txt2img", "inpaint4"])
def test_new_samplers_onnx_match_eager(ckpts, pipes, store, init_image, mask_image, mode, scheduler):
    kw = dict(num_inference_steps=4, scheduler=scheduler, output_type="np", seed=1)
    if mode == "inpaint4":
        kw.update(image=init_image, mask_image=mask_image, strength=0.9)
    ours, eager = pipe_pair(ckpts, pipes, store, "eps")
    a, b = ours("a lighthouse", **kw), eager("a lighthouse", **kw)
    assert np.abs(a.images - b.images).max() <= TOL
    assert a.backends["unet"] == "onnxruntime"


def test_v_prediction_onnx(ckpts, pipes, store):
    ours, eager = pipe_pair(ckpts, pipes, store, "v")
    kw = dict(num_inference_steps=3, scheduler="euler_a", output_type="np", seed=2, height=24, width=40)
    assert np.abs(ours("x", **kw).images - eager("x", **kw).images).max() <= TOL


def test_auto_picks_onnxruntime_when_engines_exist(ckpts, store):
    assert Pipeline.from_pretrained(str(ckpts["eps"]), backend="auto", engine_dir=str(store)).backend.backends \
        == ALL_ORT


def test_missing_engines_fall_back(ckpts, tmp_path, caplog):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(tmp_path), fallback=True)
    out = pipe("a", num_inference_steps=2, output_type="np")
    assert set(out.backends.values()) == {"eager"}
    assert "no fp32 entry for this checkpoint" in caplog.text


def test_other_checkpoint_gets_its_own_entry(ckpts, eps_onnx, tmp_path):
    """Same architecture, other weights: a new entry; each pipeline uses its own engines."""
    other = shutil.copytree(ckpts["eps"], tmp_path / "other")
    unet = load_checkpoint(str(other)).unet
    from safetensors.torch import save_file
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in unet.state_dict().items()}
    save_file(sd, str(other / "unet" / "diffusion_pytorch_model.safetensors"))
    store = copy_entries(eps_onnx, tmp_path / "engines", "onnxruntime-*")
    (a_dir,) = store.glob("*/onnxruntime-*")
    b_dir = export_checkpoint(str(other), engine_dir=store)  # refitted from a: same graphs, b's weights
    assert a_dir != b_dir and a_dir.parent.name != b_dir.parent.name
    kw = dict(num_inference_steps=3, output_type="np", seed=0)
    for model in (ckpts["eps"], other):
        ort = Pipeline.from_pretrained(str(model), backend="onnxruntime", engine_dir=str(store))
        eager = Pipeline.from_pretrained(str(model), backend="eager")
        assert np.abs(ort("x", **kw).images - eager("x", **kw).images).max() <= TOL
    # an entry moved under another checkpoint's fingerprint is refused
    shutil.rmtree(b_dir)
    shutil.copytree(a_dir, b_dir)
    pipe = Pipeline.from_pretrained(str(other), backend="onnxruntime", engine_dir=str(store), fallback=True)
    assert set(pipe.backend.backends.values()) == {"eager"}


@pytest.mark.parametrize("file", ["unet.onnx", "unet.cpu.onnx.data"])
def test_tampered_engine_refused(ckpts, eps_onnx, tmp_path, caplog, file):
    store = copy_entries(eps_onnx, tmp_path / "engines", "onnxruntime-*")
    (entry,) = store.glob("*/onnxruntime-*")
    graph = entry / file
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    out = pipe("a", num_inference_steps=2, output_type="np")
    assert out.backends["unet"] == "eager" and out.backends["text_encoder"] == "onnxruntime"
    assert "does not match its manifest hash" in caplog.text
    assert any("does not match" in p for p in list_entries(store)[0]["problems"])


def test_manifest_without_clip_skip_means_zero(ckpts, tmp_path):
    store = tmp_path / "engines"
    entry = export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("text_encoder",))
    manifest = json.loads((entry / "manifest.json").read_text())
    del manifest["clip_skip"]
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store), fallback=True
                                    ).backend.backends["text_encoder"] == "onnxruntime"
    assert Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime",
                                    engine_dir=str(store), fallback=True, clip_skip=1
                                    ).backend.backends["text_encoder"] == "eager"


def test_other_fastsd_version_refused(ckpts, tmp_path):
    store = tmp_path / "engines"
    entry = export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("text_encoder",))
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "fastsd": "0.0.1"}))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store), fallback=True)
    assert pipe.backend.backends["text_encoder"] == "eager"


def test_interrupted_export_leaves_nothing(ckpts, tmp_path, monkeypatch):
    store = tmp_path / "engines"
    real = onnx_export.export_network

    def dies_on_unet(module, spec, *a, **kw):
        if spec.name == "unet":
            raise KeyboardInterrupt
        return real(module, spec, *a, **kw)

    monkeypatch.setattr(onnx_export, "export_network", dies_on_unet)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(str(ckpts["eps"]), engine_dir=store)
    leftovers = [p for p in store.rglob("*") if p.is_file()]
    assert leftovers == []
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store), fallback=True)
    assert set(pipe.backend.backends.values()) == {"eager"}


def test_reexport_replaces_entry_atomically(ckpts, tmp_path):
    store = tmp_path / "engines"
    first = export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("text_encoder",))
    second = export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("text_encoder", "vae_decoder"))
    assert first == second
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging or retired folders
    assert list_entries(store)[0]["networks"] == ["text_encoder", "vae_decoder"]


def test_a_subset_reexport_keeps_the_other_networks_digests(ckpts, tmp_path, monkeypatch):
    """Re-exporting one network keeps the entry's others by hard link; their digest records
    follow the link and the old entry's removal, so the next load reads none of their files."""
    from fastsd import hashing
    from fastsd.engines import check_entry

    monkeypatch.setattr(hashing, "SETTLED", -1.0)  # files just written are recorded (see hashing.SETTLED)
    store = tmp_path / "engines"
    entry = export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("text_encoder", "vae_decoder"))
    assert export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("vae_decoder",)) == entry
    monkeypatch.setattr(hashing, "digest_file", lambda *a: pytest.fail("a recorded engine file was read again"))
    fingerprint = load_checkpoint(str(ckpts["eps"])).info.fingerprint
    assert check_entry(entry, fingerprint, networks=("text_encoder", "vae_decoder"))[1] == {}


@pytest.fixture(scope="module")
def static_beside_dynamic(ckpts, eps_onnx, tmp_path_factory):
    """`export --static 24x40` of the eps UNet into a store that holds its dynamic entry:
    (store, dynamic entry, static entry). Tests read it; a test that writes copies it."""
    store = copy_entries(eps_onnx, tmp_path_factory.mktemp("static"), "onnxruntime-*")
    (dynamic,) = store.glob("*/onnxruntime-*")
    static = export_checkpoint(str(ckpts["eps"]), engine_dir=store, static="24x40", networks=("unet",))
    return store, dynamic, static


def test_static_shape_entry(ckpts, pipes, static_beside_dynamic, tmp_path, caplog):
    store = copy_entries(static_beside_dynamic[0], tmp_path / "engines", "onnxruntime-*-24x40")  # the static only
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    kw = dict(num_inference_steps=2, output_type="np", seed=4)
    out = pipe("x", height=24, width=40, **kw)
    assert out.backends["unet"] == "onnxruntime"
    assert np.abs(out.images - pipes("eps")("x", height=24, width=40, **kw).images).max() <= TOL
    assert pipe("x", height=32, width=32, **kw).backends["unet"] == "eager"
    assert "not the engine's static 24x40" in caplog.text
    # out.backends is each call's own: threads calling at both sizes at once each see what ran them
    sizes = [(24, 40), (32, 32)] * 4
    got: list = [None] * len(sizes)
    barrier = threading.Barrier(4)

    def worker(k):
        barrier.wait()
        for i in range(k, len(sizes), 4):
            got[i] = pipe("x", height=sizes[i][0], width=sizes[i][1], **kw).backends["unet"]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["onnxruntime", "eager"] * 4


LONG = "a (red:1.3) fox, " + "in the deep snow, " * 10  # 148 prompt tokens: 3 chunks (comma backtrack)
ENGINE_TOL = 2e-3


@pytest.mark.parametrize("profile", ["dynamic", "static"])
def test_long_weighted_prompt_runs_on_onnx_runtime(ckpts, pipes, static_beside_dynamic, tmp_path, profile):
    """A 150-token weighted prompt (a1111) on the dynamic and the static entry: the UNet's
    graph takes the 231-token text (a dynamic axis, up to 3 chunks), the text encoder the
    chunks as rows; within 2e-3 of eager."""
    store, dynamic, static = static_beside_dynamic
    pattern = "onnxruntime-fp32-24x40" if profile == "static" else "onnxruntime-fp32"
    store = copy_entries(store, tmp_path / "engines", pattern)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    kw = dict(num_inference_steps=2, output_type="np", seed=4, height=24, width=40, prompt_syntax="a1111",
              negative_prompt="(ugly:1.2)")
    out = pipe(LONG, **kw)
    assert out.backends["unet"] == "onnxruntime"
    if profile == "dynamic":
        assert out.backends["text_encoder"] == "onnxruntime"
    assert np.abs(out.images - pipes("eps")(LONG, **kw).images).max() <= ENGINE_TOL


def test_textual_inversion_runs_on_the_text_encoder_graph(ckpts, pipes, eps_onnx, tmp_path):
    """The text encoder's graph takes token embeddings: a textual inversion's vectors reach it
    without a rebuild (the runtime's table holds them); within 2e-3 of eager."""
    from safetensors.torch import save_file

    store = copy_entries(eps_onnx, tmp_path / "engines", "onnxruntime-fp32")
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    eager = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")
    width = pipe.text_encoder.config.hidden_size
    save_file({"mytok": torch.randn(2, width, generator=torch.Generator().manual_seed(5))},
              str(tmp_path / "emb.safetensors"))
    kw = dict(num_inference_steps=2, output_type="np", seed=4, negative_prompt="mytok")
    before = pipe("a mytok fox", **kw).images
    for p in (pipe, eager):
        p.load_textual_inversion(str(tmp_path / "emb.safetensors"))
    out = pipe("a mytok fox", **kw)
    assert out.backends["text_encoder"] == "onnxruntime" and out.backends["unet"] == "onnxruntime"
    assert np.abs(out.images - eager("a mytok fox", **kw).images).max() <= ENGINE_TOL
    assert np.abs(out.images - before).max() > 1e-3  # the vectors count
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(ckpts["eps"]), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(tmp_path / "emb.safetensors"))
    want = ref("a mytok fox", negative_prompt="mytok", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(4)).images
    assert np.abs(out.images - want).max() <= TOL  # diffusers' image, on the text encoder's graph
    pipe.unload_textual_inversion()
    assert np.array_equal(pipe("a mytok fox", **kw).images, before)


def test_an_entry_for_77_tokens_serves_short_prompts_only(ckpts, eps_onnx, tmp_path, caplog):
    """An entry made before long prompts (its profile has no max_chunks: one chunk) keeps
    serving prompts that fit 77 tokens; a longer one runs the UNet eager, with the warning."""
    store = copy_entries(eps_onnx, tmp_path / "engines", "onnxruntime-fp32")
    manifest_file = next(store.glob("*/onnxruntime-fp32/manifest.json"))
    manifest = json.loads(manifest_file.read_text())
    del manifest["profile"]["max_chunks"]
    manifest["networks"]["text_encoder"]["inputs"] = ["input_ids"]  # and its text encoder took token ids
    manifest_file.write_text(json.dumps(manifest))
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    kw = dict(num_inference_steps=1, output_type="np", seed=4, prompt_syntax="a1111")
    assert pipe("a (red:1.3) fox", **kw).backends == {"text_encoder": "eager", "unet": "onnxruntime",
                                                      "vae_decoder": "onnxruntime"}
    out = pipe(LONG, **kw)
    assert out.backends["unet"] == "eager" and out.backends["text_encoder"] == "eager"
    assert "a text of 231 tokens; the engine takes 77 per chunk, up to 1 chunk " in caplog.text
    assert "built to take token ids" in caplog.text


def test_static_and_dynamic_entries_coexist(ckpts, static_beside_dynamic, capsys):
    """`export --static` adds an entry beside the dynamic one (it used to replace it): a call
    at the static size and a call at any other size both run on ONNX Runtime."""
    store, dynamic, static = static_beside_dynamic
    assert dynamic.is_dir() and static.is_dir() and dynamic != static
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="auto", engine_dir=str(store))
    kw = dict(num_inference_steps=2, output_type="latent", seed=4)
    assert pipe("x", height=24, width=40, **kw).backends["unet"] == "onnxruntime"
    assert pipe("x", height=32, width=16, **kw).backends["unet"] == "onnxruntime"
    runners = pipe.backend.engines["unet"]
    assert [r.profile.static for r in runners] == [True, False]  # the static graph first where it fits
    assert runners[0].runner is not None and runners[1].runner is not None
    capsys.readouterr()
    assert main(["engines", "list", "--engine-dir", str(store)]) == 0
    listing = capsys.readouterr().out
    assert "static 24x40" in listing and "dynamic" in listing


def test_export_argument_errors(ckpts, tmp_path):
    with pytest.raises(InvalidArgumentError, match="HxW"):
        export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path, static="big")
    with pytest.raises(InvalidArgumentError, match="multiples of 2"):
        export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path, static="7x8")
    with pytest.raises(InvalidArgumentError, match="fp32 or fp16"):
        export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path, dtype="int8")
    with pytest.raises(InvalidArgumentError, match="unknown networks"):
        export_checkpoint(str(ckpts["eps"]), engine_dir=tmp_path, networks=("clip",))
    assert not any(tmp_path.iterdir())


def test_cli_export_list_prune(ckpts, tmp_path, capsys):
    store = tmp_path / "engines"
    assert main(["export", "--model", str(ckpts["eps"]), "--engine-dir", str(store), "--networks",
                 "text_encoder,vae_decoder", "--no-cpu-graph"]) == 0
    out = capsys.readouterr().out
    assert "text_encoder: exported in" in out and "wrote" in out
    assert out.index("text_encoder: exporting...") < out.index("text_encoder: exported in")  # said as it starts
    assert not list(store.rglob("*.cpu.onnx*"))
    assert main(["engines", "list", "--engine-dir", str(store)]) == 0
    assert "onnxruntime-fp32" in capsys.readouterr().out
    entry = next(store.glob("*/onnxruntime-fp32"))
    (entry.parent / ".staging-onnxruntime-fp32-dead").mkdir()  # an interrupted build
    assert main(["engines", "prune", "--engine-dir", str(store)]) == 0
    assert entry.exists() and not (entry.parent / ".staging-onnxruntime-fp32-dead").exists()
    (entry / "text_encoder.onnx").write_bytes(b"tampered")
    assert prune(store, dry_run=True) == [entry]
    assert main(["engines", "prune", "--engine-dir", str(store)]) == 0
    assert not store.exists() or not any(store.iterdir())
    assert main(["export", "--model", str(ckpts["eps"]), "--engine-dir", str(store), "--static", "3x3"]) == 2
    assert "multiples of 2" in capsys.readouterr().err


def test_clip_skip_entries(ckpts, tmp_path):
    store = tmp_path / "engines"
    export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("text_encoder",))
    skip1 = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime",
                                     engine_dir=str(store), fallback=True, clip_skip=1)
    assert skip1.backend.backends["text_encoder"] == "eager"  # the entry holds clip_skip 0
    export_checkpoint(str(ckpts["eps"]), engine_dir=store, networks=("text_encoder",), clip_skip=1)
    skip1 = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime",
                                     engine_dir=str(store), fallback=True, clip_skip=1)
    eager = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager", clip_skip=1)
    embeds = skip1.family.text_inputs("text_encoder", torch.randint(0, 500, (2, 77)))["inputs_embeds"]
    assert skip1.backend.backends["text_encoder"] == "onnxruntime"
    assert (skip1.backend.text_encoder(embeds) - eager.backend.text_encoder(embeds)).abs().max() < 1e-4
    with pytest.raises(InvalidArgumentError, match="clip_skip"):
        export_checkpoint(str(ckpts["eps"]), engine_dir=store, clip_skip=2)  # the tiny CLIP has 2 layers


def test_provider_chains():
    from fastsd.backends.onnxruntime import cuda_chain, providers_for

    assert providers_for(torch.device("cpu")) == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="no CUDAExecutionProvider"):
        cuda_chain(0, 1234, ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="null user stream"):
        cuda_chain(0, 0, ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_tensorrt_ep_is_opt_in_with_profile_shapes(ckpts, monkeypatch):
    """ORT's TensorRT EP only where asked for (FASTSD_ORT_TENSORRT=1), then with the spec's
    profile shapes and without the fp16 flag TensorRT 11 no longer has; CUDA on the work stream."""
    from fastsd.backends.onnxruntime import cuda_chain, tensorrt_ep_wanted

    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    names = lambda chain: [c[0] if isinstance(c, tuple) else c for c in chain]  # noqa: E731
    plain = cuda_chain(1, 1234, have)
    assert names(plain) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert plain[0][1]["user_compute_stream"] == "1234" and plain[0][1]["device_id"] == "1"
    assert plain[0][1]["prefer_nhwc"] == "1" and plain[0][1]["cudnn_conv_algo_search"] == "HEURISTIC"
    ckpt = load_checkpoint(str(ckpts["eps"]))
    shapes = family_for(ckpt).specs["unet"].profile_shapes(Profile.for_model(ckpt.info))
    trt = cuda_chain(1, 1234, have, shapes)
    assert names(trt) == have
    opts = trt[0][1]
    assert opts["user_compute_stream"] == "1234" and "trt_fp16_enable" not in opts
    assert opts["trt_profile_min_shapes"].startswith("sample:1x4x8x8,timestep:1,encoder_hidden_states:1x77x64")
    assert opts["trt_profile_max_shapes"].startswith("sample:8x4x32x32,")
    monkeypatch.delenv("FASTSD_ORT_TENSORRT", raising=False)
    assert not tensorrt_ep_wanted()
    monkeypatch.setenv("FASTSD_ORT_TENSORRT", "1")
    assert tensorrt_ep_wanted()


class _Session:
    def __init__(self, providers, options):
        self.providers, self.options = providers, options

    def get_providers(self):
        return self.providers

    def get_provider_options(self):
        return self.options


def test_session_without_the_providers_asked_is_refused():
    """ORT's wrapper falls back silently: to CPU where the CUDA provider fails to load, to
    CUDA without options (no work stream) where the TensorRT EP fails. Both are refused."""
    from fastsd.backends.onnxruntime import check_providers, cuda_chain

    chain = cuda_chain(0, 1234, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    stream = {"CUDAExecutionProvider": {"user_compute_stream": "1234", "has_user_compute_stream": "1"}}
    check_providers(_Session(["CUDAExecutionProvider", "CPUExecutionProvider"], stream), chain)
    with pytest.raises(RuntimeError, match="with CPUExecutionProvider instead of CUDAExecutionProvider"):
        check_providers(_Session(["CPUExecutionProvider"], {}), chain)
    lost = {"CUDAExecutionProvider": {"user_compute_stream": "0", "has_user_compute_stream": "0"}}
    with pytest.raises(RuntimeError, match="not on fastsd's work stream"):
        check_providers(_Session(["CUDAExecutionProvider", "CPUExecutionProvider"], lost), chain)
    trt_chain = cuda_chain(0, 1234, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                           {"sample": ((1,), (2,), (4,))})
    with pytest.raises(RuntimeError, match="instead of TensorrtExecutionProvider"):
        check_providers(_Session(["CUDAExecutionProvider", "CPUExecutionProvider"], lost), trt_chain)


def test_provider_fallback_runs_eager(ckpts, store, monkeypatch, caplog):
    """With the real onnxruntime (CPU build): a session asked for the CUDA provider gets the CPU
    one; the runner refuses it at load and the network runs in eager PyTorch, with a warning."""
    from fastsd.backends import onnxruntime as ort_kind

    chain = [("CUDAExecutionProvider", {"device_id": "0", "user_compute_stream": "1234"}), "CPUExecutionProvider"]
    monkeypatch.setattr(ort_kind, "providers_for", lambda device, **kw: chain)
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store), fallback=True)
    out = pipe("a fox", num_inference_steps=2, output_type="latent", seed=0)
    assert set(out.backends.values()) == {"eager"}
    assert "instead of CUDAExecutionProvider" in caplog.text


@pytest.mark.gpu
def test_cuda_provider_runs_on_the_work_stream():
    """ORT gets fastsd's non-default work stream (a null stream would be ignored)."""
    from fastsd.backends import work_stream
    from fastsd.backends.onnxruntime import providers_for

    dev = torch.device("cuda", 0)
    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chain = providers_for(dev, have=have)
    assert [c[0] if isinstance(c, tuple) else c for c in chain] == have[1:]
    stream = chain[0][1]["user_compute_stream"]
    assert stream == str(work_stream(dev).cuda_stream) and stream != "0"



def test_fp32_vae_retry_on_engines_builds_no_eager_backend(ckpts, store, pipes):
    """An overflowing decode on engines retries with the pipeline's fp32 VAE decoder alone,
    not a whole eager backend (every network moved to the device), and gives eager's pixels."""
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), backend="onnxruntime", engine_dir=str(store))
    assert set(pipe.backend.backends.values()) == {"onnxruntime"}
    latents = pipe("a fox", num_inference_steps=2, seed=0, output_type="latent").images
    ran: dict = {}
    got = pipe.backend.vae_decoder_fp32(latents / pipe.info.vae_scale, ran=ran)
    assert pipe.backend._eager is None and ran == {"vae_decoder": "eager-fp32"}
    want = pipes("eps").backend.vae_decoder(latents / pipe.info.vae_scale)
    assert torch.equal(got, want)


def test_refit_graph_writes_the_graph_an_export_gives(ckpts, eps_onnx, tmp_path):
    """What TensorRT and int8 builds compile from an entry whose weights are given at load:
    the donor's graph with a checkpoint's weights written in, byte for byte the export's."""
    import filecmp

    from fastsd.export.onnx_export import RefitError, refit_graph

    from fastsd.backends.kind import onnx_weights
    from fastsd.networks import weights_of

    ckpt = load_checkpoint(str(ckpts["eps"]))
    entry = eps_onnx / ckpt.info.fingerprint / "onnxruntime-fp32"
    record = json.loads((entry / "manifest.json").read_text())["networks"]["text_encoder"]
    weights = weights_of(family_for(ckpt).modules(ckpt)["text_encoder"])
    refit_graph(entry / "text_encoder.onnx", tmp_path / "text_encoder.onnx", weights, set(record["transposed"]))
    for f in ("text_encoder.onnx", "text_encoder.onnx.data"):
        assert filecmp.cmp(entry / f, tmp_path / f, shallow=False), f
    name = next(iter(onnx_weights(entry / "text_encoder.onnx")))  # a weight of the graph
    with pytest.raises(RefitError, match="is not a weight of this checkpoint"):
        refit_graph(entry / "text_encoder.onnx", tmp_path / "again.onnx",
                    {k: v for k, v in weights.items() if k != name}, set(record["transposed"]))
