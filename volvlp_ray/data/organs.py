"""Organ-wise text (SigVLP): split a findings paragraph by organ, and pick the text of a z-chunk.

The splitter is keyword based: each sentence goes to the first organ whose keywords it mentions, else to
"general". Organ z-extents are RAS millimetres ``{organ: [z_start, z_end]}``.
"""

from __future__ import annotations

import re

__all__ = ["ORGAN_KEYWORDS", "chunk_text", "split_findings_by_organ"]

ORGAN_KEYWORDS: dict[str, tuple[str, ...]] = {
    "airways": ("trachea", "bronch", "airway", "peribronchial"),
    "heart": ("heart", "cardi", "pericard", "coronary", "pacemaker"),
    "aorta": ("aort", "arterial", "vascular"),
    "mediastinum": ("mediastin", "lymph"),
    "esophagus": ("esophag", "hiatal", "hernia"),
    "pleura": ("pleura",),
    "lung": ("lung", "pulmonary", "emphysema", "atelecta", "nodule", "opacit", "consolidat", "fibrotic",
             "mosaic", "septal", "parenchym", "lobe", "ground-glass"),
    "bones": ("bone", "vertebra", "spine", "lytic", "rib"),
}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def split_findings_by_organ(findings: str) -> dict[str, str]:
    """``"No effusion. Heart enlarged."`` -> ``{"heart": "Heart enlarged.", "general": "No effusion."}``."""
    out: dict[str, list[str]] = {}
    for sentence in _SENTENCE.split(findings.strip()):
        if not sentence:
            continue
        low = sentence.lower()
        organ = next((o for o, keys in ORGAN_KEYWORDS.items() if any(k in low for k in keys)), "general")
        out.setdefault(organ, []).append(sentence)
    return {k: " ".join(v) for k, v in out.items()}


def chunk_text(
    organ_findings: dict[str, str],
    organ_extents: dict[str, list[float]],
    z_range_mm: tuple[float, float],
    general: str = "",
) -> str:
    """Findings of the organs whose z-extent overlaps ``z_range_mm``, then the general sentence(s).

    Organs without a known extent are treated as covering the whole volume.
    """
    z0, z1 = z_range_mm
    parts = []
    for organ, text in organ_findings.items():
        if organ == "general" or not text:
            continue
        ext = organ_extents.get(organ)
        if ext is None or (ext[0] <= z1 and ext[1] >= z0):
            parts.append(text)
    tail = " ".join(t for t in (organ_findings.get("general", ""), general) if t)
    return " ".join(parts + ([tail] if tail else [])).strip()
