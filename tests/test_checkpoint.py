"""Checkpoint formats, validation, fingerprints and the errors a bad file gets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastsd import Pipeline
from fastsd.checkpoint import load_checkpoint, resolve
from fastsd.errors import CheckpointError, ModelNotFoundError, PickleRefusedError
from fastsd.single_file import to_original_layout
from fastsd.synthetic import build

RUN = dict(num_inference_steps=3, output_type="np", height=16, width=24)


def test_model_info_read_from_configs(ckpts):
    info = load_checkpoint(str(ckpts["eps"])).info
    assert (info.vae_scale, info.vae_factor, info.latent_channels) == (0.5, 2, 4)  # not SD's 0.18215 / 8
    assert (info.unet_in_channels, info.sample_size, info.cross_attention_dim, info.max_tokens) == (4, 16, 64, 77)
    assert info.default_size == 32
    assert load_checkpoint(str(ckpts["inpaint9"])).info.unet_in_channels == 9
    assert load_checkpoint(str(ckpts["v"])).info.scheduler["prediction_type"] == "v_prediction"


def test_fingerprint_stable_and_content_sensitive(ckpts, tmp_path):
    a = load_checkpoint(str(ckpts["eps"])).info.fingerprint
    assert a == load_checkpoint(str(ckpts["eps"])).info.fingerprint
    assert a != load_checkpoint(str(ckpts["v"])).info.fingerprint
    copy = shutil.copytree(ckpts["eps"], tmp_path / "copy")
    assert load_checkpoint(str(copy)).info.fingerprint == a  # content, not path
    f = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # flip one bit of one weight
    f.write_bytes(bytes(data))
    assert load_checkpoint(str(copy)).info.fingerprint != a


@pytest.mark.parametrize("arch,family", [("tiny", "sd15"), ("tiny2", "sd21")])
def test_single_file_matches_folder(tmp_path, arch, family):
    folder = build(tmp_path / "folder", arch, vae_scaling_factor=0.18215)  # the carried SD scale
    single = tmp_path / "single"
    single.mkdir()
    save_file(to_original_layout(load_checkpoint(str(folder)), family), str(single / "model.safetensors"))
    shutil.copytree(folder / "tokenizer", single / "tokenizer")
    a = Pipeline.from_pretrained(str(folder))("a cat", generator=torch.Generator().manual_seed(0), **RUN).images
    pipe = Pipeline.from_pretrained(str(single / "model.safetensors"))
    b = pipe("a cat", generator=torch.Generator().manual_seed(0), **RUN).images
    assert np.abs(a - b).max() == 0.0
    assert pipe.info.scheduler["prediction_type"] == ("epsilon" if family == "sd15" else "v_prediction")
    assert pipe.info.sample_size == (64 if family == "sd15" else 96)  # carried configs


def test_single_file_without_tokenizer(tmp_path, ckpts):
    save_file(to_original_layout(load_checkpoint(str(ckpts["eps"])), "sd15"), str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_checkpoint(str(tmp_path / "m.safetensors"))


def test_single_file_other_layout(tmp_path):
    save_file({"conditioner.embedders.0.x": torch.zeros(2)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="not an SD 1.x/2.x"):
        load_checkpoint(str(tmp_path / "xl.safetensors"))


def test_prediction_type_override(ckpts):
    pipe = Pipeline.from_pretrained(str(ckpts["eps"]), prediction_type="v_prediction")
    assert pipe.info.scheduler["prediction_type"] == "v_prediction"


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_checkpoint("/no/such/model")


def test_folder_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_checkpoint(str(tmp_path))


def test_not_a_checkpoint_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(ckpts, tmp_path, damage):
    copy = shutil.copytree(ckpts["eps"], tmp_path / "c")
    f = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(str(copy))


def test_truncated_single_file(ckpts, tmp_path):
    save_file(to_original_layout(load_checkpoint(str(ckpts["eps"])), "sd15"), str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(tmp_path / "m.safetensors"))


def test_pickle_refused_unless_opted_in(ckpts, tmp_path):
    sd = to_original_layout(load_checkpoint(str(ckpts["eps"])), "sd15")
    torch.save({"state_dict": sd}, tmp_path / "m.ckpt")
    shutil.copytree(ckpts["eps"] / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        load_checkpoint(str(tmp_path / "m.ckpt"))
    assert load_checkpoint(str(tmp_path / "m.ckpt"), allow_pickle=True).info.unet_in_channels == 4


def test_pickle_only_folder_refused(ckpts, tmp_path):
    copy = shutil.copytree(ckpts["eps"], tmp_path / "p")
    w = copy / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file
    torch.save(load_file(str(w)), copy / "unet" / "diffusion_pytorch_model.bin")
    w.unlink()
    with pytest.raises(PickleRefusedError):
        load_checkpoint(str(copy))
    assert load_checkpoint(str(copy), allow_pickle=True).info.unet_in_channels == 4


def test_hub_id_from_cache(ckpts, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(ckpts["eps"], repo / "snapshots" / "0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve("acme/tiny-sd") == repo / "snapshots" / "0123abcd"
    with pytest.raises(ModelNotFoundError, match="not in the hub cache"):
        resolve("acme/not-cached")


def test_synthetic_unknown():
    with pytest.raises(ModelNotFoundError, match="unknown synthetic"):
        resolve("synthetic:sd99")


def test_synthetic_built_once():
    first = resolve("synthetic:tiny")
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert resolve("synthetic:tiny") == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    assert json.loads((first / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"


def test_non_finite_weights_are_refused_at_load(ckpts, tmp_path):
    """A checkpoint whose weights hold NaN or infinity (a bad merge) is refused when loaded,
    naming the file and weight, not loaded to fail every call with a NumericalError that
    blames guidance and dtype: a diffusers folder, a single file and a VAE file."""
    from safetensors.torch import load_file

    copy = shutil.copytree(ckpts["eps"], tmp_path / "c")
    _unet_with_a_nan_is_refused(copy)
    single = tmp_path / "single"
    single.mkdir()
    state = to_original_layout(load_checkpoint(str(ckpts["eps"])), "sd15")
    key = next(k for k in state if k.endswith("decoder.conv_in.weight"))
    state[key] = state[key].clone()
    state[key][0, 0, 0, 0] = float("inf")
    save_file(state, str(single / "model.safetensors"))
    shutil.copytree(ckpts["eps"] / "tokenizer", single / "tokenizer")
    with pytest.raises(CheckpointError, match=r"model.safetensors \(vae\): weight decoder.conv_in.weight holds NaN"):
        load_checkpoint(str(single / "model.safetensors"))
    vae = load_file(str(ckpts["eps"] / "vae" / "diffusion_pytorch_model.safetensors"))
    vae["decoder.conv_in.weight"][0, 0, 0, 0] = float("-inf")
    save_file(vae, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="vae.safetensors: weight decoder.conv_in.weight"):
        load_checkpoint(str(ckpts["eps"]), vae=str(tmp_path / "vae.safetensors"))


def test_finite_check_is_remembered_by_content(ckpts, tmp_path, monkeypatch):
    """A weight file found finite is not read again by the check on the next load (its mapped
    weights stay on disk where engines serve the network); the same bytes under another name
    are trusted, other bytes (a NaN written in) are checked and refused."""
    import torch

    from fastsd import hashing

    monkeypatch.setattr(hashing, "SETTLED", -1.0)  # the copy was written just now
    copy = shutil.copytree(ckpts["eps"], tmp_path / "c")
    load_checkpoint(str(copy))  # checked, remembered

    def no_reads(*args, **kwargs):
        raise AssertionError("a remembered file was checked again")

    with monkeypatch.context() as m:
        m.setattr(torch, "isfinite", no_reads)
        load_checkpoint(str(copy))
        load_checkpoint(str(shutil.copytree(copy, tmp_path / "again")))
    _unet_with_a_nan_is_refused(copy)


def _unet_with_a_nan_is_refused(folder) -> None:
    """Write a NaN into the folder's UNet weights: loading it is refused, naming the weight."""
    from safetensors.torch import load_file

    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"unet: weight conv_in.weight holds NaN or infinite"):
        load_checkpoint(str(folder))


@pytest.mark.parametrize("component,key,value,message", [
    ("unet", "sample_size", None, "'sample_size' is missing"),
    ("text_encoder", "hidden_size", "64", "'hidden_size' must be an integer >= 1, got '64'"),
    ("vae", "latent_channels", -4, "'latent_channels' must be an integer >= 1, got -4"),
    ("unet", "block_out_channels", "abc", "'block_out_channels' must be a non-empty list of integers"),
    ("vae", "scaling_factor", "x", "'scaling_factor' must be a finite number > 0"),
    ("scheduler", "steps_offset", 1.5, "'steps_offset' must be an integer >= 0"),
])
def test_config_values_are_checked_with_the_file_named(ckpts, tmp_path, capsys, component, key, value, message):
    """Every config value fastsd reads is checked for type and range before any library
    reads it: a CheckpointError naming the file (was a TypeError, or transformers' own
    validation error), one line and exit 2 in the CLI."""
    from fastsd.cli import main

    copy = shutil.copytree(ckpts["eps"], tmp_path / "c")
    f = copy / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    config = json.loads(f.read_text())
    if value is None:
        config.pop(key)
    else:
        config[key] = value
    f.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{component}/{f.name}: {message}"):
        load_checkpoint(str(copy))
    assert main(["generate", "x", "--model", str(copy), "--steps", "1", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
