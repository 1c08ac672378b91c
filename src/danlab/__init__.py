"""danlab: learned sequential data assimilation on chaotic dynamics."""

__version__ = "0.1.0"
