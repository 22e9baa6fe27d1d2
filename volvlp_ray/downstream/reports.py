"""Report generation from the pre-trained ViT3D (SCALE-VLP's third downstream task).

    python jobs/report_generation.py --checkpoint latest [key=value ...]

Model (:class:`ReportGenerator`): the pre-trained ViT3D's patch tokens (frozen, or fine-tuned with
``report.encoder=tuned``) are pooled to ``report.visual_tokens`` vectors by :class:`VisualPrefix` (learned queries
attending to the tokens once, or a small perceiver), projected to the decoder's embedding size and put in front of
the report's token embeddings as a prefix. The decoder is a Hugging Face ``AutoModelForCausalLM``: a randomly
initialised GPT-2 for ``report.decoder=scratch-*`` (its WordPiece tokenizer built from the training reports,
``models/text.build_tokenizer``), or any causal LM by folder or hub id with its own tokenizer; trained fully, through
LoRA adapters (``peft``) or frozen (``report.decoder_tuning``). The loss is the decoder's next-token cross-entropy
over the report's tokens (the prefix and padding carry no loss). Generation is the decoder's own ``generate`` from
the prefix and the start token: greedy and / or beam search, at most ``report.max_length`` tokens.

Training (:func:`train_loop_per_worker`): a Ray Train job of ``scaling.num_workers`` workers under DeepSpeed (ZeRO
``report.zero_stage``, AdamW, linear warm-up then cosine decay; gloo on CPU, NCCL on GPUs), fed by Ray Data from the
training split's shards (volume and report text only), a DeepSpeed checkpoint every ``report.checkpoint_every``
steps and at the end (a killed worker resumes from the last one: weights, optimizer, schedule, RNG; the data stream
restarts reshuffled at the resumed step, so a few volumes of the interrupted pass may be seen twice). After
training every rank generates the reports of its share of the held-out volumes and embeds them with the pre-trained
model (the retrieval baseline: the training report whose pre-trained text embedding is nearest to the volume's);
rank 0 gathers everything and reports the final checkpoint: ``generations.jsonl`` (per held-out volume: key,
reference, each decoding's report, the baselines' reports), the trained generator (``generator/``) and
``train_log.json``. Scoring is ``eval/report_metrics.py``, in the job's driver.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DECODER_PRESETS", "ReportGenerator", "VisualPrefix", "build_decoder", "decoder_tokenizer", "encode_reports",
    "most_frequent", "train_loop_per_worker",
]

DECODER_PRESETS: dict[str, dict[str, int]] = {
    "scratch-tiny": dict(n_embd=128, n_layer=2, n_head=4),
    "scratch-small": dict(n_embd=256, n_layer=4, n_head=4),
}
"""``GPT2Config`` sizes of the randomly initialised decoders (``report.decoder``)."""

CKPT_TAG = "report"
GENERATIONS = "generations.jsonl"
GENERATOR_DIR = "generator"


# ------------------------------------------------------------------------------------------------------------------
# tokenizer and decoder


def decoder_tokenizer(decoder: str, corpus: list[str] | None = None, vocab_size: int = 1000):
    """The decoder's tokenizer, with ``bos_token``, ``eos_token`` and ``pad_token`` set.

    Scratch decoders: the project's WordPiece tokenizer built from ``corpus`` (the training reports;
    deterministic), [CLS] as the start and [SEP] as the end token. Else ``AutoTokenizer.from_pretrained(decoder)``;
    a model without a start token starts from its end token, one without padding pads with it."""
    if decoder.startswith("scratch-"):
        from volvlp_ray.models.text import build_tokenizer

        if corpus is None:
            raise ValueError(f"report.decoder={decoder!r} builds its tokenizer from the training reports; pass corpus=")
        tok = build_tokenizer(corpus, vocab_size)
        tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
        return tok
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(decoder)
    if tok.eos_token is None:
        raise ValueError(f"report.decoder={decoder!r}: its tokenizer has no end-of-text token")
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_to_spec(tok) -> dict[str, Any]:
    """What a worker needs to rebuild a scratch tokenizer without the corpus (a JSON-able dict)."""
    return {"json": tok.backend_tokenizer.to_str(), "special": {k: getattr(tok, k) for k in
                                                                ("bos_token", "eos_token", "pad_token", "unk_token",
                                                                 "cls_token", "sep_token", "mask_token")}}


def tokenizer_from_spec(spec: dict[str, Any]):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from volvlp_ray.models.text import MAX_POSITIONS

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spec["json"]), model_max_length=MAX_POSITIONS,
                                   model_input_names=["input_ids", "attention_mask"], **spec["special"])


def build_decoder(decoder: str, tokenizer, n_positions: int, seed: int = 0):
    """The causal LM: a scratch GPT-2 sized by ``DECODER_PRESETS`` (seeded: the same weights on every rank) with
    room for ``n_positions`` positions, or ``AutoModelForCausalLM.from_pretrained(decoder)``."""
    if decoder.startswith("scratch-"):
        from transformers import GPT2Config, GPT2LMHeadModel

        if decoder not in DECODER_PRESETS:
            raise ValueError(f"report.decoder={decoder!r}: scratch decoders are {list(DECODER_PRESETS)}")
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, **DECODER_PRESETS[decoder])
        return GPT2LMHeadModel(cfg)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(decoder)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


# ------------------------------------------------------------------------------------------------------------------
# model


class _CrossBlock(nn.Module):
    """Latents attend to the patch tokens (pre-norm), optionally then to themselves, then an MLP."""

    def __init__(self, dim: int, heads: int, self_attention: bool) -> None:
        super().__init__()
        self.q_norm, self.kv_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(dim) if self_attention else None
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True) if self_attention else None
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        kv = self.kv_norm(tokens)
        latents = latents + self.cross(self.q_norm(latents), kv, kv, key_padding_mask=pad, need_weights=False)[0]
        if self.self_attn is not None:
            h = self.self_norm(latents)
            latents = latents + self.self_attn(h, h, h, need_weights=False)[0]
        return latents + self.mlp(self.mlp_norm(latents))


class VisualPrefix(nn.Module):
    """Patch tokens (B, L, dim) with a validity mask -> ``n_tokens`` prefix vectors (B, n_tokens, out_dim).

    "attention": learned queries attend to the tokens once (attention pooling); "perceiver": ``layers`` blocks of
    cross-attention, self-attention over the latents and an MLP. Padding tokens (slices past a volume's depth) are
    never attended to."""

    def __init__(self, dim: int, out_dim: int, n_tokens: int, kind: str = "attention", layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        if kind not in ("attention", "perceiver"):
            raise ValueError(f"pooler must be 'attention' or 'perceiver', got {kind!r}")
        heads = heads if dim % heads == 0 else 1
        self.queries = nn.Parameter(torch.randn(n_tokens, dim) * dim**-0.5)
        n = 1 if kind == "attention" else layers
        self.blocks = nn.ModuleList(_CrossBlock(dim, heads, self_attention=kind == "perceiver") for _ in range(n))
        self.out_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        pad = None if valid is None else ~valid
        latents = self.queries.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for blk in self.blocks:
            latents = blk(latents, tokens, pad)
        return self.proj(self.out_norm(latents))


class ReportGenerator(nn.Module):
    """ViT3D -> :class:`VisualPrefix` -> causal LM. ``forward`` gives the mean next-token loss of a batch of
    reports; :meth:`generate` writes reports."""

    def __init__(self, vit: nn.Module, decoder: nn.Module, tokenizer, n_visual: int = 16, pooler: str = "attention",
                 perceiver_layers: int = 2, tune_encoder: bool = False, image_head: nn.Module | None = None,
                 embed_dim: int = 0) -> None:
        super().__init__()
        self.vit, self.decoder, self.tune_encoder = vit, decoder, tune_encoder
        hidden = decoder.get_input_embeddings().weight.shape[1]
        self.prefix = VisualPrefix(vit.dim, hidden, n_visual, pooler, perceiver_layers, getattr(vit, "heads", 4))
        # the pre-trained image embedding (the encoder's pooled features through its contrastive projection: what
        # retrieval and zero-shot use) as one more visual token, in front of the pooled ones
        self.image_head = image_head
        self.global_proj = nn.Linear(embed_dim, hidden) if image_head is not None else None
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        if not tune_encoder:
            for module in (self.vit, self.image_head):
                for p in module.parameters() if module is not None else ():
                    p.requires_grad_(False)

    @property
    def n_prefix(self) -> int:
        return self.prefix.queries.shape[0] + (self.image_head is not None)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.tune_encoder:
            self.vit.eval()
        if self.image_head is not None:  # its batch norm keeps the pre-training statistics, tuned or not
            self.image_head.eval()
        return self

    def visual_prefix(self, volume: torch.Tensor, depths: torch.Tensor | None) -> torch.Tensor:
        """(B, 1, D, H, W) air-padded volumes and their depths -> (B, n_prefix, hidden)."""
        with nullcontext() if self.tune_encoder and self.training else torch.no_grad():
            tokens, valid = self.vit.forward_tokens(volume, depths)
            glob = None
            if self.image_head is not None:
                glob = F.normalize(self.image_head(self.vit.pool_tokens(tokens, valid)), dim=-1)
        prefix = self.prefix(tokens, valid)
        if glob is None:
            return prefix
        return torch.cat([self.global_proj(glob.to(prefix.dtype)).unsqueeze(1), prefix], dim=1)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(ids)

    def forward(self, volume: torch.Tensor, depths: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids`` (B, T): [start] report [end] padding; -> the mean cross-entropy of every report token and
        the end token, each predicted from the prefix and the tokens before it."""
        prefix = self.visual_prefix(volume, depths)
        b, p = prefix.shape[:2]
        x = torch.cat([prefix, self._embed(input_ids).to(prefix.dtype)], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
        targets = input_ids.masked_fill(attention_mask == 0, -100)
        targets[:, 0] = -100  # the start token is given, not predicted
        labels = torch.cat([targets.new_full((b, p), -100), targets], dim=1)
        return self.decoder(inputs_embeds=x, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def generate(self, volume: torch.Tensor, depths: torch.Tensor | None, max_new_tokens: int,
                 num_beams: int = 1) -> list[list[int]]:
        """Token ids of a report per volume (without the start and end tokens): greedy (``num_beams=1``) or beam
        search, by the decoder's own ``generate``."""
        prefix = self.visual_prefix(volume, depths)
        b = prefix.shape[0]
        start = self._embed(torch.full((b, 1), self.bos_id, dtype=torch.long, device=prefix.device))
        x = torch.cat([prefix, start.to(prefix.dtype)], dim=1)
        out = self.decoder.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long,
                                                                               device=x.device),
                                    max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                    bos_token_id=self.bos_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        ids = []
        for row in out.tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            ids.append([t for t in row if t != self.pad_id])
        return ids


def encode_reports(tokenizer, reports: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[start] report [end], cut to ``max_length`` tokens, right-padded -> input_ids, attention_mask (B, T)."""
    body = tokenizer(list(reports), add_special_tokens=False, truncation=False)["input_ids"]
    rows = [[tokenizer.bos_token_id, *ids[: max_length - 2], tokenizer.eos_token_id] for ids in body]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def pad_volumes(volumes: list[np.ndarray], patch_z: int, hu_window) -> tuple[torch.Tensor, torch.Tensor]:
    """int16 HU volumes (D_i, H, W) -> (B, 1, D, H, W) float32 in [-1, 1], air-padded at the end of z to a multiple
    of ``patch_z``, and the true depths (B,)."""
    from volvlp_ray.data.transforms import normalise

    depths = [int(v.shape[0]) for v in volumes]
    d = -(-max(depths) // patch_z) * patch_z
    out = np.full((len(volumes), 1, d, *volumes[0].shape[1:]), -1.0, dtype=np.float32)
    for i, v in enumerate(volumes):
        out[i, 0, : v.shape[0]] = normalise(np.asarray(v), hu_window)
    return torch.from_numpy(out), torch.tensor(depths)


def most_frequent(reports: list[str]) -> str:
    """The most frequent report (ties: the first in sorted order)."""
    counts = Counter(reports)
    top = max(counts.values())
    return min(r for r, n in counts.items() if n == top)


# ------------------------------------------------------------------------------------------------------------------
# data


class _Rows:
    """Ray Data flat_map: a raw shard sample -> {volume int16 (D, H, W), report} (bad samples dropped, counted by the
    readers' own checks)."""

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        from volvlp_ray.data.shards import DecodeError, decode_sample

        try:
            s = decode_sample(row)
        except DecodeError:
            return []
        return [{"volume": np.array(s["volume"]), "report": s["report"]}]


def train_dataset(cfg):
    """Ray Dataset of the training split's (volume, report) rows (read as pre-training reads its shards)."""
    from volvlp_ray.data.pipeline import read_samples, shard_files

    return read_samples(cfg, shard_files(cfg, "train"), shuffle="files").flat_map(_Rows())


def held_out_batches(cfg, n: int, rank: int = 0, world: int = 1, batch_size: int = 8):
    """This rank's share of the first ``n`` (0 = all) decodable held-out samples in shard order (sample ``i`` is
    rank ``i % world``'s), streamed in batches of ``batch_size``: lists of {index, key, volume (int16), report}.
    Volumes are read by reference, and only this rank's: no rank holds the split, or reads others' voxels."""
    from volvlp_ray.data.pipeline import shard_files
    from volvlp_ray.data.reader import iter_samples, open_shard, read_volumes
    from volvlp_ray.data.shards import CORE_MEMBERS, LABELMAP_MEMBER, DecodeError, decode_sample

    i, batch = 0, []
    for location in shard_files(cfg, "valid"):
        with open_shard(location) as stream:
            for raw in iter_samples(stream, location, suffixes=list(CORE_MEMBERS),
                                    refs=("volume.npy", LABELMAP_MEMBER)):  # label maps skipped unread
                if n and i >= n:
                    break
                try:
                    s = decode_sample(raw, location)
                except (DecodeError, ValueError):
                    continue
                if i % world == rank:
                    ref = s["volume"]
                    vol = np.empty((1, *ref.shape), dtype=np.int16)
                    read_volumes([ref], vol)
                    batch.append({"index": i, "key": s["key"], "volume": vol[0], "report": s["report"]})
                    if len(batch) == batch_size:
                        yield batch
                        batch = []
                i += 1
        if n and i >= n:
            break
    if batch:
        yield batch


def held_out(cfg, n: int) -> list[dict[str, Any]]:
    """The first ``n`` (0 = all) decodable held-out samples in shard order: index, key, int16 volume, report."""
    return [c for b in held_out_batches(cfg, n) for c in b]


# ------------------------------------------------------------------------------------------------------------------
# the Ray Train worker


def _deepspeed_config(cfg, use_gpu: bool) -> dict[str, Any]:
    """The pre-training DeepSpeed config (``train/deepspeed.py``) with the report job's schedule and batch."""
    from dataclasses import replace

    from volvlp_ray.train.deepspeed import deepspeed_config

    r = cfg.report
    t = replace(cfg.train, steps=r.steps, batch_size=r.batch_size, lr=r.lr, warmup_steps=r.warmup_steps,
                weight_decay=r.weight_decay, zero_stage=r.zero_stage, optimizer="adamw", min_lr_ratio=0.05)
    return deepspeed_config(replace(cfg, train=t), use_gpu)


def _param_groups(model: ReportGenerator, cfg) -> list[dict[str, Any]]:
    """Trainable parameters: the pooler, projection and decoder at ``report.lr`` (matrices decayed), a tuned
    encoder at ``report.encoder_lr``."""
    r = cfg.report
    decay, no_decay, enc = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("vit.", "image_head.")):
            enc.append(p)
        elif p.ndim >= 2 and "wte" not in name and "wpe" not in name and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": r.weight_decay, "lr": r.lr, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "lr": r.lr, "name": "no_decay"}]
    if enc:
        groups.append({"params": enc, "weight_decay": r.weight_decay, "lr": r.encoder_lr, "name": "encoder"})
    return [g for g in groups if g["params"]]


def build_generator(cfg, export_dir: str, tokenizer) -> ReportGenerator:
    """The generator of ``cfg.report`` on the exported pre-trained ViT3D (the same weights on every rank)."""
    from volvlp_ray.models import VLP

    r = cfg.report
    vlp = VLP.from_pretrained(export_dir)
    vit = vlp.vision
    decoder = build_decoder(r.decoder, tokenizer, r.visual_tokens + r.max_length + 2, seed=cfg.seed)
    if r.decoder_tuning == "lora":
        from peft import LoraConfig, get_peft_model

        targets: Any = r.lora_targets if r.lora_targets == "all-linear" else [
            t.strip() for t in r.lora_targets.split(",") if t.strip()]
        decoder = get_peft_model(decoder, LoraConfig(r=r.lora_r, lora_alpha=r.lora_alpha, target_modules=targets,
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
    elif r.decoder_tuning == "frozen":
        for p in decoder.parameters():
            p.requires_grad_(False)
    torch.manual_seed(cfg.seed + 1)
    head = nn.Sequential(vlp.vision_proj, vlp.vision_norm) if r.global_token else None
    return ReportGenerator(vit, decoder, tokenizer, r.visual_tokens, r.pooler, r.perceiver_layers,
                           tune_encoder=r.encoder == "tuned", image_head=head, embed_dim=vlp.embed_dim)


def _batches(shard, batch_size: int, seed: int, rank: int, start_step: int, shuffle_buffer: int):
    """Endless (volumes, reports) batches of this worker's shard; each pass reshuffled (seeded by the pass and the
    step it starts at, so a resumed run does not replay the interrupted pass's order)."""
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                    local_shuffle_buffer_size=shuffle_buffer or None,
                                    local_shuffle_seed=seed * 1_000_003 + rank * 1009 + start_step * 7 + epoch):
            n += 1
            yield list(b["volume"]), [str(t) for t in b["report"]]
        if n == 0:
            raise ValueError(f"worker {rank}: a pass over its share of the training split gave no full batch of "
                             f"report.batch_size={batch_size} volumes: lower report.batch_size or use fewer workers")
        epoch += 1


def _save(engine, rank: int, step: int, tmp: str) -> None:
    from volvlp_ray.train.checkpoint import save_worker_state

    engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"step": step})
    save_worker_state(tmp, rank, step=step, epoch=0, batch_in_epoch=0)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from volvlp_ray import console
    from volvlp_ray.config import config_from_dict
    from volvlp_ray.train.checkpoint import load_worker_state, use_safe_loading

    if config.get("console") is not None:
        console.attach(config["console"])
    cfg = config_from_dict(config["config"])
    r = cfg.report
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if use_gpu else torch.device("cpu")
    tokenizer = tokenizer_from_spec(config["tokenizer"]) if config.get("tokenizer") else decoder_tokenizer(r.decoder)

    model = build_generator(cfg, config["export_dir"], tokenizer)
    ds_cfg = _deepspeed_config(cfg, use_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_param_groups(model, cfg), config=ds_cfg,
                                           dist_init_required=False)
    use_safe_loading(engine)
    dtype = torch.bfloat16 if ds_cfg["bf16"]["enabled"] else torch.float32
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step, log = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_path, state = engine.load_checkpoint(d, tag=CKPT_TAG)
            if load_path is None:
                raise RuntimeError(f"checkpoint {checkpoint.path} has no report-generator state under tag {CKPT_TAG!r}")
            load_worker_state(d, rank)
            if os.path.isfile(os.path.join(d, "train_log.json")):
                log = json.load(open(os.path.join(d, "train_log.json")))
        step = int(state["step"])
        log = [e for e in log if e["step"] <= step]
        if rank == 0:
            console.info(f"[report] resumed from step {step} from {checkpoint.path}")
    elif rank == 0:
        glob = " and the image embedding" if r.global_token else ""
        console.info(f"[report] {world} workers, {r.steps} steps of {r.batch_size} volumes each, "
                     f"{n_train / 1e6:.2f} M trainable parameters (decoder {r.decoder}, {r.decoder_tuning}; encoder "
                     f"{r.encoder}; {r.visual_tokens} visual tokens by {r.pooler} pooling{glob}), ZeRO {r.zero_stage}")

    patch_z = int(model.vit.patch[0])
    stream = _batches(ray.train.get_dataset_shard("train"), r.batch_size, cfg.seed, rank, step,
                      cfg.data.shuffle_buffer)
    engine.train()
    t0, recent = time.time(), []
    every = max(1, r.steps // 20)
    while step < r.steps:
        volumes, reports = next(stream)
        x, depths = pad_volumes(volumes, patch_z, cfg.data.hu_window)
        ids, mask = encode_reports(tokenizer, reports, r.max_length)
        loss = engine(x.to(device, dtype), depths.to(device), ids.to(device), mask.to(device))
        engine.backward(loss)
        engine.step()
        step += 1
        recent.append(float(loss.detach()))
        if step % every == 0 or step == r.steps:
            mean = float(np.mean(recent))
            log.append({"step": step, "loss": mean, "lr": float(engine.get_lr()[0])})
            recent = []
            if rank == 0:
                line = f"[report] step {step}/{r.steps} loss {mean:.4f} ({time.time() - t0:.0f}s)"
                if console.is_verbose():  # printed here: Ray forwards it with this worker's pid
                    print(line, flush=True)
                else:
                    console.info(line)
        if step % r.checkpoint_every == 0 or step == r.steps:
            with tempfile.TemporaryDirectory(prefix="volvlp-report-") as tmp:
                _save(engine, rank, step, tmp)
                if rank == 0:
                    with open(os.path.join(tmp, "train_log.json"), "w") as f:
                        json.dump(log, f)
                ray.train.report({"step": step, "loss": log[-1]["loss"] if log else float("nan")},
                                 checkpoint=Checkpoint.from_directory(tmp))
    train_seconds = time.time() - t0

    # ---- generation and the retrieval baseline: every rank its share of the held-out volumes, streamed ---------
    from volvlp_ray.models import VLP

    engine.eval()
    gen: ReportGenerator = engine.module
    beams = {"greedy": 1, "beam": r.num_beams}
    bs = max(1, min(cfg.eval.batch_size, 16))
    vlp = None
    train_reports: list[str] = []
    if r.baselines:
        from volvlp_ray.eval.embed import encode_volumes

        train_reports = ray.get(config["train_reports"]) if config.get("train_reports") is not None else []
        vlp = VLP.from_pretrained(config["export_dir"]).to(device)
    rows: dict[int, dict[str, Any]] = {}
    feats: list[torch.Tensor] = []
    t1, last = time.time(), time.time()
    for batch in held_out_batches(cfg, r.eval_volumes, rank, world, bs):
        x, depths = pad_volumes([c["volume"] for c in batch], patch_z, cfg.data.hu_window)
        x, depths = x.to(device, dtype), depths.to(device)
        for c in batch:
            rows[c["index"]] = {"key": c["key"], "reference": c["report"]}
        for name in r.decoding:
            for c, ids in zip(batch, gen.generate(x, depths, r.max_length - 1, beams[name])):
                rows[c["index"]][name] = tokenizer.decode(ids, skip_special_tokens=True,
                                                          clean_up_tokenization_spaces=True)
        if vlp is not None:
            feats.append(encode_volumes(vlp, x.float(), depths, cfg.eval.volume_mode, cfg.eval.chunk_depth,
                                        cfg.eval.chunk_stride, cfg.eval.chunk_pool,
                                        max_chunks_per_pass=cfg.eval.batch_size).float().cpu())
        if rank == 0 and time.time() - last > 30:
            last = time.time()
            console.info(f"[report] generating: {len(rows)} held-out volumes on this worker so far "
                         f"({time.time() - t1:.0f}s)")
    vlp_emb = None
    if vlp is not None:
        vol_emb = torch.cat(feats) if feats else torch.zeros(0, vlp.embed_dim)
        # each rank embeds a share of the training reports; rank 0 gets all of them
        share = list(range(rank, len(train_reports), world))
        txt = [vlp.embed_reports([train_reports[i] for i in share[k : k + 64]]).float().cpu()
               for k in range(0, len(share), 64)]
        txt_emb = torch.cat(txt) if txt else torch.zeros(0, vlp.embed_dim)
        vlp_emb = (vol_emb, share, txt_emb)
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, (rows, vlp_emb))
    else:
        gathered = [(rows, vlp_emb)]
    gen_seconds = time.time() - t1
    n_eval = sum(len(g[0]) for g in gathered)
    if rank == 0:
        console.info(f"[report] {' and '.join(r.decoding)} decoding of {n_eval} held-out volumes on {world} workers"
                     f"{' and their retrieval baseline' if vlp is not None else ''} ({gen_seconds:.0f}s)")

    metrics: dict[str, float] = {"step": step}
    with tempfile.TemporaryDirectory(prefix="volvlp-report-") as tmp:
        if rank == 0:
            all_rows: dict[int, dict[str, Any]] = {}
            for rws, _ in gathered:
                all_rows.update(rws)
            if r.baselines and train_reports:
                text = torch.zeros(len(train_reports), gathered[0][1][2].shape[1])
                for _, (_, share, t) in gathered:
                    if len(share):
                        text[share] = t
                top = most_frequent(train_reports)
                for (rws, (vol, _, _)) in gathered:
                    nearest = (F.normalize(vol, dim=-1) @ F.normalize(text, dim=-1).T).argmax(1).tolist() \
                        if len(vol) else []
                    for i, n in zip(sorted(rws), nearest):
                        all_rows[i]["most_frequent"] = top
                        all_rows[i]["retrieval"] = train_reports[n]
            with open(os.path.join(tmp, GENERATIONS), "w") as f:
                for i in sorted(all_rows):
                    f.write(json.dumps(all_rows[i]) + "\n")
            with open(os.path.join(tmp, "train_log.json"), "w") as f:
                json.dump(log, f)
            with open(os.path.join(tmp, "run.json"), "w") as f:
                json.dump({"steps": step, "train_seconds": train_seconds, "generate_seconds": gen_seconds,
                           "trainable_parameters": n_train, "world_size": world,
                           "global_batch": r.batch_size * world, "n_eval": n_eval}, f)
            save_generator(gen, tokenizer, cfg, os.path.join(tmp, GENERATOR_DIR))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)


def save_generator(gen: ReportGenerator, tokenizer, cfg, path: str) -> None:
    """The trained generator: ``model.safetensors`` (every weight, LoRA adapters included), ``report_config.json``
    (the ``report`` settings and the model it was trained on) and the decoder's tokenizer."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    # a tied weight (GPT-2's input embedding is its output layer) is stored once, its other names in the metadata
    state, seen, tied = {}, {}, {}
    for k, v in gen.state_dict().items():
        ident = (v.data_ptr(), tuple(v.shape), v.dtype)
        if ident in seen:
            tied[k] = seen[ident]
            continue
        seen[ident] = k
        state[k] = v.detach().to("cpu").clone().contiguous()
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"tied": json.dumps(tied)})
    tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, "report_config.json"), "w") as f:
        json.dump({"report": asdict(cfg.report), "model": asdict(cfg.model), "seed": cfg.seed}, f, indent=1)


def load_generator(path: str, export_dir: str) -> tuple[ReportGenerator, Any]:
    """A generator written by :func:`save_generator`, on the pre-trained export it was trained from; eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from volvlp_ray.config import config_from_dict

    spec = json.load(open(os.path.join(path, "report_config.json")))
    cfg = config_from_dict({"report": spec["report"], "model": spec["model"], "seed": spec["seed"]})
    tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    if cfg.report.decoder.startswith("scratch-"):
        tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    gen = build_generator(cfg, export_dir, tok)
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, "pt") as f:
        tied = json.loads((f.metadata() or {}).get("tied", "{}"))
    state = load_file(file)
    state.update({k: state[src] for k, src in tied.items()})
    gen.load_state_dict(state, strict=True)
    return gen.eval(), tok
