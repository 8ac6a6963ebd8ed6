"""fnserver: a self-hosted serverless function platform."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
