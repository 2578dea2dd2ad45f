"""Renderers of job results for ``--batch``: one function per job kind, registered by kind name.

A new job kind's renderer is one function decorated ``@renderer("kind")`` in a module
imported here; a kind without one prints its summary line.
"""

from __future__ import annotations

from . import adapters, models, subspace
from .base import RENDERERS, Block, render_blocks, renderer

__all__ = ["RENDERERS", "Block", "adapters", "models", "render_blocks", "renderer", "subspace"]
