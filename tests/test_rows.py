"""One training row from raw tar members (``_ToRow``): tokens, the truncation flag, the findings vector."""

from __future__ import annotations

import numpy as np

from volvlp_ray.config import load_config
from volvlp_ray.data.ctrate import LABELS
from volvlp_ray.data.pipeline import _ToRow
from volvlp_ray.data.shards import encode_sample
from volvlp_ray.models import build_tokenizer

SHORT = "No pleural effusion. The heart is enlarged."
LONG = " ".join(["A small nodule is seen in the right upper lobe."] * 40)


def raw_row(key: str, report: str, volume: np.ndarray | None = None) -> dict:
    volume = np.zeros((12, 16, 16)) if volume is None else volume
    meta = {"labels": [0] * len(LABELS), "spacing": [5.0, 6.0, 6.0], "depth": len(volume)}
    row = {name.split(".", 1)[1]: data for name, data in encode_sample(key, volume, report, meta)}
    return {"__key__": key, **row}


def test_tokens_truncation_flag_and_findings(tmp_path):
    tok = build_tokenizer([SHORT, LONG] * 5, vocab_size=200)
    tok.save_pretrained(tmp_path / "tok")
    cfg = load_config(None, ["data.max_text_length=24", "model.patch=[4,16,16]", "data.in_plane_size=16"])
    to_row = _ToRow(cfg, str(tmp_path / "tok"), training=True)
    (short,), (long_,) = to_row(raw_row("train_1_a_1", SHORT)), to_row(raw_row("train_2_a_1", LONG))
    ref = tok(SHORT, max_length=24, truncation=True, padding="max_length")
    assert short["input_ids"].tolist() == ref["input_ids"] and short["attention_mask"].tolist() == ref["attention_mask"]
    assert not short["text_truncated"] and long_["text_truncated"]
    assert long_["input_ids"].shape == (24,) and long_["input_ids"][-1] == tok.sep_token_id
    assert long_["input_ids"].tolist() == tok(LONG, max_length=24, truncation=True)["input_ids"]
    f = short["findings"]
    assert f[LABELS.index("Pleural effusion")] == 0 and f[LABELS.index("Cardiomegaly")] == 1
    assert long_["findings"][LABELS.index("Lung nodule")] == 1


def test_int16_collate_normalised_on_the_device_equals_the_float_collate():
    import torch

    from volvlp_ray.data.pipeline import collate, normalise_tensor

    rng = np.random.default_rng(0)
    vols = np.empty(3, dtype=object)
    for i, d in enumerate((5, 9, 12)):
        vols[i] = rng.integers(-1500, 2500, size=(d, 4, 4)).astype(np.int16)
    batch = {"volume": vols, "input_ids": np.zeros((3, 4), np.int32), "attention_mask": np.ones((3, 4), np.int8),
             "labels": np.zeros((3, 2), np.float32), "study_id": np.arange(3), "z_center_mm": np.zeros(3, np.float32)}
    for window in ((-1000.0, 1000.0), (-160.0, 240.0)):
        ref = collate(batch, 4, window)
        raw = collate(batch, 4, window, hu=True)
        assert raw["volume"].dtype == torch.int16 and raw["volume"].shape == ref["volume"].shape == (3, 1, 12, 4, 4)
        assert torch.equal(normalise_tensor(raw["volume"], window), ref["volume"])
        assert torch.equal(raw["depths"], ref["depths"])
        assert (ref["volume"][0, 0, 5:] == -1).all()


def test_normalising_in_the_loader_equals_normalising_on_the_device(tmp_path):
    """data.normalise_in=loader: float32 rows from Ray Data's map; the collated batch is bitwise the one the
    training loop makes from int16 rows on the device (and the evaluation's host-side collate)."""
    import torch

    from volvlp_ray.data.pipeline import collate, normalise_tensor

    tok = build_tokenizer([SHORT, LONG] * 5, vocab_size=200)
    tok.save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(3)
    raws = [raw_row(f"valid_{i}_a_1", SHORT, rng.integers(-1500, 2500, size=(d, 16, 16)).astype(np.int16))
            for i, d in enumerate((8, 13, 4))]
    window = (-160.0, 240.0)
    common = ["model.patch=[4,16,16]", "data.in_plane_size=16", f"data.hu_window=[{window[0]},{window[1]}]"]
    batches = {}
    for where in ("device", "loader"):
        to_row = _ToRow(load_config(None, [*common, f"data.normalise_in={where}", "data.volume_transport=object_store"]), str(tmp_path / "tok"), False)
        rows = [to_row(r)[0] for r in raws]
        batch = {k: np.array([r[k] for r in rows]) for k in rows[0] if k != "volume"}
        batch["volume"] = np.empty(len(rows), dtype=object)
        batch["volume"][:] = [r["volume"] for r in rows]
        batches[where] = collate(batch, 4, window, hu=True)
    assert batches["device"]["volume"].dtype == torch.int16 and batches["loader"]["volume"].dtype == torch.float32
    on_device = normalise_tensor(batches["device"]["volume"], window)
    assert torch.equal(batches["loader"]["volume"], on_device)
    assert (on_device[2, 0, 4:] == -1).all() and on_device.abs().max() <= 1
