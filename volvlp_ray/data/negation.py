"""Finding statements mined from report text, and their negations (for the negation-pair loss).

A scratch text tower trained only on report-to-volume contrast does not learn what "not" does: the
zero-shot prompts "{label} is present." and "{label} is not present." then embed almost alike and their
difference carries little signal. The negation-pair loss (``volvlp_ray.losses.negation_pair_loss``) asks each
volume to prefer a true statement about its own report over the same statement negated.

Rule based, so it works on any report (synthetic or CT-RATE) and never reads the labels CSV: the text is split
into sentences, sentences that mention a finding are found with a keyword table (word-boundary match), and
the finding's polarity is negated when every such sentence carries a negation cue::

    finding_polarity("No pleural effusion. Cardiomegaly.")   # {"Pleural effusion": 0, "Cardiomegaly": 1}
    polarity_vector(report)                                  # int8 (18,): -1 not mentioned, 0 negated, 1 affirmed

Statements are drawn from fixed templates of each polarity. ``StatementBank`` tokenises every template of
every label once, so a training step samples pairs by indexing (``StatementBank.sample``) with a generator
seeded by (seed, rank, step): the same step draws the same pairs after a resume.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from volvlp_ray.data.ctrate import LABELS
from volvlp_ray.data.organs import _SENTENCE

__all__ = [
    "LABEL_KEYWORDS", "NEGATIVE_TEMPLATES", "POSITIVE_TEMPLATES", "StatementBank", "finding_polarity",
    "polarity_vector",
]

# keyword stems per CT-RATE label (matched at a word start, case-insensitive)
LABEL_KEYWORDS: dict[str, tuple[str, ...]] = {
    "Medical material": ("medical material", "pacemaker", "implant", "stent", "catheter", "prosthe"),
    "Arterial wall calcification": ("arterial wall calcification", "aortic wall", "atherosclero"),
    "Cardiomegaly": ("cardiomegaly", "heart is enlarged", "heart size is increased", "enlarged heart"),
    "Pericardial effusion": ("pericardial effusion", "pericardial space"),
    "Coronary artery wall calcification": ("coronary",),
    "Hiatal hernia": ("hiatal hernia",),
    "Lymphadenopathy": ("lymphadenopathy", "lymph node"),
    "Emphysema": ("emphysem",),
    "Atelectasis": ("atelecta",),
    "Lung nodule": ("nodule",),
    "Lung opacity": ("opacit",),
    "Pulmonary fibrotic sequela": ("fibrotic",),
    "Pleural effusion": ("pleural effusion", "pleural space"),
    "Mosaic attenuation pattern": ("mosaic",),
    "Peribronchial thickening": ("peribronchial", "bronchial wall thickening"),
    "Consolidation": ("consolidat",),
    "Bronchiectasis": ("bronchiecta", "dilated bronchi"),
    "Interlobular septal thickening": ("septal thickening", "interlobular septa"),
}
assert tuple(LABEL_KEYWORDS) == LABELS, "LABEL_KEYWORDS must follow ctrate.LABELS"
_KEY_RE = {label: re.compile("|".join(r"\b" + re.escape(k) for k in keys), re.I)
           for label, keys in LABEL_KEYWORDS.items()}
NEGATION = re.compile(r"\b(no|not|without|absent|negative for|free of|clear|unremarkable|normal)\b", re.I)
POSITIVE_TEMPLATES = ("{L} is present.", "There is {l}.", "{L} is observed.", "{L} is seen.")
NEGATIVE_TEMPLATES = ("No {l}.", "There is no {l}.", "{L} is not present.", "No evidence of {l}.",
                      "{L} was not observed.")


def finding_polarity(text: str) -> dict[str, int]:
    """``{label: 1 affirmed, 0 negated}`` for the findings ``text`` mentions (labels it does not mention are
    left out: a report's silence is not a statement)."""
    sentences = [s for s in _SENTENCE.split(text.strip()) if s]
    out = {}
    for label, rx in _KEY_RE.items():
        hits = [s for s in sentences if rx.search(s)]
        if hits:
            out[label] = 0 if all(NEGATION.search(s) for s in hits) else 1
    return out


def polarity_vector(text: str) -> np.ndarray:
    """int8 ``(len(LABELS),)``: -1 not mentioned, 0 negated, 1 affirmed (what a training row carries)."""
    pol = finding_polarity(text)
    return np.asarray([pol.get(label, -1) for label in LABELS], dtype=np.int8)


def statement(label: str, present: bool, template: int) -> str:
    templates = POSITIVE_TEMPLATES if present else NEGATIVE_TEMPLATES
    return templates[template % len(templates)].format(L=label, l=label.lower())


class StatementBank:
    """Every template of every label, tokenised once (``max_length`` tokens, padded)."""

    def __init__(self, tokenizer: Any, max_length: int = 32):
        self.max_length = max_length
        texts = [statement(label, present, t)
                 for label in LABELS
                 for present, n in ((True, len(POSITIVE_TEMPLATES)), (False, len(NEGATIVE_TEMPLATES)))
                 for t in range(n)]
        tok = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length")
        n_pos = len(POSITIVE_TEMPLATES)
        # (label, template, token) per polarity: True -> affirming templates, False -> negating ones
        ids, mask = (np.asarray(tok[k], dtype=np.int64).reshape(len(LABELS), -1, max_length)
                     for k in ("input_ids", "attention_mask"))
        self.ids = {True: ids[:, :n_pos], False: ids[:, n_pos:]}
        self.mask = {True: mask[:, :n_pos], False: mask[:, n_pos:]}

    def sample(self, polarity: np.ndarray, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """For each row of ``polarity`` (B, L), up to ``k`` distinct mentioned findings, each as a (true, false)
        statement pair -> ``pair_ids``/``pair_mask`` (B, k, 2, T) int64 and ``pair_valid`` (B, k) bool (False
        where the text mentions fewer than ``k`` findings)."""
        polarity = np.asarray(polarity)
        b, t = polarity.shape[0], self.max_length
        ids = np.zeros((b, k, 2, t), dtype=np.int64)
        mask = np.zeros((b, k, 2, t), dtype=np.int64)
        valid = np.zeros((b, k), dtype=bool)
        for i in range(b):
            mentioned = np.flatnonzero(polarity[i] >= 0)
            for j, label in enumerate(rng.permutation(mentioned)[:k]):
                present = bool(polarity[i, label] == 1)
                for slot, pol in ((0, present), (1, not present)):
                    tpl = int(rng.integers(self.ids[pol].shape[1]))
                    ids[i, j, slot] = self.ids[pol][label, tpl]
                    mask[i, j, slot] = self.mask[pol][label, tpl]
                valid[i, j] = True
        return {"pair_ids": ids, "pair_mask": mask, "pair_valid": valid}
