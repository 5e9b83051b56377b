"""cadyq: content-aware dynamic quantization for image super-resolution."""
from __future__ import annotations

__version__ = "0.1.0"
