"""One CT scan in, its embedding and zero-shot findings out (what ``jobs/embed.py --model MODEL SCAN...`` runs).

    ref = resolve_model("latest", workspace="workspace")     # or an export / checkpoint folder, models:/…, runs:/…
    model = load_model(ref)
    embedder = ScanEmbedder(model, embed_config(model.run_config, []))
    scan = embedder.load("ct.nii.gz")                           # or a DICOM series folder
    e = embedder.embed(scan)                                    # (E,) float32, L2-normalised
    p = embedder.probabilities(e[None])                         # (1, L): p(label present), CT-CLIP protocol

What a scan goes through is what the training data went through (``volvlp_ray.data.transforms``): HU = slope *
stored + intercept, RAS orientation from the affine, resampling to the run's ``data.spacing``, the HU window,
in-plane crop/pad to ``data.in_plane_size``, any depth; then ``normalise`` to [-1, 1] and the vision tower
(``eval.volume_mode`` of the run: the whole volume in one pass, or sliding z-chunks pooled).

- **NIfTI** (``.nii``/``.nii.gz``): read by the training chain itself (``preprocess_volume``). Stored values are
  taken as HU unless ``slope``/``intercept`` say otherwise (CT-RATE keeps them in its metadata CSV; a NIfTI
  header's own ``scl_slope``/``scl_inter`` are applied by nibabel first).
- **DICOM series** (a folder of one series' slice files): every slice's RescaleSlope/RescaleIntercept is applied
  (HU); the affine comes from ImageOrientationPatient, PixelSpacing and the slices' ImagePositionPatient, sorted
  along the slice normal, converted from DICOM's LPS patient axes to NIfTI's RAS. The HU volume is written
  to a temporary NIfTI file and goes through the same ``preprocess_volume`` as a NIfTI scan, so both paths
  share every step after the read.

A scan that cannot be read (no NIfTI, no DICOM, corrupt, several series in one folder, missing geometry tags),
or that is smaller than one patch of the model after resampling, raises :class:`ScanError` naming the scan
and the reason. A model that cannot be resolved or loaded raises ``CheckpointError``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volvlp_ray.config import Config, ConfigError, config_from_dict
from volvlp_ray.eval.checkpoint import EXPORT_CONFIG, CheckpointError, CheckpointRef, resolve_checkpoint

__all__ = [
    "MLFLOW_SCHEMES",
    "Scan",
    "ScanEmbedder",
    "ScanError",
    "embed_config",
    "is_mlflow_uri",
    "load_model",
    "read_dicom_series",
    "resolve_model",
    "scan_format",
]

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("models:/", "runs:/")
_RUN_EVAL_KEYS = ("prompts", "volume_mode", "chunk_depth", "chunk_stride", "chunk_pool")


class ScanError(ValueError):
    """A scan that cannot be embedded: unreadable (not NIfTI, not DICOM, corrupt) or too small for the model."""


# --------------------------------------------------------------------------------------------------------
# the model


def is_mlflow_uri(spec: str) -> bool:
    """Whether ``--model`` names an MLflow model (``models:/<id>``, ``models:/<name>/<version>``,
    ``runs:/<id>/model``)."""
    return spec.startswith(MLFLOW_SCHEMES)


def _tracking_uri(workspace: Path, tracking_uri: str | None) -> str:
    """The tracking URI an MLflow model URI is resolved against: the given one, ``$MLFLOW_TRACKING_URI``, else
    the workspace's SQLite store (which must exist: an empty store would only say 'not found')."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = workspace / "mlflow.db"
    if not db.is_file():
        raise CheckpointError(f"no MLflow store at {db} to resolve the model URI in (set $MLFLOW_TRACKING_URI, or "
                              f"workspace=DIR for the workspace whose mlflow.db logged the model)")
    return f"sqlite:///{db}"


def _download_mlflow_model(uri: str, tracking_uri: str, dest: Path) -> Path:
    """Download the MLflow model ``uri`` into ``dest``; returns the export folder inside it (the pyfunc model's
    ``export`` artifact, the folder that holds ``vlp_config.json``)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from volvlp_ray.tracking import scoped_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    dest.mkdir(parents=True, exist_ok=True)
    shown = re.sub(r"(://[^/:@\s]+):[^@\s]+@", r"\1:***@", tracking_uri)
    try:
        # models:/<id> is resolved by a client of the *current* tracking URI whatever tracking_uri= says:
        # point the fluent API at the store for the download only (restored afterwards, $MLFLOW_TRACKING_URI too)
        with scoped_tracking_uri(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                             tracking_uri=tracking_uri))
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"MLflow model {uri!r} at {shown}: {first}") from None
    except OSError as exc:
        raise CheckpointError(f"MLflow model {uri!r} at {shown}: cannot download ({exc})") from None
    found = sorted((p.parent for p in local.rglob(EXPORT_CONFIG) if "code" not in p.relative_to(local).parts),
                   key=lambda p: len(p.parts))
    if not found:
        raise CheckpointError(f"MLflow model {uri!r} holds no VLP export (no {EXPORT_CONFIG} in its artifacts): "
                              "not a model logged by jobs/pretrain.py")
    return found[0]


def resolve_model(spec: str, workspace: str | os.PathLike, download_dir: str | os.PathLike | None = None,
                  tracking_uri: str | None = None) -> CheckpointRef:
    """``--model`` -> a :class:`CheckpointRef` whose ``export_dir`` ``VLP.from_pretrained`` loads.

    ``spec``: an export folder, a Ray Train checkpoint folder or ``latest`` (``resolve_checkpoint``), or an MLflow
    model URI (``models:/<id>``, ``runs:/<run_id>/model``, a registered ``models:/<name>/<version>``), downloaded
    into ``download_dir`` (default: a new temporary folder, left for the caller to remove) and resolved against
    ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///{workspace}/mlflow.db``).
    Raises ``CheckpointError`` saying why a spec is no model."""
    workspace = Path(workspace)
    if not is_mlflow_uri(spec):
        return resolve_checkpoint(spec, workspace)
    uri = _tracking_uri(workspace, tracking_uri)
    dest = Path(download_dir) if download_dir is not None else Path(tempfile.mkdtemp(prefix="volvlp-model-"))
    export = _download_mlflow_model(spec, uri, dest)
    from volvlp_ray.eval.checkpoint import run_config_of

    cfg = run_config_of(export) or {}
    return CheckpointRef(export, None, cfg.get("run_name"), None, "mlflow")


def load_model(ref: CheckpointRef, device: str | None = None):
    """``VLP.from_pretrained`` of ``ref`` on ``device`` (default: CUDA when available), eval mode; a folder that
    looks like an export but does not load raises ``CheckpointError`` naming it."""
    import torch

    from volvlp_ray.models import VLP

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return VLP.from_pretrained(ref.export_dir, map_location=device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{ref.export_dir} is not a loadable VLP export: {type(exc).__name__}: {text}") from None


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def embed_config(run_config: dict | None, overrides: Sequence[str] = ()) -> Config:
    """The settings a scan is embedded with: defaults <- the training run's config <- ``key=value`` overrides.

    Unlike the evaluate job, the run's zero-shot prompts and volume mode (``eval.prompts``, ``eval.volume_mode``,
    ``eval.chunk_*``) are kept: a scan is embedded and scored the way the run's own evaluation did it."""
    from volvlp_ray.eval.job import build_eval_config

    cfg, user = build_eval_config(run_config, None, list(overrides))
    run_eval = (run_config or {}).get("eval") or {}
    keep = {k: run_eval[k] for k in _RUN_EVAL_KEYS if k in run_eval and k not in user.get("eval", {})}
    if keep:
        try:
            cfg = config_from_dict(_merge(asdict(cfg), {"eval": keep}))
        except ConfigError as exc:
            log.warning("ignoring the run's eval settings %s: %s", sorted(keep), exc)
    return cfg


# --------------------------------------------------------------------------------------------------------
# reading a scan


def scan_format(path: str | os.PathLike) -> str:
    """``"nifti"`` (a file) or ``"dicom"`` (a folder); ``ScanError`` for anything else."""
    p = Path(path)
    if not p.exists():
        raise ScanError(f"scan {str(path)!r} does not exist")
    if p.is_dir():
        return "dicom"
    if p.name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if _is_dicom_file(p):
        raise ScanError(f"scan {str(path)!r} is a single DICOM file: give the folder that holds its series")
    raise ScanError(f"scan {str(path)!r} is neither a NIfTI file (.nii, .nii.gz) nor a DICOM series folder")


def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _floats(ds, tag: str, n: int, where: str) -> np.ndarray:
    value = getattr(ds, tag, None)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.isfinite(arr).all():
        raise ScanError(f"{where}: {tag} is missing or malformed ({value!r}); the series' geometry cannot be built")
    return arr


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A folder of one DICOM CT series -> (HU float32 ``(X, Y, Z)``, RAS affine 4x4, info).

    Axes: X along a row (ImageOrientationPatient's first vector), Y down the columns (its second), Z along the
    slice normal, slices sorted by their position on it. HU = stored * RescaleSlope + RescaleIntercept per
    slice (1 and 0 when absent). The affine maps voxel indices to RAS mm (DICOM's LPS with x and y negated),
    as a NIfTI affine does, so ``preprocess_volume`` orients and resamples it like any NIfTI scan.
    ``info``: ``slices``, ``series_uid``, ``skipped_files`` (files that are no DICOM image), ``warnings``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(folder)
    shown = str(folder)
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    images, skipped = [], []
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
            skipped.append(p.name)
            continue
        if not hasattr(ds, "Rows"):  # no image: DICOMDIR, structured reports, presentation states
            skipped.append(p.name)
            continue
        images.append((p, ds))
    if not images:
        raise ScanError(f"scan {shown!r}: no DICOM image files in the folder ({len(files)} file(s), none DICOM"
                        f"{'' if not files else ' images'}): not a DICOM series folder")
    series: dict[str, list] = {}
    for p, ds in images:
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((p, ds))
    if len(series) > 1:
        desc = ", ".join(f"{uid or '(no SeriesInstanceUID)'} ({len(v)} files)" for uid, v in series.items())
        raise ScanError(f"scan {shown!r}: the folder holds {len(series)} DICOM series ({desc}); give a folder with "
                        "one series")
    (uid, items), = series.items()
    first = items[0][1]
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        raise ScanError(f"scan {shown!r}: multi-frame DICOM (enhanced CT) is not supported; give a classic "
                        "one-file-per-slice series")
    iop = _floats(first, "ImageOrientationPatient", 6, f"scan {shown!r}, {items[0][0].name}")
    row_dir, col_dir = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or \
            abs(float(row_dir @ col_dir)) > 1e-3:
        raise ScanError(f"scan {shown!r}: ImageOrientationPatient {iop.tolist()} is not two orthonormal vectors")
    normal = np.cross(row_dir, col_dir)
    spacing = _floats(first, "PixelSpacing", 2, f"scan {shown!r}, {items[0][0].name}")  # (between rows, columns)
    rows, cols = int(getattr(first, "Rows", 0) or 0), int(getattr(first, "Columns", 0) or 0)
    slices = []
    for p, ds in items:
        where = f"scan {shown!r}, {p.name}"
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, where), iop, atol=1e-4):
            raise ScanError(f"{where}: ImageOrientationPatient differs from the series' first slice")
        if (int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)) != (rows, cols):
            raise ScanError(f"{where}: {ds.Rows}x{ds.Columns} pixels, the series' first slice has {rows}x{cols}")
        pos = _floats(ds, "ImagePositionPatient", 3, where)
        slices.append((float(pos @ normal), pos, p))
    slices.sort(key=lambda s: s[0])
    where_z = np.asarray([s[0] for s in slices])
    gaps = np.diff(where_z)
    warnings: list[str] = []
    if len(slices) > 1:
        if np.any(gaps < 1e-3):
            i = int(np.argmin(gaps))
            raise ScanError(f"scan {shown!r}: slices {slices[i][2].name} and {slices[i + 1][2].name} lie at the same "
                            "position (two series, or repeated slices, in one folder)")
        if gaps.max() > 1.1 * gaps.min():
            warnings.append(f"slice gaps vary from {gaps.min():.3g} to {gaps.max():.3g} mm; the mean is used")
        step = (slices[-1][1] - slices[0][1]) / (len(slices) - 1)
    else:
        thickness = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 0) or 1.0)
        step = normal * thickness
    hu = np.empty((cols, rows, len(slices)), dtype=np.float32)
    for k, (_, _, p) in enumerate(slices):
        try:
            ds = pydicom.dcmread(p)
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - a corrupt or undecodable slice makes the scan unreadable
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ScanError(f"scan {shown!r}: cannot read the pixels of {p.name} ({type(exc).__name__}: {text})") \
                from None
        if pixels.shape != (rows, cols):
            raise ScanError(f"scan {shown!r}, {p.name}: pixel data of shape {pixels.shape}, expected ({rows}, {cols})")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0) if "RescaleSlope" in ds else 1.0
        intercept = float(getattr(ds, "RescaleIntercept", 0.0)) if "RescaleIntercept" in ds else 0.0
        hu[:, :, k] = (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).T
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # column index i moves along the row direction, PixelSpacing[1] apart
    lps[:3, 1] = col_dir * spacing[0]  # row index j moves down the columns, PixelSpacing[0] apart
    lps[:3, 2] = step
    lps[:3, 3] = slices[0][1]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    info = {"slices": len(slices), "series_uid": uid, "skipped_files": skipped, "warnings": warnings}
    return hu, affine, info


@dataclass
class Scan:
    """A scan preprocessed as the training data was."""

    name: str
    """The scan as given (path)."""
    format: str
    """``"nifti"`` or ``"dicom"``."""
    volume: np.ndarray
    """int16 HU ``(D, H, W)`` = (z, y, x), RAS, at ``spacing``."""
    spacing: tuple[float, float, float]
    source_shape: tuple[int, ...]
    """Stored shape of the source (NIfTI order, or (columns, rows, slices) of a DICOM series)."""
    source_spacing: tuple[float, float, float]
    """(z, y, x) mm of the source."""
    warnings: list[str] = field(default_factory=list)


def _resampled_extent(shape: Sequence[int], affine: np.ndarray,
                      spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    """(x, y, z) voxels a volume of ``shape`` with ``affine`` has along the RAS axes after resampling to
    ``spacing_zyx`` (the stored axis nearest each RAS axis; what ``Orientation`` + ``Spacing`` give, to rounding)."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    target = (spacing_zyx[2], spacing_zyx[1], spacing_zyx[0])
    out = [0.0, 0.0, 0.0]
    for i in range(3):
        axis = int(np.argmax(np.abs(affine[:3, i])))
        out[axis] = shape[i] * zooms[i] / target[axis]
    return out[0], out[1], out[2]


class ScanEmbedder:
    """A loaded model with what embedding and scoring a scan need: the run's preprocessing settings, the zero-shot
    prompts' embeddings (computed once) and the logit scale.

    Args:
        model: a ``VLP`` (``load_model``).
        cfg: :func:`embed_config` of the model's run config (``data.spacing``, ``in_plane_size``, ``hu_window``,
            ``max_text_length``, ``eval.prompts``, ``eval.volume_mode``…).
        label_names: the labels scored (default: CT-RATE's 18, ``volvlp_ray.data.ctrate.LABELS``).
    """

    def __init__(self, model, cfg: Config, label_names: Sequence[str] | None = None) -> None:
        from volvlp_ray.data.ctrate import LABELS
        from volvlp_ray.eval.run import prompt_embeddings

        self.model, self.cfg = model.eval(), cfg
        self.label_names = list(label_names if label_names is not None else LABELS)
        self.templates = tuple(cfg.eval.prompts)
        self.spacing = tuple(float(x) for x in cfg.data.spacing)
        self.in_plane_size = int(cfg.data.in_plane_size)
        self.hu_window = (float(cfg.data.hu_window[0]), float(cfg.data.hu_window[1]))
        self.patch = tuple(int(p) for p in model.vision.patch)
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        self.pos_emb, self.neg_emb = prompt_embeddings(model, self.label_names, self.templates,
                                                       cfg.data.max_text_length)

    # -- reading
    def load(self, path: str | os.PathLike, slope: float = 1.0, intercept: float = 0.0) -> Scan:
        """Read and preprocess one scan (NIfTI file or DICOM series folder); ``ScanError`` when it cannot be used.
        ``slope``/``intercept`` apply to a NIfTI file's stored values (a DICOM series carries its own)."""
        name = str(path)
        kind = scan_format(path)
        if kind == "dicom":
            hu, affine, info = read_dicom_series(path)
            with tempfile.TemporaryDirectory(prefix="volvlp-dicom-") as tmp:
                import nibabel as nib

                nifti = os.path.join(tmp, "series.nii")
                img = nib.Nifti1Image(hu, affine)
                img.header.set_xyzt_units("mm", "sec")
                nib.save(img, nifti)
                scan = self._preprocess(nifti, name, kind, 1.0, 0.0, hu.shape, affine)
            scan.warnings[:0] = info["warnings"]
            return scan
        try:
            from volvlp_ray.data.storage import load_nifti

            img = load_nifti(os.fspath(path))
            shape, affine = tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a corrupt or foreign file
            raise ScanError(f"scan {name!r} is not a readable NIfTI file ({type(exc).__name__}: "
                            f"{_first_line(exc)})") from None
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise ScanError(f"scan {name!r}: expected a 3-D volume, the NIfTI file holds shape {shape}")
        return self._preprocess(os.fspath(path), name, kind, slope, intercept, shape, affine)

    def _preprocess(self, nifti: str, name: str, kind: str, slope: float, intercept: float,
                    shape: Sequence[int], affine: np.ndarray) -> Scan:
        from volvlp_ray.data.transforms import preprocess_volume

        pz, py, px = self.patch
        nx, ny, _ = _resampled_extent(shape, affine, self.spacing)
        if nx < px or ny < py:
            raise ScanError(
                f"scan {name!r} is too small for the model: {shape} voxels give about {nx:.0f} x {ny:.0f} voxels "
                f"in-plane at the run's {self.spacing[2]:g} x {self.spacing[1]:g} mm, smaller than the model's "
                f"in-plane patch {px} x {py}")
        try:
            res = preprocess_volume(nifti, slope, intercept, self.spacing, self.in_plane_size, self.hu_window)
        except ScanError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreadable data, NaN voxels, an empty volume
            text = _first_line(exc).replace(nifti, name)
            raise ScanError(f"scan {name!r} cannot be used ({type(exc).__name__}: {text})") from None
        depth = res.volume.shape[0]
        if depth < pz:
            raise ScanError(f"scan {name!r} is too small for the model: {depth} slice(s) after resampling to "
                            f"{self.spacing[0]:g} mm, fewer than the model's z patch of {pz} slices "
                            f"(at least {pz * self.spacing[0]:g} mm of scan length are needed)")
        return Scan(name, kind, res.volume, res.spacing, tuple(int(n) for n in shape), res.source_spacing,
                    list(res.warnings))

    # -- embedding and scoring
    def embed(self, scan: Scan) -> np.ndarray:
        """The L2-normalised embedding ``(E,)`` float32 of a preprocessed scan, in the run's ``eval.volume_mode``.

        The depth is padded at the end to a multiple of the z patch with air (-1 after ``normalise``), the true
        depth passed as ``depths``: what evaluation's ``collate`` does, and so what the batch job does for the
        same volume in a batch of any depths. (``VLP.embed_volume`` pads with 0 instead, which changes the last
        z patch of a volume whose depth is no multiple of the patch; on an air-padded array it gives this.)"""
        return self.embed_array(scan.volume)

    def embed_array(self, volume: np.ndarray) -> np.ndarray:
        """:meth:`embed` of an int16 HU ``(D, H, W)`` array as preprocessing makes it."""
        import torch

        from volvlp_ray.data.transforms import normalise
        from volvlp_ray.eval.embed import encode_volumes

        x = normalise(volume, self.hu_window)
        d, pz = x.shape[0], self.patch[0]
        padded = np.full((-(-d // pz) * pz, *x.shape[1:]), -1.0, dtype=np.float32)
        padded[:d] = x
        m, e = self.model, self.cfg.eval
        vol = torch.from_numpy(padded)[None, None].to(m.device, m.vision.patch_embed.weight.dtype)
        with torch.no_grad():
            out = encode_volumes(m, vol, torch.tensor([d], device=m.device), e.volume_mode, e.chunk_depth,
                                 e.chunk_stride, e.chunk_pool, e.batch_size)[0]
        return out.float().cpu().numpy()

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """``(N, L)`` zero-shot p(present) of ``(N, E)`` volume embeddings: per label, the softmax over the
        run's (positive, negative) prompts of the scaled cosine similarities, at the positive one (CT-CLIP)."""
        from volvlp_ray.eval.zeroshot import zero_shot_scores

        return zero_shot_scores(np.atleast_2d(embeddings), self.pos_emb, self.neg_emb, logit_scale=self.logit_scale)

    def embed_text(self, text: str) -> np.ndarray:
        """A report's (or a query's) L2-normalised embedding ``(E,)`` (``VLP.embed_report``)."""
        return self.model.embed_report(text).float().cpu().numpy()

    def report_similarity(self, embeddings: np.ndarray, report: str) -> np.ndarray:
        """Cosine similarity ``(N,)`` of each volume embedding with ``report``'s embedding."""
        t = self.embed_text(report)
        v = np.atleast_2d(embeddings).astype(np.float64)
        return (v @ t) / (np.linalg.norm(v, axis=1) * np.linalg.norm(t))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_model(ref: CheckpointRef) -> dict[str, Any]:
    """JSON-ready description of a resolved model (for reports and the batch output's ``_embed.json``)."""
    return {"export_dir": str(ref.export_dir), "checkpoint_dir": str(ref.checkpoint_dir or ""),
            "run_name": ref.run_name, "step": ref.step, "kind": ref.kind}


def model_identity(export_dir: str | os.PathLike) -> str:
    """A short identity of an export's weights and settings (``vlp_config.json`` and the weights' size): the
    batch job refuses to add one model's embeddings to a folder another model's started."""
    import hashlib

    src = Path(export_dir)
    h = hashlib.sha256((src / EXPORT_CONFIG).read_bytes())
    weights = src / "model.safetensors"
    h.update(str(weights.stat().st_size if weights.is_file() else -1).encode())
    return h.hexdigest()[:16]


def to_json(obj: Any) -> str:
    """Strict JSON (numpy values to Python; non-finite floats to null)."""
    from volvlp_ray.eval.job import _to_json

    return _to_json(obj) if isinstance(obj, dict) else json.dumps(obj)


# --------------------------------------------------------------------------------------------------------
# the single-scan job

OUT_SUFFIXES = (".npy", ".npz", ".safetensors")


def check_out_path(out: str) -> None:
    """``--out`` of the single-scan job must end in one of ``OUT_SUFFIXES`` (``ConfigError`` otherwise)."""
    if not out.endswith(OUT_SUFFIXES):
        raise ConfigError(f"--out {out!r}: give a .npy, .npz or .safetensors file (a Parquet output is the batch "
                          "job's: --data DATA --out DIR)")


def write_embeddings(out: str, embeddings: np.ndarray, names: Sequence[str], model: dict[str, Any]) -> Path:
    """Write ``(N, E)`` float32 embeddings: ``.npy`` (the array; rows in ``names`` order), ``.npz`` (``embeddings``
    and ``names``), ``.safetensors`` (tensor ``embeddings``; ``names`` and ``model`` as JSON metadata)."""
    check_out_path(out)
    path = Path(out).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if out.endswith(".npy"):
        np.save(path, emb)
    elif out.endswith(".npz"):
        np.savez(path, embeddings=emb, names=np.asarray(list(names)))
    else:
        from safetensors.numpy import save_file

        save_file({"embeddings": emb}, str(path), metadata={"names": json.dumps(list(names)),
                                                             "model": json.dumps(model)})
    return path


def _column_name(name: str, width: int) -> str:
    short = Path(name.rstrip("/")).name or name
    return short if len(short) <= width else "…" + short[-(width - 1):]


def format_table(result: dict[str, Any]) -> str:
    """The zero-shot table of :func:`embed_scans`'s result: a row per label, a column per scan."""
    scans = result["scans"]
    width = max(10, min(18, max(len(_column_name(s["scan"], 18)) for s in scans)))
    label_w = max(len(n) for n in result["label_names"] + ["report similarity (cosine)"])
    t = result["prompts"]
    lines = [f"zero-shot p(present): prompts {t[0]!r} / {t[1]!r}, logit scale {result['logit_scale']:.3g}",
             "label".ljust(label_w) + "".join(f"  {_column_name(s['scan'], width):>{width}}" for s in scans)]
    for name in result["label_names"]:
        lines.append(name.ljust(label_w) + "".join(f"  {s['probabilities'][name]:>{width}.3f}" for s in scans))
    if "report_similarity" in scans[0]:
        lines.append("report similarity (cosine)".ljust(label_w)
                     + "".join(f"  {s['report_similarity']:>{width}.3f}" for s in scans))
    return "\n".join(lines)


def embed_scans(
    model: str,
    scans: Sequence[str],
    overrides: Sequence[str] = (),
    report: str | None = None,
    out: str | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    say=print,
) -> dict[str, Any]:
    """The single-scan job: resolve and load ``model``, read and preprocess every scan (all of them before any
    result: one unusable scan fails the call with ``ScanError``), embed, score every label zero-shot, and
    optionally compare with ``report`` and write ``out``. ``say`` gets the progress lines.

    Returns ``model`` (how it was resolved), ``label_names``, ``prompts``, ``logit_scale``, ``embed_dim``,
    ``volume_mode``, ``out`` (the file written, or None) and ``scans``: per scan ``scan``, ``format``,
    ``shape`` (D, H, W after preprocessing), ``spacing``, ``source_shape``, ``source_spacing``, ``warnings``,
    ``probabilities`` ``{label: p}``, ``embedding`` (list of E floats) and, with ``report``,
    ``report_similarity``."""
    from volvlp_ray.eval.job import build_eval_config

    if not scans:
        raise ScanError("no scan given: pass one or more NIfTI files or DICOM series folders")
    if out is not None:
        check_out_path(out)
    if report is not None and not report.strip():
        raise ConfigError("--report is empty: give the report text to compare the scans with")
    pre, _ = build_eval_config(None, None, list(overrides))
    with tempfile.TemporaryDirectory(prefix="volvlp-model-") as tmp:
        ref = resolve_model(model, pre.workspace_path, download_dir=tmp if is_mlflow_uri(model) else None,
                            tracking_uri=pre.tracking.tracking_uri or None)
        say(f"[embed] model: {ref.export_dir if ref.kind != 'mlflow' else model} ({ref.kind}; run "
            f"{ref.run_name or 'unknown'}{'' if ref.step is None else f', step {ref.step}'})")
        vlp = load_model(ref)
    cfg = embed_config(vlp.run_config, overrides)
    if vlp.run_config is None:
        say("[embed] the export has no run config: preprocessing uses the default data settings")
    embedder = ScanEmbedder(vlp, cfg)
    loaded = []
    for path in scans:
        scan = embedder.load(path, slope=slope, intercept=intercept)
        d, h, w = scan.volume.shape
        say(f"[embed] {scan.name}: {'NIfTI' if scan.format == 'nifti' else 'DICOM series'} {scan.source_shape} at "
            f"{' x '.join(f'{v:.3g}' for v in scan.source_spacing)} mm (z, y, x) -> {d} x {h} x {w} voxels at "
            f"{' x '.join(f'{v:g}' for v in scan.spacing)} mm")
        for w_ in scan.warnings:
            say(f"[embed] {scan.name}: warning: {w_}")
        loaded.append(scan)
    emb = np.stack([embedder.embed(s) for s in loaded]).astype(np.float32)
    probs = embedder.probabilities(emb)
    sims = embedder.report_similarity(emb, report) if report is not None else None
    rows = []
    for i, s in enumerate(loaded):
        row = {"scan": s.name, "format": s.format, "shape": list(s.volume.shape), "spacing": list(s.spacing),
               "source_shape": list(s.source_shape), "source_spacing": list(s.source_spacing),
               "warnings": s.warnings,
               "probabilities": {n: float(probs[i, j]) for j, n in enumerate(embedder.label_names)},
               "embedding": emb[i].tolist()}
        if sims is not None:
            row["report_similarity"] = float(sims[i])
        rows.append(row)
    model_info = describe_model(ref) | ({"uri": model} if ref.kind == "mlflow" else {})
    if ref.kind == "mlflow":
        model_info["export_dir"] = ""  # a temporary download, gone when this returns
    written = None
    if out is not None:
        written = write_embeddings(out, emb, [s.name for s in loaded], model_info)
        say(f"[embed] embeddings ({emb.shape[0]} x {emb.shape[1]}, L2-normalised) written to {written}")
    return {"model": model_info, "label_names": embedder.label_names, "prompts": list(embedder.templates),
            "logit_scale": embedder.logit_scale, "embed_dim": int(emb.shape[1]), "volume_mode": cfg.eval.volume_mode,
            "out": str(written) if written else None, "scans": rows}
