"""Serving the tasks of a shared subspace from one base model (``VLoRAModel``)."""

from __future__ import annotations

from .model import VLoRAModel

__all__ = ["VLoRAModel"]
