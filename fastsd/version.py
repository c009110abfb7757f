"""The fastsd version (one place; the package, the manifests and the CLI read it)."""

__version__ = "0.1.0"
