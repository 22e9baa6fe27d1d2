"""Paths of the real training loop that no other test runs through, each driven through ``jobs/pretrain.py`` (real
local Ray, Ray Train with 2 CPU workers, DeepSpeed on gloo, MLflow on SQLite) on a copy of the tiny workspace.

Three runs of 3 steps cover them all (A and B run the job in the test process on the session's Ray, conftest's
``pretrain_job``; C runs the script, whose own local Ray has the S3 keys in every process):

- **A**: ``loss.kind=clip``, ``data.text_mode=organ`` (chunks of 8-16 slices, 2 of each volume in its step:
  ``data.chunks_per_volume=2``, so same-study pairs meet in the loss, left out of it: ``loss.same_study=ignore``;
  "soft" would not show here: the two chunks of a tiny volume mostly cover the same organs, and with one text for
  both CLIP's soft targets give the hard loss's value exactly),
  ``train.optimizer=muon`` with ZeRO-1;
- **B**: ``loss.kind=swca loss.form=softmax`` with the intra-modal term, Muon with ZeRO-3 (and its consolidated
  export), the text tower a small Hugging Face ``BertModel`` with its own tokenizer loaded from a local folder that
  the test saves; the run's MLflow pyfunc model is then called with a NIfTI column;
- **C**: ``loss.kind=sigmoid loss.ring=true`` with ``train.storage_path`` on an S3 endpoint (moto's server).

Every run writes the step trace (``VOLVLP_STEP_TRACE``, ``VOLVLP_STEP_TRACE_BATCHES``: the loss module, and the
tensors each rank's steps consumed). The loss-kind checks recompute step 1 in this process: the initial model
built as the loop builds it (same seed, same tokenizer), the same two per-rank batches, the named loss over the
global batch (the mean of the per-rank losses, which is what the loop logs); the value must equal the logged
``train/loss`` at step 1 and differ from every other loss kind's on the same features.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
BUCKET = "volvlp-loop-paths"
STEPS = 3
COMMON = [f"train.steps={STEPS}", "train.batch_size=2", "train.log_every=1", f"train.checkpoint_every={STEPS}",
          "train.warmup_steps=1", "eval.at_end=false", "loss.negation_pairs=0"]
CHUNK = (8, 16)  # organ chunks (slices); the tiny workspace's training volumes have 26-40 slices
K = 2  # run A: chunks of each volume in a step (data.chunks_per_volume; train.batch_size=4: two volumes per rank)


def trace_env(ws: Path, name: str) -> dict[str, str]:
    """The step trace of run ``name`` (``VOLVLP_STEP_TRACE``, ``VOLVLP_STEP_TRACE_BATCHES``), in ``ws``."""
    return {"VOLVLP_STEP_TRACE": str(ws / f"trace-{name}"), "VOLVLP_STEP_TRACE_BATCHES": str(STEPS)}


def run_job(ws: Path, name: str, *overrides: str, env: dict | None = None) -> str:
    """``jobs/pretrain.py`` on configs/tiny.yaml in ``ws`` with the step trace on; returns its output."""
    cmd = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"workspace={ws}", f"run_name={name}", *COMMON, *overrides]
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **trace_env(ws, name), **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=e, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-8000:]
    assert "[data] shards ready" in out and "[prepare]" not in out, out[-3000:]
    return out


def run_in_process(pretrain_job, ws: Path, name: str, *overrides: str) -> str:
    """:func:`run_job` in the test process on the session's Ray (conftest's ``pretrain_job``)."""
    out = pretrain_job(f"workspace={ws}", f"run_name={name}", *COMMON, *overrides,
                       env=trace_env(ws, name)).ok().output
    assert "[data] shards ready" in out and "[prepare]" not in out, out[-3000:]
    return out


# --------------------------------------------------------------------------------------------------------
# what the test reads back


def last_checkpoint(ws: Path, name: str) -> Path:
    ckpts = sorted(p for p in (ws / "ray_results" / name).glob("checkpoint_*") if p.is_dir())
    assert ckpts, f"run {name} left no checkpoint"
    return ckpts[-1]


def mlflow_run(ws: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("volvlp_ray")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`volvlp.run_name` = '{name}'")
    return client, run


def logged_losses(ws: Path, name: str) -> list[tuple[int, float]]:
    client, run = mlflow_run(ws, name)
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]


def trace(ws: Path, name: str) -> list[list[dict]]:
    """Per step, both ranks' trace records."""
    per_rank = [[json.loads(line) for line in open(ws / f"trace-{name}" / f"rank_{r}.jsonl")] for r in range(2)]
    assert [len(p) for p in per_rank] == [STEPS, STEPS]
    return [list(s) for s in zip(*per_rank)]


def batch(ws: Path, name: str, rank: int, step: int) -> dict[str, torch.Tensor]:
    return torch.load(ws / f"trace-{name}" / f"batch_rank{rank}_step{step}.pt", weights_only=True)


def read_samples(ws: Path, split: str) -> dict[str, dict]:
    """Every sample of a split's shards: {key: {volume, report, meta}} (the training pipeline's preprocessing)."""
    from volvlp_ray.data.shards import decode_sample

    out = {}
    for tar in sorted((ws / "shards" / split).glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
        for key in {n.split(".", 1)[0] for n in members}:
            row = {"__key__": key, **{n.split(".", 1)[1]: b for n, b in members.items() if n.split(".", 1)[0] == key}}
            out[key] = decode_sample(row)
    assert out, split
    return out


def run_config(ws: Path, name: str):
    """The run's resolved config (the ``config.yaml`` saved with its checkpoint, copied to ``ws`` by the run's
    fixture) and the tokenizer its workers loaded."""
    from transformers import AutoTokenizer

    from volvlp_ray.config import load_config
    from volvlp_ray.train.trainer import ensure_tokenizer

    cfg = load_config(str(ws / f"config-{name}.yaml"))
    assert cfg.run_name == name
    return cfg, AutoTokenizer.from_pretrained(ensure_tokenizer(cfg))  # the folder exists: nothing is built


def initial_model(cfg, tokenizer):
    """The model every rank starts from: the loop seeds, then builds (train mode: batch-normalised projections
    use the batch's statistics, as in the step)."""
    from volvlp_ray.models import build_model
    from volvlp_ray.train.loop import _seed_everything

    _seed_everything(cfg.seed)
    return build_model(cfg.model, tokenizer).train()


def step1_losses(ws: Path, name: str) -> tuple[float, dict[str, float], float]:
    """(the run's loss recomputed at step 1, every other loss kind's value on the same features, the logged
    step-1 loss)."""
    from dataclasses import replace

    from volvlp_ray.config import same_study_mode
    from volvlp_ray.data.pipeline import normalise_tensor
    from volvlp_ray.train.loop import build_loss_from_config

    cfg, tok = run_config(ws, name)
    model = initial_model(cfg, tok)
    outs, metas = [], []
    with torch.no_grad():
        for rank in range(2):  # each rank's forward on its own batch (batch statistics are per rank)
            t = batch(ws, name, rank, 1)
            outs.append(model(normalise_tensor(t["volume"], tuple(cfg.data.hu_window)), t.get("depths"),
                              t["input_ids"], t["attention_mask"]))
            metas.append(t)
        img = torch.cat([o["image_features"] for o in outs])
        txt = torch.cat([o["text_features"] for o in outs])
        meta = {k: torch.cat([m[k] for m in metas]) for k in ("labels", "study_id", "z_center_mm")}
        scale, bias = outs[0]["logit_scale"], outs[0]["logit_bias"]
        loss_fn = build_loss_from_config(cfg)
        ref = float(loss_fn(img, txt, scale, bias, **{k: meta[k] for k in loss_fn.meta_keys}))

        def kind(kind: str, form: str = "sigmoid", **loss) -> object:  # the run's loss settings, another kind
            return build_loss_from_config(replace(cfg, loss=replace(cfg.loss, kind=kind, form=form, **loss)))

        kinds = {"clip": kind("clip"), "sigmoid": kind("sigmoid"), "swca-softmax": kind("swca", "softmax"),
                 "swca-sigmoid": kind("swca", "sigmoid")}
        if same_study_mode(cfg) != "negative":  # the same kinds with the chunks of one study as plain negatives
            kinds.update({f"{k}-same-study-negative": kind(k, same_study="negative") for k in ("clip", "sigmoid")})
        if cfg.loss.intra_weight > 0:
            kinds[f"{cfg.loss.kind}-{cfg.loss.form}-without-intra"] = kind(cfg.loss.kind, cfg.loss.form,
                                                                           intra_weight=0.0)
        others = {k: float(f(img, txt, scale, bias, **{m: meta[m] for m in f.meta_keys})) for k, f in kinds.items()}
    logged = dict(logged_losses(ws, name))
    assert sorted(logged) == list(range(1, STEPS + 1)), logged
    return ref, others, logged[1]


def assert_step1_loss_is(ws: Path, name: str, kind: str) -> None:
    ref, others, logged = step1_losses(ws, name)
    assert logged == pytest.approx(ref, rel=1e-5, abs=1e-6), (kind, logged, ref, others)
    assert others[kind] == pytest.approx(ref, rel=1e-5, abs=1e-6), (kind, ref, others)
    wrong = {k: v for k, v in others.items() if k != kind and abs(v - logged) < 1e-2 * max(1.0, abs(logged))}
    assert not wrong, (f"step 1's logged loss {logged} cannot tell {kind} from {sorted(wrong)}", others)


def assert_muon_state(ckpt: Path, model, stage: int, world: int = 2) -> None:
    """The DeepSpeed checkpoint's optimizer state is DeepSpeed Muon's: a Muon group holding momentum (and no Adam
    moments) for exactly the parameters ``routes_to_muon`` names, an AdamW group holding both moments for all the
    others, on every rank; the momentum is not zero. ZeRO-1/2 keep, per rank, the momentum of every whole matrix the
    rank's flat partition touches (Muon orthogonalises whole matrices); ZeRO-3 partitions every parameter, and each
    rank's state covers its share (numel / world, rounded up) of each."""
    from volvlp_ray.train.deepspeed import routes_to_muon

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    muon = {n for n, p in named.items() if routes_to_muon(n, p)}
    expected = {"muon": muon, "adam": set(named) - muon}
    assert muon and expected["adam"]
    files = sorted(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))
    assert len(files) == world, [p.name for p in ckpt.iterdir()]
    seen: dict[str, set[str]] = {"muon": set(), "adam": set()}
    covered = {"muon": 0, "adam": 0}
    momentum_abs = 0.0
    for rank, f in enumerate(files):
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        assert int(sd["zero_stage"]) == stage, sd["zero_stage"]
        base = sd["optimizer_state_dict"] if stage == 3 else sd["base_optimizer_state"]
        groups = base["param_groups"]
        assert [g["use_muon"] for g in groups] == [True, False], [(g.get("name"), g.get("use_muon")) for g in groups]
        if stage == 3:  # the parameter names of each group, in the rank's model-state file
            shapes = torch.load(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", map_location="cpu",
                                weights_only=False)["param_shapes"]
        for gi, (g, kind) in enumerate(zip(groups, ("muon", "adam"))):
            (pid,) = g["params"]  # one flat partition per group on each rank
            state = base["state"][pid]
            if stage == 3:
                names = list(shapes[gi])
                partition = sd["fp32_flat_groups"][gi].numel()
                assert partition == sum(-(-named[n].numel() // world) for n in names), (f.name, kind)
                covered[kind] += sum(named[n].numel() for n in names) if rank == 0 else 0
                whole = partition
            else:
                names = list(sd["param_slice_mappings"][gi])
                covered[kind] += sum(frag.numel for frag in sd["param_slice_mappings"][gi].values())
                partition = sd["single_partition_of_fp32_groups"][gi].numel() + sd["group_paddings"][gi]
                whole = sum(named[n].numel() for n in names)
            seen[kind] |= set(names)
            if kind == "muon":
                assert set(state) == {"momentum_buffer"}, (f.name, sorted(state))
                assert state["momentum_buffer"].numel() == whole, f.name
                momentum_abs += float(state["momentum_buffer"].abs().sum())
            else:
                assert {"exp_avg", "exp_avg_sq"} <= set(state) and "momentum_buffer" not in state, sorted(state)
                assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == partition, f.name
    assert seen == expected, (sorted(seen["muon"] ^ muon), sorted(seen["adam"] ^ expected["adam"]))
    assert covered == {k: sum(named[n].numel() for n in v) for k, v in expected.items()}, covered
    assert momentum_abs > 0


# --------------------------------------------------------------------------------------------------------
# the runs


@pytest.fixture(scope="module")
def ws(tmp_path_factory, copy_tiny_workspace) -> Path:
    return copy_tiny_workspace(tmp_path_factory.mktemp("loop-paths"))


@pytest.fixture(scope="module")
def run_a(ws, pretrain_job) -> Path:
    run_in_process(pretrain_job, ws, "A", "loss.kind=clip", "data.text_mode=organ", f"train.batch_size={2 * K}",
                   f"data.chunks_per_volume={K}", "loss.same_study=ignore",
                   f"data.chunk_depth=[{CHUNK[0]},{CHUNK[1]}]", "train.optimizer=muon", "train.zero_stage=1")
    (ws / "config-A.yaml").write_text((last_checkpoint(ws, "A") / "config.yaml").read_text())
    return ws


def save_bert(folder: Path, corpus: list[str]):
    """A small ``BertModel`` (no dropout) and a WordPiece tokenizer of its own (alphabetical vocabulary: its ids
    differ from the corpus tokenizer's frequency order) saved the Hugging Face way."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from volvlp_ray.models.text import SPECIAL_TOKENS

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {w for text in corpus for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))}
    chars = {c for w in words for c in w}
    vocab = [*SPECIAL_TOKENS, *sorted(chars), *sorted("##" + c for c in chars), *sorted(words - chars)]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(1234)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, pad_token_id=0))
    bert.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return bert, tok


@pytest.fixture(scope="module")
def run_b(ws, pretrain_job):
    reports = [s["report"] for s in read_samples(ws, "train").values()]
    bert, tok = save_bert(ws / "hf-bert", reports)
    run_in_process(pretrain_job, ws, "B", "loss.kind=swca", "loss.form=softmax", "loss.alpha=0.5",
                   "loss.intra_weight=0.5", "train.optimizer=muon", "train.zero_stage=3",
                   f"model.text_model={ws / 'hf-bert'}")
    (ws / "config-B.yaml").write_text((last_checkpoint(ws, "B") / "config.yaml").read_text())
    return ws, bert, tok


@pytest.fixture(scope="module")
def moto_s3():
    """A moto S3 server on a free port of this machine, with an empty bucket; the credentials it accepts."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the S3 endpoint")
    boto3 = pytest.importorskip("boto3")
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_EC2_METADATA_DISABLED": "true"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"client": client, "query": f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1",
               "env": creds}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def run_c(ws, moto_s3):
    storage = f"s3://{BUCKET}/runs?{moto_s3['query']}"
    run_job(ws, "C", "loss.kind=sigmoid", "loss.ring=true", f"train.storage_path={storage}",
            env=moto_s3["env"])  # the script, with a local Ray of its own: every Ray process has the keys
    s3 = moto_s3["client"]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="runs/C/")
            for o in page.get("Contents", [])]
    configs = sorted(k for k in keys if k.endswith("/config.yaml") and k.split("/")[2].startswith("checkpoint_"))
    assert configs, keys
    (ws / "config-C.yaml").write_bytes(s3.get_object(Bucket=BUCKET, Key=configs[-1])["Body"].read())
    return ws, storage, keys


# --------------------------------------------------------------------------------------------------------
# run A: clip, organ-wise text, Muon under ZeRO-1


def test_clip_loss_is_what_the_loop_trains(run_a):
    ws = run_a
    assert {r["loss"] for s in trace(ws, "A") for r in s} == {"ClipLoss(same_study='ignore')"}
    assert_step1_loss_is(ws, "A", "clip")


def test_organ_mode_trains_chunks_with_their_organ_text(run_a):
    """Every trained row is a chunk of one training volume, z-length within data.chunk_depth (varying between
    steps, the same on both ranks), and its tokens are that chunk's organ-wise text; report mode (whole volumes of
    26-40 slices, the whole report) would fail both. With ``data.chunks_per_volume=2`` each rank's step holds each of
    its two volumes as two consecutive chunks: the same study, each chunk its own z-range (found in the volume) and
    its own text."""
    from volvlp_ray.data.organs import chunk_text
    from volvlp_ray.data.pipeline import study_id, tokenize

    ws = run_a
    cfg, tok = run_config(ws, "A")
    samples = read_samples(ws, "train")
    assert min(s["volume"].shape[0] for s in samples.values()) > CHUNK[1]
    depths = []
    organ_not_report = differs = 0
    for step, records in enumerate(trace(ws, "A"), 1):
        assert len({tuple(r["shape"]) for r in records}) == 1, records
        n = records[0]["shape"][2]
        assert CHUNK[0] <= n <= CHUNK[1] and n % cfg.model.patch[0] == 0, records
        depths.append(n)
        for rank in range(2):
            t = batch(ws, "A", rank, step)
            assert t["volume"].shape[2] == n and "depths" not in t  # unpadded: no mask
            assert t["volume"].shape[0] == 2 * K
            differs += sum(not torch.equal(t["volume"][i], t["volume"][i + 1]) for i in range(0, 2 * K, K))
            volumes = []
            for i in range(t["volume"].shape[0]):
                found = []
                for key, s in samples.items():
                    if study_id(key) != int(t["study_id"][i]):
                        continue
                    m = s["meta"]
                    sz, z0, zc = float(m["spacing"][0]), float(m.get("z_origin_mm", 0.0)), float(t["z_center_mm"][i])
                    start = round((zc - z0) / sz - n / 2 + 0.5)
                    if 0 <= start <= s["volume"].shape[0] - n and np.array_equal(s["volume"][start:start + n],
                                                                                 t["volume"][i, 0].numpy()):
                        text = chunk_text(m["organ_findings"], m["organs"], (zc - n / 2 * sz, zc + n / 2 * sz))
                        found.append((key, text, s["report"]))
                assert len(found) == 1, (step, rank, i, [k for k, _, _ in found])
                key, text, report = found[0]
                volumes.append(key)
                ids = t["input_ids"][i].numpy()
                assert np.array_equal(tokenize(tok, text, cfg.data.max_text_length)[0], ids), (key, text)
                organ_not_report += not np.array_equal(tokenize(tok, report, cfg.data.max_text_length)[0], ids)
            # two volumes per rank, each as K consecutive chunks
            assert volumes[::K] == volumes[1::K] and len(set(volumes)) == 2, volumes
    assert len(set(depths)) >= 2, depths
    assert organ_not_report >= STEPS * 2, organ_not_report  # most chunks' text is not their whole report
    assert differs >= 2 * STEPS, differs  # a volume's two chunks are two draws, not one chunk twice


def test_muon_state_under_zero1(run_a):
    ws = run_a
    cfg, tok = run_config(ws, "A")
    assert_muon_state(last_checkpoint(ws, "A") / "ckpt", initial_model(cfg, tok), stage=1)


# --------------------------------------------------------------------------------------------------------
# run B: SWCA softmax, Muon under ZeRO-3 and its export, a pretrained Hugging Face text tower


def test_swca_softmax_loss_is_what_the_loop_trains(run_b):
    ws, _, _ = run_b
    (loss,) = {r["loss"] for s in trace(ws, "B") for r in s}
    assert loss.startswith("SWCALoss(alpha=0.5, form='softmax'"), loss
    assert_step1_loss_is(ws, "B", "swca-softmax")


def test_pretrained_text_tower_and_tokenizer_come_from_the_folder(run_b):
    """The initial model's text tower is the saved BertModel (step 1's loss, recomputed from it, is the logged
    one: see the test above), the batches are tokenised by the saved tokenizer (not the corpus one), and the export
    carries both."""
    from transformers import AutoTokenizer

    from volvlp_ray.data.pipeline import study_id, tokenize
    from volvlp_ray.models import VLP
    from volvlp_ray.train.trainer import ensure_tokenizer

    ws, bert, saved_tok = run_b
    cfg, tok = run_config(ws, "B")
    assert cfg.model.text_model == str(ws / "hf-bert")
    assert tok.get_vocab() == saved_tok.get_vocab()
    model = initial_model(cfg, tok)
    saved = {k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
    tower = model.text.model.state_dict()
    assert sorted(tower) == sorted(saved)
    assert all(torch.equal(tower[k], saved[k]) for k in saved)

    scratch_cfg = run_config(ws, "B")[0]
    scratch_cfg.model.text_model = "scratch-tiny"
    scratch = AutoTokenizer.from_pretrained(ensure_tokenizer(scratch_cfg))  # the corpus tokenizer of the workspace
    assert scratch.get_vocab() != saved_tok.get_vocab()
    reports = {}
    for key, s in read_samples(ws, "train").items():
        reports.setdefault(study_id(key), []).append(s["report"])
    differs = 0
    for rank in range(2):
        t = batch(ws, "B", rank, 1)
        for i, ids in enumerate(t["input_ids"].numpy()):
            encodings = [tokenize(saved_tok, r, cfg.data.max_text_length)[0] for r in reports[int(t["study_id"][i])]]
            assert any(np.array_equal(e, ids) for e in encodings), (rank, i)
            differs += not any(np.array_equal(tokenize(scratch, r, cfg.data.max_text_length)[0], ids)
                               for r in reports[int(t["study_id"][i])])
    assert differs == 4, differs  # the corpus tokenizer would have given other tokens for every row
    export = VLP.from_pretrained(last_checkpoint(ws, "B") / "export")
    assert export.tokenizer.get_vocab() == saved_tok.get_vocab()
    assert type(export.text.model).__name__ == "BertModel"
    assert export.text.model.config.hidden_size == 32 and export.text.model.config.num_hidden_layers == 1


def test_zero3_checkpoint_and_export_hold_the_trained_weights(run_b):
    """ZeRO-3: the checkpoint is partitioned (a model-state and an optimizer shard per rank, the latter ZeRO-3's),
    DeepSpeed's own zero_to_fp32 consolidation of it equals the export, which differs from the initial weights;
    Muon momentum / AdamW moments as routed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from volvlp_ray.models import VLP

    ws, _, _ = run_b
    ckpt = last_checkpoint(ws, "B")
    names = sorted(p.name for p in (ckpt / "ckpt").iterdir())
    assert [n for n in names if n.endswith("model_states.pt")] == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"], names
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ckpt")  # reads ckpt/ckpt/
    export = VLP.from_pretrained(ckpt / "export").state_dict()
    params = {n for n, _ in VLP.from_pretrained(ckpt / "export").named_parameters()}
    assert params <= set(consolidated), sorted(params - set(consolidated))
    mismatched = [n for n in params if not torch.equal(consolidated[n].float(), export[n].float())]
    assert not mismatched, mismatched
    cfg, tok = run_config(ws, "B")
    initial = initial_model(cfg, tok).state_dict()
    changed = [n for n in params if not torch.equal(initial[n], export[n])]
    assert len(changed) > len(params) // 2, (len(changed), len(params))
    assert_muon_state(ckpt / "ckpt", initial_model(cfg, tok), stage=3)


def test_pyfunc_model_embeds_nifti_files_as_training_preprocessed_them(run_b):
    """The run's MLflow model, called with a DataFrame whose ``nifti`` column holds file paths (and slope /
    intercept columns), returns the export's embeddings of those volumes as the shards hold them (the training
    preprocessing), and the text column's as embed_reports gives them."""
    import mlflow
    import pandas as pd

    from volvlp_ray.data.ctrate import read_split
    from volvlp_ray.data.transforms import normalise
    from volvlp_ray.models import VLP

    ws, _, _ = run_b
    client, run = mlflow_run(ws, "B")
    model = VLP.from_pretrained(last_checkpoint(ws, "B") / "export")
    window = tuple(model.run_config["data"]["hu_window"])
    records = read_split(ws / "data" / "synthetic", "valid")[0][:2]
    shards = {k: s for k, s in read_samples(ws, "valid").items()}
    by_name = {s["meta"]["volume_name"]: s for s in shards.values()}
    expected = torch.stack([model.embed_volume(normalise(by_name[r.volume_name]["volume"], window)) for r in records])
    reports = [by_name[r.volume_name]["report"] for r in records]
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    pyfunc = mlflow.pyfunc.load_model(run.data.tags["volvlp.model_uri"])
    out = pyfunc.predict(pd.DataFrame({"nifti": [str(r.path) for r in records], "slope": [r.slope for r in records],
                                       "intercept": [r.intercept for r in records], "text": reports}))
    got = torch.tensor(np.stack([np.asarray(v, dtype=np.float32) for v in out["volume_embedding"]]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert float((expected[0] - expected[1]).abs().max()) > 1e-3  # two volumes, two embeddings
    text = torch.tensor(np.stack([np.asarray(v, dtype=np.float32) for v in out["text_embedding"]]))
    torch.testing.assert_close(text, model.embed_reports(reports), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# run C: the sigmoid loss by neighbour exchange, runs on S3


def test_ring_sigmoid_loss_is_what_the_loop_trains(run_c):
    ws, _, _ = run_c
    assert {r["loss"] for s in trace(ws, "C") for r in s} == {"SigmoidLoss(exchange='ring', same_study='negative')"}
    assert_step1_loss_is(ws, "C", "sigmoid")


def test_runs_on_s3_storage(run_c, moto_s3, monkeypatch):
    """train.storage_path on S3: the checkpoint (every rank's shard) and the export are objects in the bucket and
    nothing of the run is on local disk; local_export downloads the export, which loads and equals the bucket's."""
    import hashlib

    import pyarrow.fs
    from ray.train import Result

    from volvlp_ray.models import VLP
    from volvlp_ray.train.trainer import local_export

    ws, storage, keys = run_c
    assert not (ws / "ray_results" / "C").exists()
    s3 = moto_s3["client"]
    ckpts = sorted({k.split("/")[2] for k in keys if k.count("/") > 2 and k.split("/")[2].startswith("checkpoint_")})
    assert len(ckpts) == 1, keys
    prefix = f"runs/C/{ckpts[0]}"
    for name in ("ckpt/mp_rank_00_model_states.pt", "ckpt/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "ckpt/zero_pp_rank_1_mp_rank_00_optim_states.pt", "progress.json", "config.yaml",
                 "export/model.safetensors", "export/vlp_config.json"):
        assert f"{prefix}/{name}" in keys, (name, keys)
    assert json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/progress.json")["Body"].read())["step"] == STEPS

    for k, v in moto_s3["env"].items():
        monkeypatch.setenv(k, v)
    result = Result.from_path(storage.replace("/runs?", "/runs/C?"))
    assert isinstance(result.checkpoint.filesystem, pyarrow.fs.S3FileSystem)
    local = Path(local_export(result.checkpoint))
    assert local.is_dir() and ws not in local.parents
    remote = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/export/model.safetensors")["Body"].read()
    assert hashlib.sha256((local / "model.safetensors").read_bytes()).digest() == hashlib.sha256(remote).digest()
    model = VLP.from_pretrained(local)
    assert model.embed_report("No pleural effusion.").shape == (128,)
    client, run = mlflow_run(ws, "C")
    assert run.info.status == "FINISHED" and run.data.tags["volvlp.model_uri"].startswith("models:/")
