"""``npdgru eval``: speech quality (PESQ, ESTOI, SI-SNR, DNSMOS) and compute of every model at
every update percentage P on a folder of clean/noisy pairs.

``metrics.py`` holds each metric once; ``runner.py`` the evaluation; ``report.py`` the tables and
the plot. The metrics need the ``eval`` extra (``pip install -e ".[eval]"``):
:func:`missing_dependencies` says which of it is absent without importing anything.
"""

from __future__ import annotations

import importlib.util

# import name -> distribution name (what pip installs)
EVAL_DEPENDENCIES = {"pesq": "pesq", "pystoi": "pystoi", "onnxruntime": "onnxruntime", "matplotlib": "matplotlib", "speechmos": "speechmos"}


def missing_dependencies() -> list[str]:
    """Distributions of the ``eval`` extra that are not installed (found by ``find_spec``)."""
    missing = []
    for module, dist in EVAL_DEPENDENCIES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
    return missing


__all__ = ["EVAL_DEPENDENCIES", "missing_dependencies"]
