"""Which model to evaluate: an export folder, a Ray Train checkpoint folder, or ``latest`` in a workspace.

    ref = resolve_checkpoint("latest", workspace="workspace")
    ref.export_dir   # a folder VLP.from_pretrained loads
    ref.run_name     # the training run it came from (Ray Train run dir = MLflow tag volvlp.run_name), or None

Layout this reads (what ``jobs/pretrain.py`` writes)::

    {workspace}/ray_results/<run_name>/checkpoint_<YYYY-MM-DD_HH-MM-SS.ffffff>/
        ckpt/            DeepSpeed shards (mp_rank_*_model_states.pt, zero_pp_rank_*_optim_states.pt)
        config.yaml      the run's resolved config
        export/          only in the final checkpoint: vlp_config.json, model.safetensors, tokenizer/, …
    {workspace}/ray_results/<run_name>/checkpoint_manager_snapshot.json   (step of each checkpoint)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "CheckpointRef", "resolve_checkpoint", "run_config_of"]

EXPORT_CONFIG = "vlp_config.json"
_STAMP = re.compile(r"^checkpoint_(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(?:\.\d+)?)$")


class CheckpointError(ValueError):
    """The given checkpoint cannot be evaluated (missing, not a model, DeepSpeed shards only, no run)."""


@dataclass
class CheckpointRef:
    """A resolved model to evaluate.

    Attributes:
        export_dir: folder with ``vlp_config.json`` (loadable with ``VLP.from_pretrained``).
        checkpoint_dir: the Ray Train checkpoint folder holding the export, if it is one.
        run_name: the training run (Ray Train run dir name / ``run_name`` of the export's config), if known.
        step: the optimizer step of the checkpoint, if known.
        kind: ``"export"``, ``"ray_checkpoint"`` or ``"latest"`` – how it was named.
    """

    export_dir: Path
    checkpoint_dir: Path | None
    run_name: str | None
    step: int | None
    kind: str


def _is_export(path: Path) -> bool:
    return (path / EXPORT_CONFIG).is_file()


def _stamp(ckpt: Path) -> float:
    """Creation time of a Ray Train checkpoint: from its name, else its folder's mtime."""
    m = _STAMP.match(ckpt.name)
    if m:
        fmt = "%Y-%m-%d_%H-%M-%S.%f" if "." in m[1] else "%Y-%m-%d_%H-%M-%S"
        return datetime.strptime(m[1], fmt).timestamp()
    return ckpt.stat().st_mtime


def _step_from_snapshot(ckpt: Path) -> int | None:
    snap = ckpt.parent / "checkpoint_manager_snapshot.json"
    try:
        data = json.loads(snap.read_text())
        for r in data.get("checkpoint_results", []):
            if r.get("checkpoint_dir_name") == ckpt.name and "step" in (r.get("metrics") or {}):
                return int(r["metrics"]["step"])
    except (OSError, ValueError, TypeError):
        pass
    return None


def run_config_of(export_dir: str | Path) -> dict[str, Any] | None:
    """The training run's resolved config saved in an export (``run_config`` of ``vlp_config.json``), or None."""
    spec = json.loads((Path(export_dir) / EXPORT_CONFIG).read_text())
    cfg = spec.get("run_config")
    return cfg if isinstance(cfg, dict) else None


def _run_name(export_dir: Path, ckpt: Path | None) -> str | None:
    cfg = run_config_of(export_dir)
    if cfg and cfg.get("run_name"):
        return str(cfg["run_name"])
    if ckpt is not None and _STAMP.match(ckpt.name) and ckpt.parent.parent.name == "ray_results":
        return ckpt.parent.name
    return None


def _deepspeed_only_error(ckpt: Path) -> CheckpointError:
    shards = sorted(p.name for p in (ckpt / "ckpt").glob("*.pt")) if (ckpt / "ckpt").is_dir() else []
    siblings = sorted((p for p in ckpt.parent.glob("checkpoint_*") if _is_export(p / "export")), key=_stamp)
    hint = f" The run's checkpoint with an export: {siblings[-1]}." if siblings else ""
    return CheckpointError(
        f"{ckpt} is a Ray Train checkpoint with DeepSpeed shards only ({', '.join(shards[:4]) or 'ckpt/'}"
        f"{', …' if len(shards) > 4 else ''}) and no export/: only a run's final checkpoint holds the consolidated "
        f"model (export/, what VLP.from_pretrained loads).{hint} To evaluate this step, consolidate the shards "
        f"first (zero_to_fp32.py in the checkpoint) and save a VLP export."
    )


def _from_ray_checkpoint(ckpt: Path, kind: str) -> CheckpointRef:
    export = ckpt / "export"
    if not _is_export(export):
        if (ckpt / "ckpt").is_dir():
            raise _deepspeed_only_error(ckpt)
        raise CheckpointError(f"{ckpt} has no export/ (with {EXPORT_CONFIG}) and no DeepSpeed ckpt/: "
                              "not a VLP export or a Ray Train checkpoint of this project")
    return CheckpointRef(export, ckpt, _run_name(export, ckpt), _step_from_snapshot(ckpt), kind)


def latest_checkpoint(workspace: str | Path) -> Path:
    """The newest ``{workspace}/ray_results/<run>/checkpoint_*`` that has an export."""
    root = Path(workspace) / "ray_results"
    if not root.is_dir():
        raise CheckpointError(f"--checkpoint latest: no training runs in {root} (nothing was trained with "
                              f"workspace={workspace}; pass workspace=… or a checkpoint path)")
    ckpts = [p for p in root.glob("*/checkpoint_*") if p.is_dir()]
    with_export = [p for p in ckpts if _is_export(p / "export")]
    if not with_export:
        raise CheckpointError(f"--checkpoint latest: none of the {len(ckpts)} checkpoint(s) under {root} has an "
                              "export/ (only a run's final checkpoint does: did the runs finish?)")
    return max(with_export, key=_stamp)


def resolve_checkpoint(spec: str, workspace: str | Path) -> CheckpointRef:
    """Turn ``--checkpoint`` into a :class:`CheckpointRef` or raise :class:`CheckpointError` saying why not.

    ``spec``: ``"latest"`` (the newest checkpoint with an export under ``{workspace}/ray_results``), an export
    folder (has ``vlp_config.json``; inside a Ray Train checkpoint or e.g. an MLflow ``model`` artifact), or a
    Ray Train checkpoint folder (has ``export/``; one with DeepSpeed shards only is refused, naming the run's
    checkpoint that has an export).
    """
    if spec == "latest":
        return _from_ray_checkpoint(latest_checkpoint(workspace), "latest")
    path = Path(spec).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint {spec!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {spec!r} is a file; give an export folder, a Ray Train checkpoint "
                              "folder or 'latest'")
    if _is_export(path):
        parent = path.parent if path.name == "export" else None
        return CheckpointRef(path, parent, _run_name(path, parent),
                             _step_from_snapshot(parent) if parent is not None else None, "export")
    if (path / "export").exists() or (path / "ckpt").is_dir():
        return _from_ray_checkpoint(path, "ray_checkpoint")
    if any(p.is_dir() for p in path.glob("checkpoint_*")):
        raise CheckpointError(f"{path} is a Ray Train run folder; give one of its checkpoint_* folders (the final "
                              "one holds export/) or 'latest'")
    raise CheckpointError(f"{path} is neither a VLP export (no {EXPORT_CONFIG}) nor a Ray Train checkpoint "
                          "(no export/ or ckpt/)")
