"""Networks built on first use (fastsd/components.py): a checkpoint whose files were loaded on
this machine before is read from its configs alone, and each PyTorch module is built when
something needs it, the same module, the same ModelInfo and the same images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import copy_entries

import fastsd.components
import fastsd.hashing
from fastsd import Pipeline
from fastsd.backends.eager import Fp32VaeDecoder
from fastsd.checkpoint import load_checkpoint
from fastsd.errors import CheckpointError
from fastsd.synthetic import build

NETWORKS = ("text_encoder", "unet", "vae")


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    """A cache of its own (nothing recorded yet) in which every digest may be recorded at once
    (files written just now count as settled)."""
    monkeypatch.setenv("FASTSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fastsd.hashing, "SETTLED", -1.0)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return build(tmp_path_factory.mktemp("xl-deferred") / "xl", "tiny-xl", seed=4)


def states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_a_checkpoint_loaded_before_is_read_from_its_configs(ckpts, xl, fresh_cache, which):
    path = str(ckpts["eps"] if which == "sd" else xl)
    networks = NETWORKS + (("text_encoder_2",) if which == "sdxl" else ())
    first = load_checkpoint(path)
    assert all(first.built(n) is not None for n in networks)  # first sight: built and checked now
    again = load_checkpoint(path)
    assert all(again.built(n) is None for n in networks)  # nothing built, nothing mapped
    assert again.info == first.info and again.info.architecture == first.info.architecture
    assert again.configs == first.configs
    for n in (n for n in networks if n.startswith("text_encoder")):  # read from the file, encoder not built
        assert torch.equal(again.token_table(n).weight, first.token_table(n).weight)
        assert again.built(n) is None
    for n in networks:  # built on first use: the same module
        assert states_equal(getattr(again, n), getattr(first, n))
        assert not getattr(again, n).training and again.built(n) is getattr(again, n)


def test_eager_images_are_the_same_from_a_deferred_checkpoint(ckpts, fresh_cache, init_image):
    call = dict(num_inference_steps=2, output_type="np", seed=3)
    first = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")
    assert first.ckpt.built("unet") is not None
    again = Pipeline.from_pretrained(str(ckpts["eps"]), backend="eager")
    assert np.array_equal(again("a lighthouse", **call).images, first("a lighthouse", **call).images)
    assert np.array_equal(again("a", image=init_image, strength=0.6, **call).images,
                          first("a", image=init_image, strength=0.6, **call).images)


def test_a_pipeline_its_engines_serve_builds_no_network(ckpts, eps_onnx, fresh_cache, tmp_path):
    pytest.importorskip("onnxruntime")
    store = copy_entries(eps_onnx, tmp_path, "onnxruntime-fp32")
    kw = dict(backend="onnxruntime", engine_dir=str(store))
    call = dict(num_inference_steps=2, output_type="np", seed=1)
    built = Pipeline.from_pretrained(str(ckpts["eps"]), **kw)  # first sight: the modules are built
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), **kw)
    image = pipe("a lighthouse", **call).images
    assert set(pipe.backend.backends.values()) == {"onnxruntime"}
    assert all(pipe.ckpt.built(n) is None for n in NETWORKS)
    assert np.array_equal(image, built("a lighthouse", **call).images)


def test_the_cli_on_engines_imports_no_model_class(ckpts, eps_onnx, fresh_cache, tmp_path):
    """`fastsd generate` where engines serve every network: neither diffusers' nor
    transformers' model classes are imported (seconds of a cold start), nor diffusers at all."""
    pytest.importorskip("onnxruntime")
    store = copy_entries(eps_onnx, tmp_path, "onnxruntime-fp32")
    load_checkpoint(str(ckpts["eps"]))  # first sight: recorded
    args = ["generate", "a", "--model", str(ckpts["eps"]), "--backend", "onnxruntime", "--engine-dir", str(store),
            "--steps", "1", "--no-progress", "--out", str(tmp_path / "x.png")]
    code = ("import sys, fastsd.cli; rc = fastsd.cli.main(sys.argv[1:]); "
            "print(rc, sorted(m for m in ('diffusers', 'transformers.models.clip.modeling_clip') if m in sys.modules))")
    env = dict(os.environ, FASTSD_CACHE=str(fresh_cache))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout
    assert (tmp_path / "x.png").is_file()


def test_a_file_changed_since_the_load_is_refused_at_build(ckpts, fresh_cache, tmp_path):
    path = shutil.copytree(ckpts["eps"], tmp_path / "ckpt")
    load_checkpoint(str(path))
    ckpt = load_checkpoint(str(path))
    assert ckpt.built("unet") is None
    weights = next((path / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # the last weight's bytes, the header intact
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed since the checkpoint was loaded"):
        _ = ckpt.unet
    assert ckpt.built("unet") is None


def test_records_are_kept_per_library_version(ckpts, fresh_cache, monkeypatch):
    load_checkpoint(str(ckpts["eps"]))
    real = fastsd.components.metadata.version
    monkeypatch.setattr(fastsd.components.metadata, "version", lambda lib: real(lib) + ".other")
    ckpt = load_checkpoint(str(ckpts["eps"]))  # another diffusers / transformers: built and checked again
    assert all(ckpt.built(n) is not None for n in NETWORKS)


@pytest.mark.parametrize("table", ["not json", json.dumps({"format": 99, "records": {}}),
                                   json.dumps({"format": 1, "records": []})])
def test_a_broken_record_table_costs_a_build(ckpts, fresh_cache, table):
    load_checkpoint(str(ckpts["eps"]))
    (fresh_cache / fastsd.components.LOADED_TABLE).write_text(table)
    ckpt = load_checkpoint(str(ckpts["eps"]))
    assert all(ckpt.built(n) is not None for n in NETWORKS)


def test_the_fp32_decoder_of_a_deferred_vae_decodes_the_same(ckpts, fresh_cache):
    first = load_checkpoint(str(ckpts["eps"]))
    ckpt = load_checkpoint(str(ckpts["eps"]))
    decoder = Fp32VaeDecoder(ckpt.as_loaded("vae"))
    assert ckpt.built("vae") is None
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decoder(latent), Fp32VaeDecoder(first.vae)(latent))
    assert ckpt.built("vae") is None  # its own VAE, apart from the live one


def test_the_cli_shows_no_library_bar_where_it_builds_networks(ckpts, fresh_cache, tmp_path):
    """First sight (every network built): fastsd's own lines only, no diffusers or transformers
    progress bar, although neither library is imported before the build; a prompt over 77
    tokens read literally gets fastsd's line saying what was dropped, not transformers'
    "will result in indexing errors" (it will not: fastsd truncates)."""
    args = ["generate", "a lighthouse " * 60, "--model", str(ckpts["eps"]), "--backend", "eager", "--steps", "1",
            "--no-progress", "--prompt-syntax", "plain", "--out", str(tmp_path / "x.png")]
    code = "import sys, fastsd.cli; sys.exit(fastsd.cli.main(sys.argv[1:]))"
    env = dict(os.environ, FASTSD_CACHE=str(fresh_cache))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Loading" not in out.stderr and "it/s]" not in out.stderr, out.stderr
    assert "fastsd: WARNING: prompt longer than 77 tokens was truncated" in out.stderr
    assert "indexing errors" not in out.stderr and "Token indices" not in out.stderr, out.stderr


@pytest.mark.parametrize("damage", [lambda c: c.pop("sample_size"), lambda c: c.update(block_out_channels="x")])
def test_a_damaged_record_costs_a_build(ckpts, fresh_cache, damage):
    load_checkpoint(str(ckpts["eps"]))
    path = fresh_cache / fastsd.components.LOADED_TABLE
    table = json.loads(path.read_text())
    for config in table["records"].values():
        if "sample_size" in config:  # the UNet's and the VAE's
            damage(config)
    path.write_text(json.dumps(table))
    ckpt = load_checkpoint(str(ckpts["eps"]))
    assert ckpt.built("unet") is not None and ckpt.built("vae") is not None
    assert ckpt.built("text_encoder") is None  # its record is intact
    assert ckpt.info == load_checkpoint(str(ckpts["eps"])).info
