"""Stage-level kernel benchmarks (pytest-benchmark). Run with `pytest -o addopts= benchmarks/`
(one process: pytest-benchmark does not time under the suite's pytest-xdist workers);
they are not part of the test command. End-to-end comparisons: `fastsd bench`."""

from __future__ import annotations

import pytest

from fastsd.synthetic import build


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")
