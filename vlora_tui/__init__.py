"""vlora-tui: a terminal workbench for collections of LoRA adapters."""

__version__ = "0.1.0"
