"""Stage-level kernel benchmarks (pytest-benchmark). Run with `pytest -o addopts= benchmarks/`
(without the test suite's options: two pytest-xdist workers, pytest-benchmark off);
they are not part of the test command. End-to-end comparisons: `fastsd bench`."""

from __future__ import annotations

import pytest

from fastsd.synthetic import build


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")
