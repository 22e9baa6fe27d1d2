"""The negation-pair loss: statement mining from report text, pair sampling, the loss, the model's pair path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from volvlp_ray.config import ConfigError, ModelConfig, load_config
from volvlp_ray.data.ctrate import LABELS
from volvlp_ray.data.negation import (
    NEGATIVE_TEMPLATES,
    POSITIVE_TEMPLATES,
    StatementBank,
    finding_polarity,
    polarity_vector,
)
from volvlp_ray.data.synthetic import make_case
from volvlp_ray.losses import negation_pair_loss
from volvlp_ray.models import build_model, build_tokenizer

CORPUS = [
    "No pleural effusion. Mild cardiomegaly is present.",
    "A lung nodule in the right upper lobe; emphysema in both lungs.",
    "Coronary artery wall calcification. Hiatal hernia.",
    "Bronchiectasis and peribronchial thickening in the lower lobes.",
    "Consolidation and atelectasis; no lymphadenopathy.",
] * 4
TEMPLATE_TEXT = [t.format(L=l, l=l.lower()) for l in LABELS for t in POSITIVE_TEMPLATES + NEGATIVE_TEMPLATES]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS + TEMPLATE_TEXT, vocab_size=400)


def test_polarity_of_ctrate_style_sentences():
    text = ("The heart is enlarged. No pericardial effusion. There are no pathologically enlarged lymph nodes. "
            "A 4 mm nodule in the right upper lobe. Pleural spaces are clear. No hiatal hernia was seen.")
    assert finding_polarity(text) == {
        "Cardiomegaly": 1, "Pericardial effusion": 0, "Lymphadenopathy": 0, "Lung nodule": 1,
        "Pleural effusion": 0, "Hiatal hernia": 0,
    }
    # affirmed once is affirmed, whatever else the report says about it
    assert finding_polarity("No new nodule. A stable nodule in the left lower lobe.") == {"Lung nodule": 1}
    vec = polarity_vector("Emphysema. No atelectasis.")
    assert vec.dtype == np.int8 and vec.shape == (len(LABELS),)
    assert vec[LABELS.index("Emphysema")] == 1 and vec[LABELS.index("Atelectasis")] == 0
    assert (np.delete(vec, [LABELS.index("Emphysema"), LABELS.index("Atelectasis")]) == -1).all()


def test_polarity_agrees_with_the_synthetic_labels():
    """Mined from the report text alone, every mentioned finding has the polarity of the labels CSV, and most
    reports mention the findings they are labelled with."""
    agree = total = positives = positives_mentioned = 0
    for i in range(60):
        case = make_case(seed=3, split="train", index=i)
        pol = finding_polarity(case["findings"] + " " + case["impressions"])
        for label, p in pol.items():
            total += 1
            agree += int(p == case["labels"][label])
        for label, y in case["labels"].items():
            positives += y
            positives_mentioned += int(y == 1 and pol.get(label) == 1)
    assert total > 200
    assert agree == total
    assert positives_mentioned == positives


def test_statement_bank_samples_true_and_false_statements_deterministically(tokenizer):
    bank = StatementBank(tokenizer, max_length=24)
    pol = np.full((3, len(LABELS)), -1, dtype=np.int8)
    pol[0, LABELS.index("Cardiomegaly")] = 1
    pol[0, LABELS.index("Pleural effusion")] = 0
    pol[1, LABELS.index("Emphysema")] = 0
    # row 2 mentions nothing
    a = bank.sample(pol, 2, np.random.default_rng([0, 1, 2]))
    b = bank.sample(pol, 2, np.random.default_rng([0, 1, 2]))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["pair_ids"].shape == (3, 2, 2, 24) and a["pair_mask"].shape == (3, 2, 2, 24)
    assert a["pair_valid"].tolist() == [[True, True], [True, False], [False, False]]

    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=True).lower()

    positive = {t.format(L="x", l="x").lower().replace(" ", "") for t in POSITIVE_TEMPLATES}
    negative = {t.format(L="x", l="x").lower().replace(" ", "") for t in NEGATIVE_TEMPLATES}

    def polarity_of(sentence: str, label: str) -> bool:
        form = sentence.replace(" ", "").replace(label.lower().replace(" ", ""), "x")
        assert form in positive | negative, sentence
        return form in positive

    seen = set()
    for i, j in ((0, 0), (0, 1), (1, 0)):
        true_s, false_s = text(a["pair_ids"][i, j, 0]), text(a["pair_ids"][i, j, 1])
        label = next(l for l in LABELS if l.lower() in true_s)
        assert label.lower() in false_s
        seen.add(label)
        assert polarity_of(true_s, label) == bool(pol[i, LABELS.index(label)] == 1)
        assert polarity_of(false_s, label) != polarity_of(true_s, label)
    assert seen == {"Cardiomegaly", "Pleural effusion", "Emphysema"}
    assert not a["pair_mask"][2].any()
    # another step draws other templates somewhere
    c = bank.sample(np.repeat(pol[:1], 20, 0), 1, np.random.default_rng([0, 1, 3]))
    assert len({tuple(r) for r in c["pair_ids"][:, 0, 0]}) > 1


def test_negation_pair_loss_is_the_pairwise_cross_entropy():
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    p = F.normalize(torch.randn(5, 3, 2, 8, generator=g), dim=-1)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    scale = torch.tensor(7.0)
    got = negation_pair_loss(v, p, valid, scale)
    terms = []
    for i in range(5):
        for k in range(3):
            if valid[i, k]:
                logits = scale * torch.stack([v[i] @ p[i, k, 0], v[i] @ p[i, k, 1]])
                terms.append(F.cross_entropy(logits[None], torch.tensor([0])))
    torch.testing.assert_close(got, torch.stack(terms).mean())
    # no valid pair: zero, and still differentiable
    v.requires_grad_(True)
    z = negation_pair_loss(v, p, torch.zeros(5, 3, dtype=torch.bool), scale)
    z.backward()
    assert z.item() == 0.0 and torch.all(v.grad == 0)
    with pytest.raises(ValueError, match="pair_features must be"):
        negation_pair_loss(v, p[:, :, :1], valid, scale)


def test_model_pair_features(tokenizer):
    """Eval mode: a statement's pair feature is its text embedding (running statistics, like zero-shot prompts).
    Training: statements are normalised with the statistics of the batch's reports."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", patch=[4, 16, 16], embed_dim=16, text_vocab_size=400)
    model = build_model(cfg, tokenizer)
    bank = StatementBank(tokenizer, max_length=16)
    pol = np.stack([polarity_vector(t) for t in CORPUS[:4]])
    drawn = bank.sample(pol, 2, np.random.default_rng(0))
    pair_ids, pair_mask = torch.from_numpy(drawn["pair_ids"]), torch.from_numpy(drawn["pair_mask"])
    rep = tokenizer(CORPUS[:4], padding="max_length", max_length=24, return_tensors="pt")
    vol = torch.randn(4, 1, 8, 32, 32)
    # a few training passes so that the running statistics are not the initial ones
    for _ in range(3):
        model(vol, None, rep["input_ids"], rep["attention_mask"])
    model.eval()
    with torch.no_grad():
        out = model(vol, None, rep["input_ids"], rep["attention_mask"], pair_ids, pair_mask)
        ref = model.encode_text(pair_ids.reshape(-1, 16), pair_mask.reshape(-1, 16)).reshape(4, 2, 2, -1)
    torch.testing.assert_close(out["pair_features"], ref)
    torch.testing.assert_close(out["text_features"], model.encode_text(rep["input_ids"], rep["attention_mask"]))

    model.train()
    with torch.no_grad():
        out = model(vol, None, rep["input_ids"], rep["attention_mask"], pair_ids, pair_mask)
        h = model.text_proj(model.text(rep["input_ids"], rep["attention_mask"]))
        hp = model.text_proj(model.text(pair_ids.reshape(-1, 16), pair_mask.reshape(-1, 16)))
        manual = F.normalize((hp - h.mean(0)) / (h.var(0, unbiased=False) + 1e-5).sqrt(), dim=-1)
    torch.testing.assert_close(out["pair_features"], manual.reshape(4, 2, 2, -1))
    with pytest.raises(ValueError, match="pair_ids and pair_mask"):
        model(vol, None, rep["input_ids"], rep["attention_mask"], pair_ids, None)


def test_config_keys():
    cfg = load_config(None, ["loss.negation_pairs=2", "loss.pair_weight=0.5"])
    assert (cfg.loss.negation_pairs, cfg.loss.pair_weight) == (2, 0.5)
    with pytest.raises(ConfigError, match="loss.negation_pairs=0"):
        load_config(None, ["train.grad_cache_micro_batch=4"])
    load_config(None, ["train.grad_cache_micro_batch=4", "loss.negation_pairs=0"])
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(None, ["loss.pair_weight=-1"])
