"""regkern's version: the one source (``pyproject.toml`` reads it, ``regkern.__version__`` re-exports it)."""

__version__ = "0.1.0"
