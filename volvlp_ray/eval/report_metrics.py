"""Scores of generated radiology reports, by the field's libraries, with bootstrap intervals.

    scores = score_reports(references, generated, labeler="miner", bertscore_model=None, n_bootstrap=200)

- **BLEU-1..4**: ``pycocoevalcap``'s ``Bleu(4)`` (the coco-caption scorer R2Gen, CT2Rep and CT-CHAT report),
  corpus-level over the held-out set.
- **METEOR**: ``pycocoevalcap``'s ``Meteor`` (METEOR 1.5, run by Java with its English paraphrase table), the jar's
  corpus-level figure. Needs ``java`` on the PATH; without it METEOR is ``None`` with the reason.
- **ROUGE-L**: ``rouge-score``'s ``rougeL`` F-measure per report, averaged.
- **BERTScore**: ``bert-score``'s F1 (and P, R) per report, averaged, with the scoring model and layer recorded.
- **Clinical efficacy**: the 18 CT-RATE findings extracted from the generated and the reference report, by the
  negation-aware keyword miner (``data/negation.py``: a finding counts as present when affirmed) or by a Hugging
  Face multi-label text classifier; per-label and macro / micro precision, recall and F1 by scikit-learn
  (``precision_recall_fscore_support``, ``zero_division=0``), references as the truth.

Before the n-gram metrics both texts are lower-cased and punctuation is split off into tokens (the coco-caption
convention; the reports' own case would otherwise count as mismatches). Every metric gets a 95 % percentile
interval from ``n_bootstrap`` resamples of the held-out reports (corpus metrics recomputed on each resample: BLEU by
the scorer, METEOR by the jar's aggregation of the resampled segments' statistics).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from volvlp_ray.data.ctrate import LABELS

__all__ = [
    "CE_LABELS", "bleu_scores", "bertscore", "ce_labels", "clinical_efficacy", "meteor_scores", "normalise_report",
    "rouge_l", "score_reports", "score_systems",
]

CE_LABELS: tuple[str, ...] = tuple(LABELS)
_PUNCT = re.compile(r"([.,;:!?()\[\]\"/])")


def normalise_report(text: str) -> str:
    """Lower-case, punctuation split off as tokens, whitespace collapsed: "No effusion." -> "no effusion ."."""
    return " ".join(_PUNCT.sub(r" \1 ", str(text).lower()).split())


def _interval(values: Sequence[float]) -> list[float] | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else None


def _resamples(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n) indices drawn with replacement (one generator: every metric sees the same resamples)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n)) if n else np.zeros((0, 0), int)


# ------------------------------------------------------------------------------------------------------------------
# n-gram metrics


def bleu_scores(refs: Sequence[str], hyps: Sequence[str]) -> list[float]:
    """Corpus BLEU-1..4 (``pycocoevalcap.bleu.Bleu``) of normalised texts."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts = {i: [normalise_report(r)] for i, r in enumerate(refs)}
    res = {i: [normalise_report(h) or "."] for i, h in enumerate(hyps)}
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in score]


class _Bleu:
    """``pycocoevalcap``'s ``BleuScorer`` with each report's n-gram statistics counted once: the corpus BLEU of any
    resample is the scorer's own aggregation of the resampled reports' statistics (what ``Bleu.compute_score``
    does for all of them)."""

    def __init__(self, refs: Sequence[str], hyps: Sequence[str]) -> None:
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer

        self.cls = BleuScorer
        self.all = BleuScorer(n=4)
        for r, h in zip(refs, hyps):
            self.all += (normalise_report(h) or ".", [normalise_report(r)])

    def __call__(self, rows: Sequence[int] | None = None) -> list[float]:
        if rows is None:
            scorer = self.all.copy()
        else:
            scorer = self.cls(n=4)
            scorer.crefs = [self.all.crefs[i] for i in rows]
            scorer.ctest = [self.all.ctest[i] for i in rows]
        score, _ = scorer.compute_score(option="closest", verbose=0)
        return [float(x) for x in score]


class _Meteor:
    """``pycocoevalcap``'s METEOR 1.5 process: per-segment statistics once, then the jar's corpus aggregation of any
    multiset of segments (what ``Meteor.compute_score`` does for all of them at once)."""

    def __init__(self) -> None:
        if shutil.which("java") is None:
            raise RuntimeError("METEOR needs Java (pycocoevalcap runs METEOR 1.5's jar): install a JRE, e.g. "
                               "apt-get install default-jre-headless")
        from pycocoevalcap.meteor.meteor import Meteor

        self.m = Meteor()

    def stats(self, refs: Sequence[str], hyps: Sequence[str]) -> list[str]:
        with self.m.lock:
            return [self.m._stat(normalise_report(h) or ".", [normalise_report(r)]) for r, h in zip(refs, hyps)]

    def aggregate(self, stats: Sequence[str]) -> tuple[float, list[float]]:
        """-> (corpus score, per-segment scores) of these segments."""
        p = self.m.meteor_p
        with self.m.lock:
            p.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
            p.stdin.flush()
            seg = [float(p.stdout.readline().strip()) for _ in stats]
            return float(p.stdout.readline().strip()), seg

    def close(self) -> None:
        with self.m.lock:
            self.m.meteor_p.stdin.close()
            self.m.meteor_p.kill()
            self.m.meteor_p.wait()


def meteor_scores(refs: Sequence[str], hyps: Sequence[str]) -> tuple[float, list[float]]:
    """Corpus METEOR and per-report scores (``pycocoevalcap``)."""
    m = _Meteor()
    try:
        return m.aggregate(m.stats(refs, hyps))
    finally:
        m.close()


def rouge_l(refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
    """ROUGE-L F-measure per report (``rouge_score``, on normalised texts)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return np.asarray([scorer.score(normalise_report(r), normalise_report(h))["rougeL"].fmeasure
                       for r, h in zip(refs, hyps)], dtype=np.float64)


def bertscore(refs: Sequence[str], hyps: Sequence[str], model: str, layers: int | None = None,
              batch_size: int = 32, device: str | None = None) -> dict[str, Any]:
    """Per-report BERTScore P / R / F1 (``bert_score.score``) with ``model`` (folder or hub id); ``layers``: the
    layer compared, by default bert-score's choice for a model it knows, else the model's last layer."""
    import bert_score
    from bert_score.utils import model2layers

    if layers is None:
        layers = model2layers.get(model)
    if layers is None:
        from transformers import AutoConfig

        layers = int(AutoConfig.from_pretrained(model).num_hidden_layers)
    p, r, f = bert_score.score(list(hyps), list(refs), model_type=model, num_layers=layers, batch_size=batch_size,
                               device=device or "cpu", lang=None, verbose=False)
    return {"model": model, "layers": int(layers), "precision": p.numpy().astype(np.float64),
            "recall": r.numpy().astype(np.float64), "f1": f.numpy().astype(np.float64)}


# ------------------------------------------------------------------------------------------------------------------
# clinical efficacy


def _classifier_labels(texts: Sequence[str], path: str, batch_size: int = 32) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    names = {str(v).strip().lower(): int(k) for k, v in model.config.id2label.items()}
    missing = [label for label in CE_LABELS if label.lower() not in names]
    if missing:
        raise ValueError(f"report.labeler={path!r}: its id2label lacks {len(missing)} of the 18 CT-RATE labels "
                         f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); it has "
                         f"{sorted(model.config.id2label.values())[:6]}")
    cols = [names[label.lower()] for label in CE_LABELS]
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=512,
                      return_tensors="pt")
            out.append((torch.sigmoid(model(**enc).logits)[:, cols] > 0.5).numpy())
    return np.concatenate(out).astype(np.int8) if out else np.zeros((0, len(CE_LABELS)), np.int8)


def ce_labels(texts: Sequence[str], labeler: str = "miner") -> np.ndarray:
    """(N, 18) int8: 1 where the text states the finding as present. "miner": the negation-aware keyword miner
    (affirmed = 1; negated or not mentioned = 0); else a Hugging Face multi-label classifier (folder or hub id)
    whose ``id2label`` names the 18 labels, sigmoid > 0.5."""
    if labeler == "miner":
        from volvlp_ray.data.negation import polarity_vector

        return np.stack([polarity_vector(t) == 1 for t in texts]).astype(np.int8) if len(texts) else \
            np.zeros((0, len(CE_LABELS)), np.int8)
    return _classifier_labels(texts, labeler)


def clinical_efficacy(truth: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Per-label and macro / micro precision, recall, F1 (scikit-learn; 0 where undefined), references as truth."""
    from sklearn.metrics import precision_recall_fscore_support

    truth, pred = np.asarray(truth), np.asarray(pred)
    p, r, f, s = precision_recall_fscore_support(truth, pred, average=None, zero_division=0,
                                                 labels=list(range(truth.shape[1])))
    out: dict[str, Any] = {"per_label": {label: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]),
                                                 "support": int(s[j])} for j, label in enumerate(CE_LABELS)}}
    for avg in ("macro", "micro"):
        pa, ra, fa, _ = precision_recall_fscore_support(truth, pred, average=avg, zero_division=0)
        out[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa)}
    return out


# ------------------------------------------------------------------------------------------------------------------
# everything, with intervals


def _with_ci(point: float | None, boot: list[float]) -> dict[str, Any]:
    return {"value": None if point is None else float(point), "ci95": _interval(boot) if point is not None else None}


def score_reports(refs: Sequence[str], hyps: Sequence[str], *, labeler: str = "miner", truth_labels=None,
                  bertscore_model: str | None = None, bertscore_layers: int | None = None, n_bootstrap: int = 200,
                  seed: int = 0, meteor: bool = True, meteor_process=None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every metric of ``hyps`` against ``refs`` (same order), each ``{"value", "ci95"}``; the clinical-efficacy
    block has per-label figures too. ``truth_labels``: the references' labels when already extracted."""
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} generated reports")
    n = len(refs)
    idx = _resamples(n, n_bootstrap, seed)
    out: dict[str, Any] = {"n": n}
    say = progress or (lambda _msg: None)

    scorer = _Bleu(refs, hyps)
    b = scorer() if n else [0.0] * 4
    boot = [scorer(row) for row in idx]
    for k in range(4):
        out[f"bleu_{k + 1}"] = _with_ci(b[k], [x[k] for x in boot])
    say("BLEU")

    if meteor:
        own = meteor_process is None
        try:
            m = _Meteor() if own else meteor_process
        except RuntimeError as exc:
            out["meteor"] = {"value": None, "ci95": None, "unavailable": str(exc)}
        else:
            try:
                stats = m.stats(refs, hyps)
                corpus, _ = m.aggregate(stats) if n else (0.0, [])
                out["meteor"] = _with_ci(corpus, [m.aggregate([stats[i] for i in row])[0] for row in idx])
            finally:
                if own:
                    m.close()
        say("METEOR")

    rl = rouge_l(refs, hyps)
    out["rouge_l"] = _with_ci(float(rl.mean()) if n else 0.0, [float(rl[row].mean()) for row in idx])

    if bertscore_model:
        bs = bertscore(refs, hyps, bertscore_model, bertscore_layers)
        for part in ("precision", "recall", "f1"):
            v = bs[part]
            out[f"bertscore_{part}"] = _with_ci(float(v.mean()) if n else 0.0, [float(v[row].mean()) for row in idx])
        out["bertscore_model"], out["bertscore_layers"] = bs["model"], bs["layers"]
        say("BERTScore")

    truth = np.asarray(truth_labels) if truth_labels is not None else ce_labels(refs, labeler)
    pred = ce_labels(hyps, labeler)
    ce = clinical_efficacy(truth, pred)
    boot_ce = [clinical_efficacy(truth[row], pred[row]) for row in idx]
    out["ce"] = {"labeler": labeler, "per_label": ce["per_label"]}
    for avg in ("macro", "micro"):
        for part in ("precision", "recall", "f1"):
            out["ce"][f"{avg}_{part}"] = _with_ci(ce[avg][part], [x[avg][part] for x in boot_ce])
    say("clinical efficacy")
    return out


def score_systems(refs: Sequence[str], systems: dict[str, Sequence[str]], *, labeler: str = "miner",
                  bertscore_model: str | None = None, bertscore_layers: int | None = None, n_bootstrap: int = 200,
                  seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`score_reports` of every system's reports against the same references, on the same bootstrap
    resamples, with the references' labels extracted once and one METEOR process. A METEOR that cannot run
    (no Java) is ``None`` with the reason, for every system."""
    truth = ce_labels(list(refs), labeler)
    try:
        m = _Meteor()
    except RuntimeError as exc:
        m, why = None, str(exc)
    out = {}
    try:
        for name, hyps in systems.items():
            out[name] = score_reports(refs, hyps, labeler=labeler, truth_labels=truth, bertscore_model=bertscore_model,
                                      bertscore_layers=bertscore_layers, n_bootstrap=n_bootstrap, seed=seed,
                                      meteor=m is not None, meteor_process=m)
            if m is None:
                out[name]["meteor"] = {"value": None, "ci95": None, "unavailable": why}
            if progress:
                progress(name)
    finally:
        if m is not None:
            m.close()
    return out
