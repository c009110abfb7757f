"""What the README tells a newcomer is what they get: the `fastsd --help` it shows, every
synthetic model's name, the quickstart's commands and the test-time line's shape."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from fastsd.synthetic import synthetic_names

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_help_shown_is_the_help_printed():
    out = subprocess.run([sys.executable, "-m", "fastsd", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="100"), timeout=60)
    assert out.returncode == 0
    shown = "\n".join(("    " + line) if line else "" for line in out.stdout.rstrip("\n").split("\n"))
    assert shown in README, "the README's `fastsd --help` block is stale: paste the output at COLUMNS=100"


def test_every_synthetic_model_is_named():
    names = synthetic_names()
    for group in ("checkpoints", "tiny autoencoders", "ControlNets"):
        for name in names[group]:
            assert f"`synthetic:{name}`" in README, name
    for name in names["IP-Adapters"]:
        arch = name.rsplit("adapter-", 1)[1].removeprefix("plus-")
        assert arch in re.search(r"`synthetic:ip-adapter-<arch>` and `synthetic:ip-adapter-plus-<arch>` \(([^)]*)\)",
                                 README)[1], name


def test_the_quickstart_commands_are_the_ones_that_work():
    """The offline quickstart is `generate` on synthetic:tiny; the test command is the one CI runs."""
    assert 'fastsd generate "a lighthouse at dusk" --model synthetic:tiny' in README
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run")
    command = re.search(r"pip install -e \"\.\[cpu,dev\]\" && (python -m pytest[^\n]*)", README)[1].strip()
    assert command in ci.read_text()
    assert re.search(r"the latest fresh clone \d+\.\d s\s+of tests, \d+ passed", README), \
        "the README's suite line must give the measured time and count"
