"""The ``wsi-sampler`` command line: a thin layer over the library, one module per group of
commands (``main``: slides, plans, patches, serve; ``score``: batch scoring and the model
worker; ``vlm``: MedGemma bags and reports; ``models``; ``deidentify``; ``predict``: slide-
level models). User mistakes end in a one-line ``error: ...`` and exit code 2."""

from __future__ import annotations

from .main import EXIT_USER_ERROR, app, main

__all__ = ["EXIT_USER_ERROR", "app", "main"]
