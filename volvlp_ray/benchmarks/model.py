"""Benchmark the whole training step: ViT3D + text tower + sigmoid loss + optimizer under DeepSpeed.

One process, no Ray: a world-size-1 process group (gloo on CPU, nccl on GPU), a ``VLP`` built from a vision
preset and a randomly initialised BERT-class text tower, ``deepspeed_config`` (ZeRO stage, AdamW or Muon,
clipping, schedule; bf16 on GPU), random volumes (no padding unless ``--padded``, so attention runs without a
mask and SDPA may pick its flash / cuDNN kernels) and full-length random token ids. ``warmup`` untimed
steps, then ``steps`` timed ones (device synchronised). ``--ray`` runs the same step again inside a Ray Train
``TorchTrainer`` with one worker and reports the overhead against the direct run.

Reported: samples/s, vision tokens/s, text tokens/s, step time, peak memory (GPU: ``max_memory_allocated``
over the timed steps; CPU: the process's peak RSS minus its RSS before the model was built), analytic FLOPs
per sample (3x the forward FLOPs of vision + text + projections + logits) and model-FLOPs utilisation
against ``--peak-tflops`` (default 989, the H100 dense bf16 peak, on GPU; none on CPU unless given).

    python jobs/benchmark.py model --out model_cpu.json                  # tiny preset on CPU
    python jobs/benchmark.py model --preset base --size 480 --depth 240 --patch 10 20 20 --bf16 --zero 2 \\
        --ray --out model_h100.json                                     # ViT-B, 13,824 tokens, one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from volvlp_ray.benchmarks import write_report

__all__ = ["CASES", "add_arguments", "build_settings", "flops_per_sample", "main", "measure", "run"]

CASES: dict[str, dict[str, Any]] = {
    "tiny": dict(size=64, depth=32, patch=(4, 16, 16), batch_size=4, text_model="scratch-tiny"),
    "small": dict(size=480, depth=240, patch=(10, 20, 20), batch_size=8, text_model="scratch-base"),
    "base": dict(size=480, depth=240, patch=(10, 20, 20), batch_size=8, text_model="scratch-base"),
    "large": dict(size=480, depth=240, patch=(10, 20, 20), batch_size=4, text_model="scratch-base"),
}
"""Defaults per vision preset: ``tiny`` is the CPU case; the others the CT-CLIP input (480 x 480 x 240 voxels,
patch 10 x 20 x 20 = 13,824 tokens) with a BERT-base-sized (BioClinicalBERT-class) text tower."""

ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
CPU_MEMORY_METHOD = "peak RSS of the process (getrusage ru_maxrss) minus its RSS just before the model was built"
GPU_MEMORY_METHOD = "torch.cuda.max_memory_allocated over the timed steps (model, optimizer state, activations)"
CORPUS = [
    "No pleural effusion. Mild cardiomegaly is present. The trachea and both main bronchi are open.",
    "A lung nodule in the right upper lobe; emphysema in both lungs. No lymphadenopathy.",
    "Coronary artery wall calcification. Hiatal hernia. Atelectasis in the lower lobes.",
]


def flops_per_sample(model, grid_tokens: int, text_tokens: int, global_batch: int) -> dict[str, float]:
    """Analytic FLOPs of one sample: forward of each part and the training step (3x forward: the backward
    pass costs about twice the forward)."""
    from volvlp_ray.models import text_flops_per_sample, vit3d_flops_per_sample

    vision = vit3d_flops_per_sample(model.vision, grid_tokens)
    text = text_flops_per_sample(model.text, text_tokens)
    heads = 2.0 * (model.vision.dim + model.text.hidden_size) * model.embed_dim + 2.0 * global_batch * model.embed_dim
    forward = vision + text + heads
    return {"vision_forward": vision, "text_forward": text, "heads_and_logits_forward": heads,
            "forward": forward, "train_step": 3.0 * forward}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _sdpa_backend(name: str):
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def measure(s: dict[str, Any]) -> dict[str, Any]:
    """Build, warm up and time the training step described by settings ``s`` (see :func:`run`), in a process
    where ``torch.distributed`` is already initialised. Returns the measured figures."""
    import deepspeed
    import torch.distributed as dist

    from volvlp_ray.config import Config
    from volvlp_ray.losses import build_loss
    from volvlp_ray.models import build_model, build_tokenizer
    from volvlp_ray.models.text import SPECIAL_TOKENS
    from volvlp_ray.train.deepspeed import compile_blocks, deepspeed_config, param_groups

    gpu = s["device"] == "cuda"
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    rss_before = _rss_bytes()

    cfg = Config()
    cfg.model.preset, cfg.model.patch, cfg.model.pool = s["preset"], list(s["patch"]), s["pool"]
    cfg.model.grad_checkpointing, cfg.model.text_model = s["grad_checkpointing"], s["text_model"]
    t = cfg.train
    t.zero_stage, t.optimizer, t.batch_size = s["zero"], s["optimizer"], s["batch_size"]
    t.steps, t.warmup_steps = s["warmup"] + s["steps"], 1
    tokenizer = build_tokenizer(CORPUS, vocab_size=s["vocab_size"])
    torch.manual_seed(s["seed"])
    model = build_model(cfg.model, tokenizer)
    if s["compile"]:
        compile_blocks(model)
    ds = deepspeed_config(cfg, use_gpu=gpu)
    ds["bf16"]["enabled"] = s["bf16"]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, t.weight_decay),
                                           config=ds, dist_init_required=False)
    loss_fn = build_loss("sigmoid")
    dtype = torch.bfloat16 if s["bf16"] else torch.float32

    b, size, depth, n_text = s["batch_size"], s["size"], s["depth"], s["text_length"]
    g = torch.Generator().manual_seed(s["seed"] + 1)
    volume = torch.randn(b, 1, depth, size, size, generator=g).to(device, dtype)
    depths = None
    if s["padded"]:  # every other sample loses its last z-patch: attention runs with a key-padding mask
        depths = torch.full((b,), depth, dtype=torch.long)
        depths[1::2] = depth - s["patch"][0]
        depths = depths.to(device)
    input_ids = torch.randint(len(SPECIAL_TOKENS), len(tokenizer), (b, n_text), generator=g)  # no special ids
    input_ids[:, 0] = tokenizer.cls_token_id
    input_ids, attention_mask = input_ids.to(device), torch.ones_like(input_ids, device=device)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def step() -> torch.Tensor:
        out = engine(volume, depths, input_ids, attention_mask)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        engine.backward(loss)
        engine.step()
        return loss.detach()

    with _sdpa_backend(s["attention"]):
        t0 = time.perf_counter()
        for _ in range(s["warmup"]):
            loss = step()
        sync()
        warmup_s = time.perf_counter() - t0
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(s["steps"]):
            start = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - start)
    final_loss = float(loss)
    if not torch.isfinite(torch.tensor(final_loss)):
        raise RuntimeError(f"the benchmark step gave a non-finite loss ({final_loss})")

    world = dist.get_world_size() if dist.is_initialized() else 1
    grid = (depth // s["patch"][0]) * (size // s["patch"][1]) * (size // s["patch"][2])
    flops = flops_per_sample(engine.module, grid, n_text, b * world)
    total = sum(times)
    samples_per_s = b * world * len(times) / total
    peak_tflops = s["peak_tflops"]
    achieved = flops["train_step"] * samples_per_s
    if gpu:
        peak_mem, method = torch.cuda.max_memory_allocated(), GPU_MEMORY_METHOD
    else:
        peak_mem, method = _peak_rss_bytes() - rss_before, CPU_MEMORY_METHOD
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    return {
        "samples_per_s": samples_per_s,
        "vision_tokens_per_s": samples_per_s * grid,
        "text_tokens_per_s": samples_per_s * n_text,
        "step_time_s": {"mean": total / len(times), "median": statistics.median(times), "min": min(times),
                        "max": max(times)},
        "warmup_s": warmup_s,
        "peak_memory_bytes": int(peak_mem),
        "peak_memory_gib": round(peak_mem / 2**30, 3),
        "memory_method": method,
        "flops_per_sample": flops,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak_tflops,
        "mfu": achieved / (peak_tflops * 1e12) if peak_tflops else None,
        "final_loss": final_loss,
        "vision_tokens_per_sample": grid,
        "parameters": int(n_params),
        "world_size": world,
        "engine": {"optimizer": type(engine.optimizer).__name__, "bf16": engine.bfloat16_enabled(),
                   "zero_stage": engine.zero_optimization_stage()},
        "device_name": torch.cuda.get_device_name(device) if gpu else None,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _measure_direct(s: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` in this process, inside a world-size-1 process group of its own."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        port = _free_port()
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
        if s["device"] == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if s["device"] == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        return measure(s)
    finally:
        if own:
            dist.destroy_process_group()


def _direct_child(s: dict[str, Any], path: str, target: Any = None) -> None:
    try:
        result = (target or _measure_direct)(s)
    except BaseException as exc:  # the parent reports it (an OOM, an unavailable SDPA kernel, ...)
        Path(path).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    Path(path).write_text(json.dumps({"result": result}))


def _measure_direct_in_child(s: dict[str, Any], timeout_s: float | None = None, target: Any = None) -> dict[str, Any]:
    """:func:`_measure_direct` (or ``target(s)``, a picklable module-level function) in a fresh (spawned)
    process: nothing of it stays in this one, so the GPU memory it used is free again for the Ray Train worker
    (or the next case) that runs next. A failure in the child is a ``RuntimeError`` carrying its error; past
    ``timeout_s`` the child is stopped and a ``TimeoutError`` raised."""
    import multiprocessing

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "direct.json")
        child = multiprocessing.get_context("spawn").Process(target=_direct_child, args=(s, path, target))
        child.start()
        child.join(timeout_s)
        if child.is_alive():
            child.terminate()
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()
            raise TimeoutError(f"the benchmark process did not finish within {timeout_s:.0f} s and was stopped")
        out = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
        if child.exitcode != 0 or "result" not in out:
            raise RuntimeError(out.get("error") or f"the direct benchmark process failed (exit code {child.exitcode}); "
                               "see its output above")
        return out["result"]


def _ray_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: the same measurement; the figures come back as a JSON file in a checkpoint."""
    import ray.train

    result = measure(config["settings"])
    with tempfile.TemporaryDirectory() as d:
        Path(d, "benchmark.json").write_text(json.dumps(result))
        ray.train.report({"samples_per_s": result["samples_per_s"]},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def _measure_ray(s: dict[str, Any], storage: str) -> dict[str, Any]:
    """:func:`measure` inside a Ray Train ``TorchTrainer`` with one worker (one GPU on GPU); wall time of ``fit``
    (worker start-up included) is reported beside it."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from volvlp_ray.config import Config
    from volvlp_ray.train.trainer import ensure_ray

    gpu = s["device"] == "cuda"
    ensure_ray(Config())
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                        **({} if gpu else {"DS_ACCELERATOR": "cpu"}),
                        **({"OMP_NUM_THREADS": str(s["threads"])} if s["threads"] else {})}}
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"settings": s},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker={"CPU": s["threads"] or 1}),
        run_config=RunConfig(name=f"benchmark_model_{int(time.time())}", storage_path=storage,
                             worker_runtime_env=env),
    )
    start = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train benchmark run reported no result ({result.error})")
    with result.checkpoint.as_directory() as d:
        out = json.loads(Path(d, "benchmark.json").read_text())
    out["fit_wall_s"] = fit_s
    return out


def build_settings(
    preset: str = "tiny",
    size: int | None = None,
    depth: int | None = None,
    patch: tuple[int, int, int] | None = None,
    batch_size: int | None = None,
    text_model: str | None = None,
    text_length: int = 192,
    vocab_size: int = 2000,
    pool: str = "cls",
    zero: int = 2,
    optimizer: str = "adamw",
    device: str = "auto",
    bf16: bool | None = None,
    grad_checkpointing: str | bool = "none",
    compile: bool = False,
    attention: str = "auto",
    padded: bool = False,
    steps: int = 5,
    warmup: int = 2,
    peak_tflops: float | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The validated settings of one measurement (defaults filled in; see :func:`run` for the arguments);
    a ``ValueError`` names what cannot run here."""
    from volvlp_ray.config import grad_checkpointing_mode
    from volvlp_ray.models import TEXT_PRESETS, VIT3D_PRESETS

    if preset not in VIT3D_PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {list(VIT3D_PRESETS)}")
    case = CASES[preset]
    size, depth = size or case["size"], depth or case["depth"]
    patch = tuple(int(p) for p in (patch or case["patch"]))
    batch_size, text_model = batch_size or case["batch_size"], text_model or case["text_model"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not one of ['auto', 'cpu', 'cuda']")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda asked for, but this machine has no CUDA GPU (torch.cuda.is_available() is "
                         f"False; torch {torch.__version__}); run on a GPU machine or use --device cpu")
    if bf16 is None:
        bf16 = device == "cuda"
    if bf16 and device != "cuda":
        raise ValueError("bf16 needs a CUDA GPU (DeepSpeed trains in fp32 on CPU), and this run is on "
                         f"{'a machine without CUDA' if not torch.cuda.is_available() else 'the CPU'}; "
                         "drop --bf16 or run on a GPU")
    if bf16 and not torch.cuda.is_bf16_supported():
        raise ValueError("bf16 asked for, but this GPU does not support bf16")
    if len(patch) != 3 or size % patch[1] or size % patch[2] or depth % patch[0]:
        raise ValueError(f"volume {depth} x {size} x {size} (z, y, x) is not a multiple of the patch {patch}")
    if text_model.startswith("scratch-") and text_model not in TEXT_PRESETS:
        raise ValueError(f"text_model={text_model!r}: scratch towers are {list(TEXT_PRESETS)}")
    if text_length < 2 or text_length > 512:
        raise ValueError(f"text_length must lie in [2, 512], got {text_length}")
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={attention!r} is not one of {list(ATTENTION_BACKENDS)}")
    grad_checkpointing = grad_checkpointing_mode(grad_checkpointing, "grad_checkpointing")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, batch_size >= 1; got {steps}, {warmup}, {batch_size}")
    if threads is None and device == "cpu":
        threads = 1  # as a CPU training worker (scaling.cpus_per_worker = 1); more oversubscribe a shared host
    if peak_tflops is None and device == "cuda":
        peak_tflops = 989.0
    settings = dict(
        preset=preset, size=size, depth=depth, patch=patch, batch_size=batch_size, text_model=text_model,
        text_length=text_length, vocab_size=vocab_size, pool=pool, zero=zero, optimizer=optimizer, device=device,
        bf16=bf16, grad_checkpointing=grad_checkpointing, compile=compile, attention=attention, padded=padded,
        steps=steps, warmup=warmup, peak_tflops=peak_tflops, threads=threads, seed=seed,
    )
    return settings


def run(out: str | None = None, ray: bool = False, **options: Any) -> dict[str, Any]:
    """Run the benchmark; write JSON to ``out`` (if given) and return the same dict. ``options`` are
    ``build_settings``' keywords (an unknown one is a ``TypeError``).

    Args:
        preset: ViT3D preset; ``size`` (in-plane voxels), ``depth`` (slices), ``patch`` (z, y, x), ``batch_size``
            and ``text_model`` default to ``CASES[preset]``.
        text_length: tokens per text (all attended); vocab_size: tokenizer built from a small corpus.
        zero, optimizer: DeepSpeed ZeRO stage and adamw | muon. device: auto | cpu | cuda.
        bf16: None = bf16 on CUDA, fp32 on CPU; True on a machine without CUDA is an error.
        grad_checkpointing (none | selective | full; True / False = full / none), compile (``torch.compile`` of
            each vision block), attention (SDPA backend), padded (a key-padding mask in attention): the options
            that change the step's speed.
        steps / warmup: timed / untimed steps. peak_tflops: MFU denominator (default 989 on CUDA, none on CPU).
        threads: torch threads (default 1 on CPU, like a training worker; torch's default on GPU).
        ray: also run the step inside Ray Train with one worker and report the overhead.
    """
    settings = build_settings(**options)
    device, patch = settings["device"], settings["patch"]
    started = time.perf_counter()
    # with --ray the direct run gets a process of its own, as the Ray Train worker does: its GPU memory is
    # released before the worker starts, and both start from the same state
    direct = _measure_direct_in_child(settings) if ray else _measure_direct(settings)
    report: dict[str, Any] = {
        "benchmark": "model",
        "config": {**settings, "patch": list(patch)},
        "host": {
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads(),
        },
        "direct": direct,
    }
    if ray:
        with tempfile.TemporaryDirectory() as storage:
            via_ray = _measure_ray(settings, storage)
        report["ray_train"] = via_ray
        report["ray_overhead_pct"] = 100.0 * (1.0 - via_ray["samples_per_s"] / direct["samples_per_s"])
        # the same from median step times: less sensitive to a few slow steps on a shared host
        report["ray_overhead_pct_median"] = 100.0 * (
            via_ray["step_time_s"]["median"] / direct["step_time_s"]["median"] - 1.0)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["targets"] = {
        "mfu": ">= 0.45 of 989 TFLOP/s (one H100, ViT-B at 480 x 480 x 240, bf16, ZeRO-2)",
        "samples_per_s": ">= 15 (same case)",
        "ray_overhead_pct": "<= 3",
    }
    write_report(out, report)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``run``."""
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base", "large"], help="ViT3D preset")
    parser.add_argument("--size", type=int, default=None, help="in-plane voxels (H = W); default per preset")
    parser.add_argument("--depth", type=int, default=None, help="slices (D); default per preset")
    parser.add_argument("--patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    parser.add_argument("--batch-size", type=int, default=None, help="samples per step; default per preset")
    parser.add_argument("--text-model", default=None, help="scratch-tiny | scratch-small | scratch-base | HF path")
    parser.add_argument("--text-length", type=int, default=192, help="tokens per text")
    parser.add_argument("--pool", default="cls", choices=["cls", "mean", "attn"])
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 (default: on with CUDA, off on CPU; an error without CUDA)")
    parser.add_argument("--grad-checkpointing", nargs="?", const="full", default="none",
                        choices=["none", "selective", "full"],
                        help="activation checkpointing of the vision blocks (a bare flag = full)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each vision block")
    parser.add_argument("--attention", default="auto", choices=list(ATTENTION_BACKENDS), help="SDPA backend")
    parser.add_argument("--padded", action="store_true", help="pad half the batch: masked attention")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator in TFLOP/s (default 989 = H100 bf16 dense on CUDA; none on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads and the Ray worker's CPUs (default on CPU: 1, as a training worker)")
    parser.add_argument("--ray", action="store_true", help="also through Ray Train with one worker (needs Ray)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run with parsed arguments; print the headline figures."""
    options = {k: v for k, v in vars(args).items() if k != "suite"}
    try:
        report = run(**options)
    except ValueError as exc:
        print(f"benchmark model: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    d = report["direct"]
    line = {k: d[k] for k in ("samples_per_s", "vision_tokens_per_s", "peak_memory_gib", "achieved_tflops", "mfu")}
    if "ray_train" in report:
        line.update(ray_samples_per_s=report["ray_train"]["samples_per_s"], ray_overhead_pct=report["ray_overhead_pct"])
    print(json.dumps(line, indent=2))
    return report


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    main(_parser.parse_args())
