"""`fastsd bench`: fastsd backends side by side with diffusers, in one run."""

from .report import compare, markdown, write_reports
from .runner import BenchConfig, default_config, run_bench

__all__ = ["BenchConfig", "compare", "default_config", "markdown", "run_bench", "write_reports"]
