"""Per-kernel timings: scheduler steps, CFG combine, mask blend, each network per backend."""

from __future__ import annotations

import pytest
import torch

from fastsd.guidance import blend
from fastsd.networks import SD_NETWORKS
from fastsd.schedulers import SAMPLERS, SchedulerConfig

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
LATENT = (2, 4, 64, 64)  # SD 1.5 at 512x512, batch 2


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_scheduler_step(benchmark, sampler):
    cfg = SchedulerConfig.from_dict(SD, sampler)
    spec = SAMPLERS[sampler]
    sched = spec.schedule(cfg, 50)
    x, out, noise = torch.randn(LATENT), torch.randn(LATENT), torch.randn(LATENT)
    row = spec.coefficients(sched, cfg, 1.0)[10]  # precomputed once per call, as in the pipeline
    history = ((torch.randn(LATENT),) * spec.history,) if spec.history else ()
    benchmark(spec.step, x, out, row, cfg, noise if spec.draws_noise(1.0) else None, *history)


def test_cfg_combine(benchmark):
    out = torch.randn((4,) + LATENT[1:])

    def combine():
        u, c = out.chunk(2)
        return u + 7.5 * (c - u)

    benchmark(combine)


def test_mask_blend(benchmark):
    x, orig, mask = torch.randn(LATENT), torch.randn(LATENT), (torch.rand(2, 1, 64, 64) > 0.5).float()
    benchmark(blend, x, orig, mask)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("network", SD_NETWORKS)
def test_network_call(benchmark, tiny, tmp_path_factory, backend, network):
    from fastsd import Pipeline

    engine_dir = tmp_path_factory.getbasetemp() / "engines"
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        from fastsd.export import export_checkpoint

        if not engine_dir.exists():
            export_checkpoint(str(tiny), engine_dir=engine_dir)
    pipe = Pipeline.from_pretrained(str(tiny), backend=backend, device="cpu", engine_dir=str(engine_dir))
    spec = pipe.family.specs[network]
    inputs = dict(zip(spec.input_names, spec.sample_inputs(2, 32, 32, torch.float32), strict=True))
    benchmark(pipe.backend.run, network, inputs)
    assert pipe.backend.backends[network] == backend
