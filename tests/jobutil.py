"""Test helper: a job script under ``jobs/`` loaded as a module, so a test calls its ``main`` (or other functions)
in the test process (on the session's Ray) instead of a subprocess."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_job(name: str):
    """``jobs/{name}.py`` as a module (named ``{name}_job``)."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
