"""Organ-wise text (SigVLP): split a findings paragraph by organ, and pick the text of a z-chunk.

The splitter is keyword based: each sentence goes to the first organ whose keywords it mentions, else to
"general". Organ z-extents are RAS millimetres ``{organ: [z_start, z_end]}``.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_EMPTY_CHUNK_TEXT", "ORGAN_KEYWORDS", "chunk_text", "split_findings_by_organ"]

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


DEFAULT_EMPTY_CHUNK_TEXT = "No findings are reported for this region."
"""``data.empty_chunk_text``'s default: the text of a chunk with no organ findings and no general sentence."""


def chunk_text(
    organ_findings: dict[str, str],
    organ_extents: dict[str, list[float]],
    z_range_mm: tuple[float, float],
    impression: str = "",
    empty_text: str = DEFAULT_EMPTY_CHUNK_TEXT,
) -> str:
    """A z-chunk's text (SigVLP's organ-wise text): the findings of the organs whose z-extent overlaps
    ``z_range_mm`` (in the order of ``organ_findings``), then the general sentence(s) (findings tied to no organ,
    key "general"), then ``impression`` when one is given (``data.organ_impression``).

    Organs without a known extent are treated as covering the whole volume. A chunk that covers no organ with
    findings gets its general sentence(s) alone; when there are none either, ``empty_text`` -- never the whole
    report, which would describe organs the chunk does not show.
    """
    z0, z1 = z_range_mm
    parts = []
    for organ, text in organ_findings.items():
        if organ == "general" or not text:
            continue
        ext = organ_extents.get(organ)
        if ext is None or (ext[0] <= z1 and ext[1] >= z0):
            parts.append(text)
    general = organ_findings.get("general", "").strip()
    if general:
        parts.append(general)
    if not parts:
        parts.append(empty_text)
    if impression.strip():
        parts.append(impression.strip())
    return " ".join(p.strip() for p in parts if p.strip())
