"""Benchmarks with JSON reports (``python jobs/benchmark.py {loss,model,data,scale,gpu}``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def write_report(out: str | None, report: dict[str, Any]) -> None:
    """Write ``report`` as indented JSON to ``out`` (parents created); nothing when ``out`` is None."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
