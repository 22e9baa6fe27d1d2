"""One typed configuration tree for every job.

The dataclass defaults *are* the embedded default (a laptop run on CPU with synthetic data); a YAML file
is a partial instance of the tree, and ``key.sub=value`` overrides on the command line are applied last.
An unknown key anywhere is an error that names the valid keys at that level.

    cfg = load_config("configs/ctrate_vitb.yaml", ["train.steps=50", "loss.kind=sigmoid"])
    cfg.train.steps  # 50
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "AblationConfig",
    "GRAD_CHECKPOINTING_MODES",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "ScalingConfig",
    "ReportConfig",
    "SegmentationConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "flatten",
    "grad_checkpointing_mode",
    "CT_RATE_GRID",
    "load_config",
    "parse_cli",
    "same_study_mode",
    "voided_by",
    "with_absolute_paths",
]


class ConfigError(ValueError):
    """A configuration that cannot be applied (unknown key, wrong type, impossible value)."""


@dataclass
class DataConfig:
    source: str = "synthetic"
    """"synthetic" or a folder in the CT-RATE layout (NIfTI volumes + reports/metadata/labels CSVs)."""
    num_volumes: int = 1000
    """Synthetic training volumes to generate (ignored for a real source)."""
    num_val_volumes: int = 128
    """Synthetic held-out volumes (the "validation" split)."""
    spacing: list[float] = field(default_factory=lambda: [8.0, 6.0, 6.0])
    """Target voxel spacing (z, y, x) in mm after resampling: the embedded synthetic data's toy grid. For a real
    source (``data.source`` a folder, or ``jobs/prepare_data.py --source DIR``) the default is CT-RATE's (CT-CLIP's)
    [1.5, 0.75, 0.75] unless the config file or an override sets it (``config.CT_RATE_GRID``)."""
    in_plane_size: int = 64
    """In-plane crop/pad (H = W) after resampling: 64 for the synthetic data, 480 (CT-RATE's) by default for a real
    source, as ``spacing``. Depth is never cropped."""
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    """HU clip window; stored voxels are int16 HU inside it; the loader maps it to [-1, 1]."""
    shard_max_bytes: int = 4 * 2**20
    """Target size of one WebDataset tar."""
    shards_dir: str | None = None
    """Where shards live; default ``{workspace}/shards``. A local path or any pyarrow filesystem URI
    (``s3://bucket/shards?region=...``): ``jobs/prepare_data.py`` writes there, training and evaluation read from
    there."""
    text_mode: str = "report"
    """"report": a sample is the whole volume with its whole report; "organ": a random z-chunk with the findings
    of the organs it covers plus a general sentence (SigVLP)."""
    chunk_depth: list[int] = field(default_factory=lambda: [16, 48])
    """Bounds (slices) of a random z-chunk in "organ" mode; rounded to multiples of the z patch."""
    chunks_per_volume: int = 1
    """Organ mode with ``sampler=equal``: K chunks of each drawn volume go into the same step (the same global
    batch), each with its own z-range and organ-wise text; ``train.batch_size`` counts chunks and must be a multiple
    of K (a rank takes batch_size / K volumes per step). Chunks of one study meet in the loss: see
    ``loss.same_study``."""
    chunk_overlap: bool = True
    """K > 1: true = the K chunks of a volume are drawn independently (they may overlap); false = disjoint chunks
    (a step then takes only volumes at least K chunk lengths deep)."""
    organ_impression: bool = False
    """Organ mode: append the report's Impressions to every chunk's text. Off by default: the impression
    summarises the whole study, so it would tell every chunk about organs it does not show."""
    empty_chunk_text: str = "No findings are reported for this region."
    """Organ mode: the text of a chunk that covers no organ with findings and whose report has no general
    (organ-less) sentence either. Never the whole report."""
    max_text_length: int = 192
    """Tokens per text (longer texts are truncated; the loop logs the truncated fraction)."""
    shuffle_buffer: int = 64
    """Local shuffle buffer (rows) of the training stream."""
    sampler: str = "equal"
    """How training batches are formed. "equal" (``data/sampler.py``): every step, all ranks agree on one z-length
    (organ mode: a chunk length drawn per step; report mode: a group of volumes with the same number of whole z
    patches, the < patch_z slices of remainder cropped), so every rank's vision tower sees the same number of
    tokens, nothing is padded and attention gets no mask; the length still varies from step to step. "bucket":
    each rank buckets its own stream by depth (``bucket_pool``), padding to the batch's deepest sample (the
    per-rank baseline: ranks wait for the deepest one)."""
    pool_batches: int = 8
    """``sampler=equal``: each rank's pool is filled to this many batches of rows before each step."""
    max_pool_batches: int = 32
    """``sampler=equal``, report mode: the pool may grow to this many batches while no depth group can fill a step
    on every rank; beyond it a step crops deeper volumes to a common length (counted, rare)."""
    bucket_pool: int = 4
    """``sampler=bucket``: the training stream is read in pools of this many batches, each pool sorted by depth and
    cut into batches (yielded in seeded random order), so a batch pads to a near-equal depth; 1 = off."""
    normalise_in: str = "device"
    """Where int16 HU becomes [-1, 1] over ``hu_window``: "device" (the training loop, on the GPU: volumes cross
    the object store and the host-to-device link as int16, half the bytes) or "loader" (Ray Data, as float32).
    The same values either way (bitwise)."""
    reader: str = "shards"
    """How Ray Data reads the shard tars: "shards" (``data/reader.py``: one read per tar member) or "webdataset"
    (``ray.data.read_webdataset``, ``tarfile`` stream mode). The same rows either way; "shards" is faster."""
    volume_transport: str = "direct"
    """How the training stream's volume voxels reach the batch: "direct" (Ray Data reads and shuffles the rows,
    decodes, chunks and tokenises, but carries only where each volume's slices lie in its shard; ``collate``
    reads them from the shard straight into the padded batch, one copy per byte) or "object_store" (the voxels
    travel through Ray Data: read into the read task, through the object store, copied into the batch). The
    same batches either way (bitwise). "direct" needs ``reader=shards`` and ``normalise_in=device``, and the
    shards reachable from the training workers, as they are from the read tasks. Evaluation and validation
    always use "object_store"."""
    samples_per_read_task: int = 256
    """With ``volume_transport=direct``: a Ray Data read task covers shards holding about this many samples (the
    rows are small, so one task per shard, ~3 CT volumes, spends more time scheduling than reading: measured).
    The rows come in the same order either way, but Ray Train deals them to the workers by blocks, and blocks
    follow tasks: runs compare batch for batch only with the same setting. 0 = one task per shard (as the
    object-store transport does; with it a direct run trains on exactly the batches an object-store run does)."""
    deterministic: bool = True
    """Reproducible training stream (Ray Data ``preserve_order``): two runs with one seed see the same batches,
    and a resumed run replays the interrupted epoch in its original order. False: order follows scheduling."""
    prepare_parallelism: int = 0
    """Ray Data tasks for conversion; 0 = one per CPU."""
    organ_extents: str = "auto"
    """Where organ z-extents (organ-wise text) come from: "segmentation" (TotalSegmentator output under
    ``{source}/segmentations/``), "csv" (``metadata/{split}_organ_extents.csv``), "none", or "auto" (per volume:
    its segmentation if it has one, else its CSV rows, else none)."""
    segmentation_labels: str = ""
    """Label table of multi-label segmentation files: "" = TotalSegmentator v2 "total" ids, else a JSON file
    (path or URI) ``{"label id": "structure name"}``."""
    organ_findings: str = "auto"
    """Organ-wise findings: "auto" (``metadata/{split}_organ_findings.json`` when present, else the keyword split
    of Findings_EN), "keywords" (always the keyword split), or a JSON file (path or URI)
    ``{VolumeName: {organ: text}}``; volumes without an entry keep the keyword split."""
    label_maps: str = "auto"
    """Organ label maps in the shards (``data/labelmaps.py``; the segmentation job's targets): "auto" stores each
    volume's map when it has one (``labelmaps/{VolumeName}``, as the synthetic generator writes, else its
    TotalSegmentator segmentation), resampled onto the CT's grid by nearest neighbour; "none" stores none."""


GRAD_CHECKPOINTING_MODES = ("none", "full", "selective")


def grad_checkpointing_mode(value: Any, where: str = "grad_checkpointing") -> str:
    """A grad-checkpointing mode from a str or the old boolean (True = "full", False / None = "none")."""
    if value is None or isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, str) and value.lower() in GRAD_CHECKPOINTING_MODES:
        return value.lower()
    raise ConfigError(f"{where}={value!r} is not one of {list(GRAD_CHECKPOINTING_MODES)} (or true / false for "
                      "'full' / 'none')")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """ViT3D size: tiny | small | base | large."""
    patch: list[int] = field(default_factory=lambda: [4, 16, 16])
    """Patch size (z, y, x) of the Conv3d patch embedding."""
    pool: str = "cls"
    """Vision pooling: cls | mean | attn."""
    embed_dim: int = 128
    """Joint embedding size (projection heads)."""
    proj_norm: bool = True
    """Batch-normalise the projected features (no affine) before L2 normalisation; keeps freshly initialised
    towers from collapsing on CT, where volumes share most of their content. Batch statistics are per worker."""
    text_model: str = "scratch-tiny"
    """"scratch-tiny" / "scratch-small" / "scratch-base" (random init, tokenizer built from the corpus) or a Hugging Face
    model id / local path (e.g. emilyalsentzer/Bio_ClinicalBERT)."""
    text_vocab_size: int = 2000
    """Vocabulary of the tokenizer built from the corpus (scratch text towers only)."""
    text_pool: str = "mean"
    """Text pooling: cls | mean (masked mean: a report's embedding composes from its sentences, which is what
    single-sentence zero-shot prompts need; measured better than cls on the synthetic data)."""
    freeze_text_layers: int = 0
    """Freeze the text embeddings and this many first layers."""
    init_logit_scale: float = 10.0
    """Initial (exponentiated) logit scale = 1 / temperature."""
    init_logit_bias: float = -5.0
    """Initial logit bias (sigmoid losses). SigLIP's -10 suits global batches of ~32k; for a batch of B the
    bias-only optimum is about -log(B), and starting far below it costs hundreds of steps on small runs."""
    grad_checkpointing: str = "none"
    """Activation checkpointing in the vision blocks: "none" (keep every activation: fastest, most memory),
    "selective" (keep the attention sub-layer's activations, recompute norm2 + MLP of each block in the backward
    pass: ~half the activation memory for ~5% more vision FLOPs), "full" (keep only each block's input, recompute
    the whole block: least memory, ~33% more vision FLOPs). true / false (the old boolean) mean "full" / "none"."""
    compile: bool = False
    """``torch.compile`` each vision block in place (regional; parameter names unchanged). Pays off on GPU. The
    token dimension is compiled dynamic, so chunks of varying depth reuse one graph instead of recompiling."""

    def __post_init__(self) -> None:
        self.grad_checkpointing = grad_checkpointing_mode(self.grad_checkpointing, "model.grad_checkpointing")


@dataclass
class LossConfig:
    kind: str = "sigmoid"
    """sigmoid | clip | swca."""
    alpha: float = 0.5
    """SWCA: weight of the identity in the soft targets A = alpha*I + (1 - alpha)*W."""
    form: str = "sigmoid"
    """SWCA: sigmoid | softmax."""
    spatial_weight: float = 1.0
    knowledge_weight: float = 1.0
    intra_weight: float = 0.0
    spatial_sigma_mm: float = 50.0
    """Bandwidth (mm) of the spatial kernel on the distance of two chunks' z-centres (SWCA's spatial term and
    ``same_study=soft``)."""
    soft_norm: str = "row"
    """SWCA: how the affinities W become targets. "row": each row's off-diagonal W is scaled to sum to 1, so the
    related samples share a fixed (1 - alpha) of the row's target mass whatever the global batch (softmax form: the
    true pair gets exactly alpha; sigmoid form: the true pair's target stays 1); a row with no related sample keeps
    the identity. "none": A = alpha * I + (1 - alpha) * W as it is (SCALE-VLP's formula; every off-diagonal pair adds
    mass, so the true pair's share falls as the batch grows)."""
    same_study: str = "auto"
    """Pairs of different samples (chunks) of one study, in every loss kind and form: "negative" (as any other
    pair), "ignore" (left out of the loss: no term in the sigmoid sum, not in the softmax denominator), "soft"
    (target = the spatial kernel on the two z-centres, ``spatial_sigma_mm``: chunks close in z count as near
    positives; SWCA: their W, whose spatial term is that kernel), or "auto": "soft" for ``loss.kind=swca`` and
    for ``data.chunks_per_volume`` > 1, "negative" for the hard losses with one chunk per volume (such pairs then
    hardly ever meet, and the losses are what they were before this setting existed)."""
    ring: bool = False
    """Sigmoid losses: bidirectional neighbour exchange instead of all-gather."""
    negation_pairs: int = 1
    """Negation-pair loss: (true, negated) finding statements mined from each sample's text and scored against
    its volume (``volvlp_ray.losses.negation_pair_loss``); pairs per sample, 0 = off."""
    pair_weight: float = 1.0
    """Weight of the negation-pair loss, added to the contrastive loss."""


@dataclass
class TrainConfig:
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 16
    """Samples per worker per step (the global batch is this times the number of workers)."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    """adamw | muon (Muon for hidden matrices, AdamW at ``lr`` for the rest)."""
    muon_lr: float = 0.02
    """Learning rate of the Muon half when ``optimizer=muon``."""
    zero_stage: int = 2
    grad_clip: float = 1.0
    checkpoint_every: int = 300
    """Report a DeepSpeed checkpoint through ray.train.report every N steps (and at the end)."""
    num_to_keep: int = 2
    log_every: int = 10
    grad_cache_micro_batch: int = 0
    """> 0: embedding-gradient caching with micro-batches of this size (contrastive batches beyond memory)."""
    max_failures: int = 1
    """Worker failures (a killed worker, a lost node) survived by resuming from the latest checkpoint (Ray Train
    ``FailureConfig.max_failures``, which also gets ``max_rollbacks`` added); -1: unlimited, 0: none."""
    max_bad_steps: int = 3
    """After this many consecutive steps skipped for non-finite loss/gradients the run rolls back to its latest
    checkpoint (0: never roll back, only skip)."""
    max_rollbacks: int = 2
    """Rollbacks a run may make; at the next run of ``max_bad_steps`` bad steps it stops with an error."""
    storage_path: str | None = None
    """Where Ray Train keeps runs and checkpoints (and sweeps their trials): default ``{workspace}/ray_results``;
    any pyarrow filesystem URI, e.g. ``s3://bucket/ray_results`` (credentials from the environment)."""
    timeout_s: int = 1800
    """No silent hangs: a collective (the process groups of Ray Train, DeepSpeed, the sampler and validation, and
    Ray Train's report barrier) or a wait for the next training batch that lasts longer than this many seconds
    ends the run with an error naming this setting."""

    def __post_init__(self) -> None:
        if self.grad_cache_micro_batch and self.zero_stage == 3:
            raise ConfigError("train.grad_cache_micro_batch does not work with train.zero_stage=3 (the loss reads the "
                              "logit scale and bias outside the forward pass, where ZeRO-3 keeps them partitioned): "
                              "use ZeRO stage 0-2 with gradient caching")
        if self.max_failures < -1:
            raise ConfigError(f"train.max_failures must be >= 0, or -1 for unlimited; got {self.max_failures}")
        if self.max_bad_steps < 0 or self.max_rollbacks < 0:
            raise ConfigError(f"train.max_bad_steps and train.max_rollbacks must be >= 0 (max_bad_steps 0: never "
                              f"roll back); got {self.max_bad_steps} and {self.max_rollbacks}")


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    data_cpus: int = 1
    """CPUs the run keeps free beside its training workers for Ray Data's read/decode tasks (checked against the
    cluster before training starts; see "Fitting the cluster" in the README)."""
    cluster: str = "auto"
    """Whether nodes may join the cluster while the run waits for resources: "auto" (detected: KubeRay, an
    autoscaling cluster config, a ``ray up`` head), "fixed" (a cluster too small for the run fails at once; one node
    too small only for ``data_cpus`` is fitted) or "autoscaling" (only a warning; the workers wait for the nodes)."""


@dataclass
class EvalConfig:
    at_end: bool = True
    """Evaluate the trained model on the held-out split at the end of pre-training."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 50, 100])
    """Cut-offs of Recall@K (report<->volume) and of the volume->volume label-Jaccard@K. A K at or above the
    number of evaluated volumes is capped at N (its recall and random baseline are then 1) and counted in
    ``n_ks_capped``; the evaluate job lists such Ks under ``ks_capped``."""
    prompts: list[str] = field(default_factory=lambda: ["{label} is present.", "{label} is not present."])
    """Zero-shot (positive, negative) prompt templates with a ``{label}`` field; the score of a label is the
    softmax over the pair, taken at the positive prompt (CT-CLIP protocol)."""
    batch_size: int = 16
    """Volumes per forward pass when embedding a split."""
    n_bootstrap: int = 200
    """Bootstrap resamples for the CIs of the training-end evaluation (0 = none). ``jobs/evaluate.py`` uses
    1000 (the CT-CLIP protocol) unless ``eval.n_bootstrap`` is given on its command line or ``--config``."""
    volume_mode: str = "whole"
    """How a volume of any depth becomes one embedding: "whole" (one forward pass over all slices) or
    "sliding" (z-chunks of ``chunk_depth`` slices every ``chunk_stride`` slices, pooled by ``chunk_pool``)."""
    chunk_depth: int = 48
    """Sliding mode: slices per chunk (rounded down to a multiple of the z patch); a volume no deeper than this
    is one chunk. Match ``data.chunk_depth`` of an organ-mode (SigVLP) model."""
    chunk_stride: int = 24
    """Sliding mode: slices between chunk starts; the last chunk always ends at the last slice."""
    chunk_pool: str = "mean"
    """Sliding mode: mean | max over the chunks' L2-normalised features (re-normalised afterwards)."""
    probe: bool = True
    """Evaluate job: fit a linear probe (logistic regression per label) on the frozen embeddings of the
    training split and score it on the evaluated split (skipped, and said so, when there is no training split)."""
    probe_train_volumes: int = 0
    """Evaluate job: embed at most this many training volumes for the probe (the first in shard order);
    0 = all."""
    every: int = 100
    """Validation during pre-training every N optimizer steps (and at each checkpoint) on ``val_volumes``
    held-out volumes (``volvlp_ray.eval.validation.Validator``), logged as ``val/...`` and reported to Ray
    Train (Tune's schedulers rank sweep trials by it); 0 = off. About 1-3 s per validation on CPU."""
    val_volumes: int = 32
    """Held-out volumes (the first in shard order) that validation during pre-training embeds each time."""
    reader: str = "auto"
    """How a split is read to be embedded (held-out evaluation, the probe's training split): "ray_data" (Ray Data
    tasks decode and tokenise in parallel, streaming to this process: for large splits), "direct" (this process
    reads the shards itself, one batch of voxels at a time, as validation does: no Ray Data start-up, which costs
    tens of seconds on a small machine), or "auto": direct for at most ``direct_max_volumes`` volumes."""
    direct_max_volumes: int = 512
    """``reader: auto`` reads a split of at most this many volumes directly, a larger one with Ray Data."""
    organs: bool = True
    """Evaluate job: organ classification of z-chunks (SigVLP; ``volvlp_ray.eval.organs``): which organ groups
    each chunk shows, from the organ z-extents stored with the volumes, zero-shot (``organ_prompt``) and by a
    linear probe fitted on the training split's chunks; average precision per organ with volume-bootstrap CIs and
    a radar chart. Skipped, and said so, when the shards hold no organ extents."""
    organ_chunk_depth: int = 16
    """Organ classification: slices per chunk (rounded down to a multiple of the z patch)."""
    organ_chunk_stride: int = 8
    """Organ classification: slices between chunk starts (the last chunk ends at the volume's last slice)."""
    organ_min_overlap: float = 0.5
    """Organ classification: an organ is present in a chunk when their z-overlap is at least this fraction of the
    shorter of the two (chunk length, organ extent)."""
    organ_prompt: str = "The {organ} is seen."
    """Organ classification, zero-shot: the prompt of an organ group (``{organ}``: ``eval.organs.ORGAN_PROMPT_NAMES``);
    a chunk's score is its cosine similarity with the prompt."""
    organ_max_volumes: int = 0
    """Organ classification: the first this many volumes of each split (evaluated split, and the training split
    for the probe; 0 = all; ``probe_train_volumes`` also caps the training split)."""

    def __post_init__(self) -> None:
        if self.reader not in ("auto", "direct", "ray_data"):
            raise ConfigError(f"eval.reader={self.reader!r} is not one of ['auto', 'direct', 'ray_data']")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"eval.ks must be a non-empty list of positive ints, got {self.ks}")
        if len(self.prompts) != 2 or not all("{label}" in p for p in self.prompts):
            raise ConfigError(f"eval.prompts must be a (positive, negative) pair of templates with '{{label}}', "
                              f"got {self.prompts}")
        if self.volume_mode not in ("whole", "sliding"):
            raise ConfigError(f"eval.volume_mode={self.volume_mode!r} is not one of ['whole', 'sliding']")
        if self.chunk_pool not in ("mean", "max"):
            raise ConfigError(f"eval.chunk_pool={self.chunk_pool!r} is not one of ['mean', 'max']")
        if "{organ}" not in self.organ_prompt:
            raise ConfigError(f"eval.organ_prompt must contain '{{organ}}', got {self.organ_prompt!r}")
        if not 0.0 < self.organ_min_overlap <= 1.0:
            raise ConfigError(f"eval.organ_min_overlap must be in (0, 1], got {self.organ_min_overlap}")
        for name in ("batch_size", "chunk_depth", "chunk_stride", "val_volumes", "organ_chunk_depth",
                     "organ_chunk_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_bootstrap", "probe_train_volumes", "every", "direct_max_volumes", "organ_max_volumes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///{workspace}/mlflow.db."""
    experiment: str = "volvlp_ray"
    log_text: bool = False
    """Opt-in: allow report text to reach MLflow (patient data; off by default)."""
    log_volumes: bool = False
    """Opt-in: allow voxel data to reach MLflow (patient data; off by default)."""


@dataclass
class SweepConfig:
    """``jobs/sweep.py``: Ray Tune over config keys, each trial a pre-training run (ignored by other jobs)."""

    name: str | None = None
    """Sweep name (Tune experiment, MLflow parent run); run again with the same name to resume."""
    search_space: dict[str, Any] = field(default_factory=lambda: {
        "loss.alpha": [0.5, 1.0], "model.init_logit_scale": [5.0, 10.0]})
    """Dotted config key -> a list (grid), or {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]},
    {loguniform: [lo, hi]}, {randint: [lo, hi]}. Temperature = 1 / model.init_logit_scale."""
    num_samples: int = 1
    """Samples of the space (each grid point is repeated num_samples times)."""
    metric: str = "val/zeroshot/mean/auroc"
    """Validation metric the scheduler and the best trial go by (e.g. val/t2v/recall_at_10)."""
    mode: str = "max"
    scheduler: str = "asha"
    """asha (early stopping of weak trials at validation points) | fifo (every trial runs to the end)."""
    grace_period: int = 0
    """ASHA: steps every trial runs before it can be stopped; 0 = train.steps // 4."""
    reduction_factor: int = 2
    max_concurrent: int = 0
    """Trials at a time; 0 = as many as the cluster's CPUs/GPUs hold (each trial needs scaling.num_workers
    workers plus a CPU for its data pipeline)."""


@dataclass
class AblationConfig:
    """``jobs/ablate.py``: a grid of pre-training runs, each evaluated on the held-out split (ignored by other
    jobs). The trials: the main grid ``losses x texts x seeds`` at ``loss.alpha`` and the config's global batch;
    an alpha arm, ``alpha_losses x alphas x seeds`` (report text); a batch arm, ``batch_losses x global_batches x
    seeds`` (report text). A trial that two arms share runs once."""

    name: str | None = None
    """Ablation name (Tune experiment, MLflow parent run); run again with the same name to resume."""
    losses: list[str] = field(default_factory=lambda: ["clip", "sigmoid", "swca-sigmoid", "swca-softmax"])
    """Loss arms: clip, sigmoid, swca-sigmoid, swca-softmax."""
    texts: list[str] = field(default_factory=lambda: ["report", "organ"])
    """Text arms: report (whole volume, whole report) or organ (``chunks_per_volume`` chunks per volume)."""
    chunks_per_volume: int = 2
    """K of the organ arm (``data.chunks_per_volume``)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    alpha_losses: list[str] = field(default_factory=lambda: ["swca-softmax"])
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.75, 1.0])
    batch_losses: list[str] = field(default_factory=lambda: ["sigmoid", "swca-softmax"])
    global_batches: list[int] = field(default_factory=lambda: [8])
    """Global batches of the batch arm (split over ``scaling.num_workers``); the main grid's is the config's."""
    max_concurrent: int = 0
    """Trials at a time; 0 = as many as the cluster holds."""


@dataclass
class SegmentationConfig:
    """``jobs/segmentation.py``: segmentation heads on the pre-trained ViT3D, trained on the shards' organ label
    maps (``data.label_maps``), each also on a randomly initialised encoder (ignored by other jobs)."""

    heads: list[str] = field(default_factory=lambda: ["linear", "unetr"])
    """Heads to train: "linear" (a linear layer per patch token of the frozen encoder's last layer, unpatchified
    to voxels) and "unetr" (a light UNETR-style decoder: MONAI's UNETR up-blocks over three of the encoder's
    layers and a convolution stem of the image)."""
    encoder: str = "frozen"
    """The UNETR head's encoder: "frozen" or "tuned" (fine-tuned at ``encoder_lr``); the linear probe's is always
    frozen."""
    random_baseline: bool = True
    """Train every head also on a randomly initialised encoder of the same architecture (the value of
    pre-training)."""
    steps: int = 150
    """Optimizer steps per head and encoder."""
    batch_size: int = 4
    """Crops per worker per step."""
    lr: float = 1e-2
    """AdamW learning rate of the heads (cosine decay, 10 % warm-up)."""
    encoder_lr: float = 1e-4
    """Learning rate of a tuned encoder."""
    crop: list[int] = field(default_factory=lambda: [16, 64, 64])
    """Training crop (z, y, x) voxels (multiples of the patch; padded with air and background where a volume is
    smaller) and the sliding window of inference."""
    decoder_channels: int = 16
    """UNETR head: channels of every decoder stage."""
    eval_volumes: int = 32
    """Held-out volumes (the first in shard order with a label map) for the Dice; 0 = all."""
    sw_overlap: float = 0.25
    """Sliding-window inference: overlap of neighbouring windows (MONAI ``sliding_window_inference``)."""
    overlays: int = 3
    """Held-out volumes drawn as overlays (CT slice, ground truth, each encoder's prediction)."""

    def __post_init__(self) -> None:
        if not self.heads or any(h not in ("linear", "unetr") for h in self.heads):
            raise ConfigError(f"segmentation.heads must be a non-empty list of 'linear' / 'unetr', got {self.heads}")
        if self.encoder not in ("frozen", "tuned"):
            raise ConfigError(f"segmentation.encoder={self.encoder!r} is not one of ['frozen', 'tuned']")
        if len(self.crop) != 3 or min(self.crop) < 1:
            raise ConfigError(f"segmentation.crop must be three positive ints (z, y, x), got {self.crop}")
        for name in ("steps", "batch_size", "decoder_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"segmentation.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ConfigError(f"segmentation.sw_overlap must be in [0, 1), got {self.sw_overlap}")



@dataclass
class ReportConfig:
    """``jobs/report_generation.py``: a report generator on the pre-trained ViT3D (SCALE-VLP's report generation):
    the volume's patch tokens pooled to ``visual_tokens`` vectors, projected into a causal language model's
    embedding space as a prefix (ignored by other jobs)."""

    decoder: str = "scratch-tiny"
    """The language model: "scratch-tiny" / "scratch-small" (a randomly initialised GPT-2 with a WordPiece tokenizer
    built from the training reports; for CPU runs and tests), or any Hugging Face ``AutoModelForCausalLM`` as a
    local folder or hub id (its own tokenizer)."""
    decoder_tuning: str = "full"
    """How the decoder trains: "full" (every weight), "lora" (LoRA adapters through ``peft``, the rest frozen) or
    "frozen" (only the visual pooler and projection train)."""
    lora_r: int = 8
    """LoRA rank (``decoder_tuning=lora``)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (``decoder_tuning=lora``)."""
    lora_targets: str = "all-linear"
    """peft ``target_modules``: "all-linear", or comma-separated module names (e.g. "q_proj,v_proj")."""
    encoder: str = "frozen"
    """The ViT3D: "frozen" (features only) or "tuned" (fine-tuned at ``encoder_lr``)."""
    encoder_lr: float = 1e-5
    """Learning rate of a tuned encoder."""
    pooler: str = "attention"
    """Patch tokens -> visual tokens: "attention" (learned queries, one cross-attention) or "perceiver"
    (``perceiver_layers`` blocks of cross-attention, self-attention over the latents and an MLP)."""
    visual_tokens: int = 16
    """Visual tokens (the prefix length)."""
    perceiver_layers: int = 2
    """Blocks of the perceiver pooler."""
    global_token: bool = True
    """Put the pre-trained image embedding (the encoder's pooled features through its contrastive projection, what
    retrieval and zero-shot classification use) in front of the pooled tokens as one more visual token."""
    steps: int = 800
    """Optimizer steps."""
    batch_size: int = 8
    """Volumes per worker per step."""
    lr: float = 3e-3
    """Peak learning rate of the pooler, projection and decoder (AdamW; linear warm-up, cosine decay)."""
    warmup_steps: int = 40
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage of the job (0, 1 or 2: generation needs whole weights on every rank)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (model, optimizer, schedule, RNG; a killed worker resumes from the last one)."""
    max_failures: int = 1
    """Worker failures Ray Train recovers from (from the last checkpoint); -1 unlimited."""
    max_length: int = 160
    """Report tokens (with the start and end tokens): longer reports are cut in training; the most a generated
    report may have."""
    vocab_size: int = 1000
    """Vocabulary of a scratch decoder's tokenizer (built from the training reports)."""
    decoding: list[str] = field(default_factory=lambda: ["greedy", "beam"])
    """Decodings evaluated: "greedy" and / or "beam"."""
    num_beams: int = 3
    """Beams of beam search."""
    eval_volumes: int = 0
    """Held-out volumes generated and scored (the first in shard order); 0 = all."""
    labeler: str = "miner"
    """Clinical-efficacy labels of generated and reference reports: "miner" (the negation-aware keyword miner,
    ``data/negation.py``) or a Hugging Face multi-label text classifier (folder or hub id) whose ``id2label`` names
    the 18 CT-RATE labels (CT-RATE's own labeler is such a model)."""
    bertscore_model: str | None = None
    """BERTScore's scoring model (folder or hub id, e.g. "roberta-large" or a clinical BERT); None skips BERTScore
    (the embedded default has no such model offline)."""
    bertscore_layers: int | None = None
    """The scoring model's layer whose features BERTScore compares; None: bert-score's default for a model it
    knows, else the model's last layer."""
    n_bootstrap: int = 200
    """Bootstrap resamples (of held-out reports) for every metric's 95 % interval."""
    baselines: bool = True
    """Score the most frequent training report and the retrieval-nearest training report the same way."""

    def __post_init__(self) -> None:
        if self.decoder_tuning not in ("full", "lora", "frozen"):
            raise ConfigError(f"report.decoder_tuning={self.decoder_tuning!r} is not one of ['full', 'lora', 'frozen']")
        if self.encoder not in ("frozen", "tuned"):
            raise ConfigError(f"report.encoder={self.encoder!r} is not one of ['frozen', 'tuned']")
        if self.pooler not in ("attention", "perceiver"):
            raise ConfigError(f"report.pooler={self.pooler!r} is not one of ['attention', 'perceiver']")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"report.zero_stage must be 0, 1 or 2 (generation needs whole weights on every rank), "
                              f"got {self.zero_stage}")
        if not self.decoding or any(d not in ("greedy", "beam") for d in self.decoding):
            raise ConfigError(f"report.decoding must be a non-empty list of 'greedy' / 'beam', got {self.decoding}")
        for name in ("visual_tokens", "perceiver_layers", "steps", "batch_size", "checkpoint_every", "num_beams",
                     "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ConfigError(f"report.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 4:
            raise ConfigError(f"report.max_length must be >= 4 tokens, got {self.max_length}")
        if self.vocab_size < 16:
            raise ConfigError(f"report.vocab_size must be >= 16, got {self.vocab_size}")
        for name in ("eval_volumes", "n_bootstrap", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"report.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise ConfigError(f"report.max_failures must be >= -1, got {self.max_failures}")
        if self.lr <= 0 or self.encoder_lr <= 0:
            raise ConfigError(f"report.lr and report.encoder_lr must be > 0, got {self.lr}, {self.encoder_lr}")


@dataclass
class Config:
    workspace: str = "workspace"
    """Folder holding data, shards, runs and the default MLflow database."""
    seed: int = 0
    run_name: str | None = None
    """Name of the run (Ray Train run dir and MLflow run); default: derived from the config."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        validate(self)

    # convenience paths -------------------------------------------------------------------------------
    @property
    def workspace_path(self) -> Path:
        return Path(os.path.abspath(os.path.expanduser(self.workspace)))

    @property
    def shards_path(self) -> str:
        return self.data.shards_dir or str(self.workspace_path / "shards")


_CHOICES = {
    ("model", "preset"): ("tiny", "small", "base", "large"),
    ("model", "pool"): ("cls", "mean", "attn"),
    ("model", "text_pool"): ("cls", "mean"),
    ("loss", "kind"): ("sigmoid", "clip", "swca"),
    ("loss", "form"): ("sigmoid", "softmax"),
    ("loss", "soft_norm"): ("row", "none"),
    ("loss", "same_study"): ("auto", "negative", "ignore", "soft"),
    ("sweep", "mode"): ("max", "min"),
    ("sweep", "scheduler"): ("asha", "fifo"),
    ("train", "optimizer"): ("adamw", "muon"),
    ("train", "zero_stage"): (0, 1, 2, 3),
    ("data", "text_mode"): ("report", "organ"),
    ("data", "organ_extents"): ("auto", "csv", "segmentation", "none"),
    ("data", "reader"): ("shards", "webdataset"),
    ("data", "normalise_in"): ("device", "loader"),
    ("data", "volume_transport"): ("direct", "object_store"),
    ("data", "sampler"): ("equal", "bucket"),
    ("scaling", "cluster"): ("auto", "fixed", "autoscaling"),
}


def same_study_mode(cfg: Config) -> str:
    """``loss.same_study`` with "auto" resolved: "soft" for SWCA (its spatial term is that rule) and for several
    chunks per volume, else "negative" (the hard losses with one chunk per volume: the losses as they always were)."""
    if cfg.loss.same_study != "auto":
        return cfg.loss.same_study
    return "negative" if cfg.data.chunks_per_volume == 1 and cfg.loss.kind != "swca" else "soft"


_SWCA_ONLY = ("loss.alpha", "loss.form", "loss.spatial_weight", "loss.knowledge_weight", "loss.intra_weight",
              "loss.soft_norm")
_ORGAN_ONLY = ("data.chunk_depth", "data.chunks_per_volume", "data.chunk_overlap", "data.organ_impression",
               "data.empty_chunk_text")


def voided_by(cfg: Config, key: str) -> str | None:
    """Why the dotted ``key`` has no effect under ``cfg`` (the setting that voids it), or None when it may have one.
    Sweeps and ablations use it: a swept key that changes nothing makes trials that differ only in their name."""
    loss, data = cfg.loss, cfg.data
    if key in _SWCA_ONLY and loss.kind != "swca":
        return f"loss.kind={loss.kind} (it applies to loss.kind=swca only)"
    if key == "loss.spatial_sigma_mm" and loss.kind != "swca" and same_study_mode(cfg) != "soft":
        return (f"loss.kind={loss.kind} with loss.same_study={loss.same_study} (it applies to loss.kind=swca and to "
                "loss.same_study=soft)")
    if key == "loss.ring" and (loss.kind == "clip" or (loss.kind == "swca" and loss.form == "softmax")):
        return f"loss.kind={loss.kind}" + (f", loss.form={loss.form}" if loss.kind == "swca" else "") + \
            " (the ring exchange is for sigmoid losses)"
    if key == "model.init_logit_bias" and (loss.kind == "clip" or (loss.kind == "swca" and loss.form == "softmax")):
        return f"loss.kind={loss.kind}" + (f", loss.form={loss.form}" if loss.kind == "swca" else "") + \
            " (a softmax loss has no bias)"
    if key == "loss.same_study" and data.chunks_per_volume == 1:
        return "data.chunks_per_volume=1 (no two chunks of one study share a step)"
    if key in _ORGAN_ONLY and data.text_mode != "organ":
        return f"data.text_mode={data.text_mode} (it applies to data.text_mode=organ only)"
    if key == "data.chunk_overlap" and data.chunks_per_volume == 1:
        return "data.chunks_per_volume=1 (it applies to several chunks per volume only)"
    if key == "train.muon_lr" and cfg.train.optimizer != "muon":
        return f"train.optimizer={cfg.train.optimizer} (it applies to train.optimizer=muon only)"
    if key == "loss.pair_weight" and loss.negation_pairs == 0:
        return "loss.negation_pairs=0 (the negation-pair loss is off)"
    return None


def validate(cfg: Config) -> None:
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}={value!r} is not one of {list(choices)}")
    if len(cfg.model.patch) != 3 or min(cfg.model.patch) < 1:
        raise ConfigError(f"model.patch must be three positive ints (z, y, x), got {cfg.model.patch}")
    if cfg.data.in_plane_size % cfg.model.patch[1] or cfg.data.in_plane_size % cfg.model.patch[2]:
        raise ConfigError(
            f"data.in_plane_size={cfg.data.in_plane_size} is not a multiple of the in-plane patch "
            f"{cfg.model.patch[1:]}"
        )
    if len(cfg.data.spacing) != 3 or min(cfg.data.spacing) <= 0:
        raise ConfigError(f"data.spacing must be three positive mm values (z, y, x), got {cfg.data.spacing}")
    lo, hi = cfg.data.chunk_depth
    if not 0 < lo <= hi:
        raise ConfigError(f"data.chunk_depth must be [min, max] with 0 < min <= max, got {cfg.data.chunk_depth}")
    k = cfg.data.chunks_per_volume
    if k < 1:
        raise ConfigError(f"data.chunks_per_volume must be >= 1, got {k}")
    if k > 1:
        if cfg.data.text_mode != "organ" or cfg.data.sampler != "equal":
            raise ConfigError(f"data.chunks_per_volume={k} draws several z-chunks of a volume into one step: it needs "
                              f"data.text_mode=organ and data.sampler=equal (got {cfg.data.text_mode} and "
                              f"{cfg.data.sampler})")
        if cfg.train.batch_size % k:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} counts chunks: it must be a multiple of "
                              f"data.chunks_per_volume={k}")
    if cfg.loss.spatial_sigma_mm <= 0:
        raise ConfigError(f"loss.spatial_sigma_mm must be > 0, got {cfg.loss.spatial_sigma_mm}")
    if not 0.0 <= cfg.loss.alpha <= 1.0:
        raise ConfigError(f"loss.alpha must be in [0, 1], got {cfg.loss.alpha}")
    for name in ("steps", "batch_size", "checkpoint_every", "log_every", "num_to_keep"):
        if getattr(cfg.train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(cfg.train, name)}")
    if cfg.model.proj_norm and (cfg.train.batch_size < 2 or cfg.train.grad_cache_micro_batch == 1):
        raise ConfigError("model.proj_norm batch-normalises features: train.batch_size (and "
                          "train.grad_cache_micro_batch, if used) must be >= 2")
    if cfg.data.volume_transport == "direct" and (cfg.data.reader != "shards" or cfg.data.normalise_in != "device"):
        raise ConfigError("data.volume_transport=direct reads the voxels outside Ray Data: it needs data.reader=shards "
                          f"and data.normalise_in=device (got {cfg.data.reader} and {cfg.data.normalise_in}); set "
                          "data.volume_transport=object_store for those")
    if cfg.data.samples_per_read_task < 0:
        raise ConfigError(f"data.samples_per_read_task must be >= 0 (0 = one read task per shard), got "
                          f"{cfg.data.samples_per_read_task}")
    if cfg.data.pool_batches < 1 or cfg.data.max_pool_batches < cfg.data.pool_batches:
        raise ConfigError(f"data.pool_batches must be >= 1 and data.max_pool_batches >= it, got "
                          f"{cfg.data.pool_batches} and {cfg.data.max_pool_batches}")
    if cfg.data.bucket_pool < 1:
        raise ConfigError(f"data.bucket_pool must be >= 1 (1 = no bucketing), got {cfg.data.bucket_pool}")
    if cfg.loss.negation_pairs < 0 or cfg.loss.pair_weight < 0:
        raise ConfigError(f"loss.negation_pairs and loss.pair_weight must be >= 0, got {cfg.loss.negation_pairs} "
                          f"and {cfg.loss.pair_weight}")
    if cfg.loss.negation_pairs and cfg.train.grad_cache_micro_batch:
        raise ConfigError("the negation-pair loss is not available with gradient caching: set loss.negation_pairs=0 "
                          "together with train.grad_cache_micro_batch")
    if cfg.scaling.num_workers < 1:
        raise ConfigError(f"scaling.num_workers must be >= 1, got {cfg.scaling.num_workers}")
    if cfg.scaling.cpus_per_worker < 1 or cfg.scaling.data_cpus < 0:
        raise ConfigError(f"scaling.cpus_per_worker must be >= 1 and scaling.data_cpus >= 0, got "
                          f"{cfg.scaling.cpus_per_worker} and {cfg.scaling.data_cpus}")
    if cfg.train.timeout_s < 1:
        raise ConfigError(f"train.timeout_s must be >= 1 (seconds), got {cfg.train.timeout_s}")
    if cfg.data.num_volumes < 1 or cfg.data.num_val_volumes < 1:
        raise ConfigError("data.num_volumes and data.num_val_volumes must be >= 1")


# --------------------------------------------------------------------------------------------------------
# building from dicts


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where} must be a mapping with string keys, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:  # `key=none` on the command line parses as None; a plain string key means the word
            return "none"
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


_VALUE_PARSERS = {"model.grad_checkpointing": grad_checkpointing_mode}
"""Keys whose values are normalised by a function instead of plain type coercion: a boolean that became a mode
(YAML ``true`` / ``false``; a ``key=none`` override, which parses as None, means "none")."""


def _merge(base: dict, update: dict, cls: type, prefix: str = "") -> dict:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    out = dict(base)
    for key, value in update.items():
        where = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(
                f"unknown config key {where!r}; valid keys{' under ' + prefix[:-1] if prefix else ''}: "
                + ", ".join(valid)
            )
        tp = hints[key]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} is a section; give its keys ({', '.join(f.name for f in fields(tp))})")
            out[key] = _merge(out[key], value, tp, f"{where}.")
        elif where in _VALUE_PARSERS:
            out[key] = _VALUE_PARSERS[where](value, where)
        else:
            out[key] = _coerce(value, tp, where)
    return out


def _build(cls: type, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        tp = hints[f.name]
        kwargs[f.name] = _build(tp, values[f.name]) if is_dataclass(tp) else values[f.name]
    if cls is Config:
        return Config(**kwargs)
    return cls(**kwargs)


def config_to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 5}}`` -> ``{"train.steps": 5}`` (used for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(item: str) -> dict:
    """``"train.steps=50"`` -> ``{"train": {"steps": 50}}``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    value = None if raw.strip().lower() == "none" else (yaml.safe_load(raw) if raw != "" else "")
    nested: dict = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def config_from_dict(values: dict) -> Config:
    """A (possibly partial) nested dict -> validated Config; unknown keys are errors."""
    return _build(Config, _merge(asdict(Config()), values, Config))


CT_RATE_GRID: dict[str, Any] = {"spacing": [1.5, 0.75, 0.75], "in_plane_size": 480}
"""The preprocessing grid of CT-RATE / CT-CLIP: what a real (not synthetic) source gets unless ``data.spacing`` or
``data.in_plane_size`` is given (the dataclass defaults are the embedded synthetic data's toy grid)."""


def _dotted(tree: Any, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict):
        return {prefix} if prefix else set()
    out = {prefix} if prefix else set()
    for k, v in tree.items():
        out |= _dotted(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                real_source: bool | None = None) -> Config:
    """Defaults, then the YAML file (a partial tree), then dotted overrides; validated.

    For a real source (``real_source``, or by default ``data.source`` other than "synthetic") the grid keys the
    file and overrides leave unset (``data.spacing``, ``data.in_plane_size``) take CT-RATE's values
    (``CT_RATE_GRID``) instead of the toy grid of the embedded synthetic data."""
    values = asdict(Config())
    given: set[str] = set()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        values = _merge(values, loaded, Config)
        given |= _dotted(loaded)
    for item in overrides or []:
        parsed = parse_override(item)
        values = _merge(values, parsed, Config)
        given |= _dotted(parsed)
    if real_source is None:
        real_source = values["data"]["source"] != "synthetic"
    if real_source:
        for key, value in CT_RATE_GRID.items():
            if f"data.{key}" not in given:
                values["data"][key] = list(value) if isinstance(value, list) else value
    return _build(Config, values)


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its local paths made absolute against this process's working directory: ``workspace``,
    ``data.shards_dir`` and ``train.storage_path`` when they are relative local paths (URIs are kept). A driver
    hands this to its workers, whose working directory is Ray's (a Train worker's, a Tune trial's), not the
    user's: ``workspace=ws`` must mean the user's ``./ws`` there too."""
    def local(path: str | None) -> str | None:
        from volvlp_ray.data import storage

        return path if not path or storage.is_uri(path) else str(Path(os.path.abspath(os.path.expanduser(path))))

    values = asdict(cfg)
    values["workspace"] = local(values["workspace"])
    values["data"]["shards_dir"] = local(values["data"]["shards_dir"])
    values["train"]["storage_path"] = local(values["train"]["storage_path"])
    return config_from_dict(values)


def parse_cli(argv: list[str] | None = None, description: str = "", default_config: str | os.PathLike | None = None,
              tag: str = "") -> tuple[Config, Any]:
    """``[--config FILE] [key=value ...]`` -> (Config, argparse namespace). ``default_config``: the file a job runs
    when no ``--config`` is given (said on stdout, prefixed with ``[tag]``)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML file: a partial config tree"
                        + (f" (default: {default_config})" if default_config else ""))
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 loss.kind=sigmoid")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    apply_verbose_flag(args)
    if args.config is None and default_config is not None:
        args.config = str(default_config)
        print(f"[{tag}] config {args.config} (the default; --config FILE for another)", flush=True)
    # the user's relative paths, fixed here: the job's workers and trials run in Ray's working directories
    return with_absolute_paths(load_config(args.config, args.overrides)), args


def add_verbose_flag(parser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, DeepSpeed's and the other libraries' own logs on the console too (they go "
                             "to the run's log file otherwise), and every Ray worker's output")


def apply_verbose_flag(args) -> None:
    """``--verbose`` -> ``VOLVLP_VERBOSE=1`` (read by ``volvlp_ray.console`` here and, passed on, in the workers);
    without the flag the variable is left as the user set it."""
    if getattr(args, "verbose", False):
        from volvlp_ray import console

        console.set_verbose(True)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

