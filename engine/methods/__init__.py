"""Method descriptions per kind (compress, merge, quantize), registered in :mod:`engine.registry`.

Each module here registers its methods with their parameters and must import
without torch (functions import their math lazily), so the TUI can list methods
and build forms before torch loads.
"""
