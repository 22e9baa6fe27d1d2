"""Report generation: the metrics against hand-checked cases and the libraries' own paths, the generator against
reference computations (loss, greedy decoding, padding), what trains under each setting. The job itself runs in
``test_evaluate.py`` (on that module's trained workspace): end to end, and killed and resumed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from volvlp_ray.data.ctrate import LABELS
from volvlp_ray.eval import report_metrics as rm

ROOT = Path(__file__).parents[1]

# ------------------------------------------------------------------------------------------------------------------
# metrics


def test_normalise_report():
    assert rm.normalise_report("No  pleural effusion.The heart, normal (size)!") == \
        "no pleural effusion . the heart , normal ( size ) !"


def test_bleu_by_hand():
    # ref "a b c d", hyp "a b c e": unigrams 3/4, bigrams 2/3, trigrams 1/2, 4-grams 0/1; equal lengths: BP = 1
    b = rm.bleu_scores(["a b c d"], ["a b c e"])
    assert b[0] == pytest.approx(0.75, abs=1e-6)
    assert b[1] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-6)
    assert b[2] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-6)
    assert b[3] < 1e-3
    # a hypothesis half the reference's length: brevity penalty exp(1 - 4/2)
    assert rm.bleu_scores(["a b c d"], ["a b"])[0] == pytest.approx(math.exp(1 - 2), abs=1e-6)


def test_bootstrap_bleu_is_the_scorer_on_the_resampled_reports():
    refs = ["no pleural effusion.", "there is a lung nodule.", "the heart is enlarged. no effusion.", "normal."]
    hyps = ["no effusion.", "there is a nodule in the lung.", "heart is enlarged.", "normal study."]
    scorer = rm._Bleu(refs, hyps)
    assert scorer() == pytest.approx(rm.bleu_scores(refs, hyps))
    row = [2, 2, 0, 3]
    assert scorer(row) == pytest.approx(rm.bleu_scores([refs[i] for i in row], [hyps[i] for i in row]))


def test_rouge_l_by_hand():
    # LCS("a b c d e", "a c e") = 3: P = 1, R = 3/5, F = 2PR / (P + R) = 0.75
    assert rm.rouge_l(["a b c d e"], ["a c e"])[0] == pytest.approx(0.75)
    assert rm.rouge_l(["A B."], ["a b ."])[0] == pytest.approx(1.0)  # case and punctuation normalised


def test_meteor_is_pycocoevalcaps_and_orders_sensibly():
    from pycocoevalcap.meteor.meteor import Meteor

    refs = ["there is a small nodule in the right upper lobe.", "no pleural effusion is seen.",
            "the heart size is normal."]
    hyps = ["there is a nodule in the right lobe.", "no pleural effusion is seen.", "bones are intact."]
    corpus, seg = rm.meteor_scores(refs, hyps)
    m = Meteor()
    try:
        ref_corpus, ref_seg = m.compute_score({i: [rm.normalise_report(r)] for i, r in enumerate(refs)},
                                              {i: [rm.normalise_report(h)] for i, h in enumerate(hyps)})
    finally:
        m.lock.acquire()
        m.meteor_p.stdin.close()
        m.meteor_p.kill()
        m.meteor_p.wait()
        m.lock.release()
    assert corpus == pytest.approx(ref_corpus) and seg == pytest.approx(ref_seg)
    assert seg[1] > seg[0] > seg[2] >= 0.0 and seg[1] > 0.9


def test_clinical_efficacy_by_hand():
    refs = ["There is pleural effusion. There is cardiomegaly.",
            "No pleural effusion. There is a lung nodule.",
            "Cardiomegaly is present."]
    hyps = ["There is pleural effusion. No cardiomegaly.",          # effusion TP, cardiomegaly FN
            "There is pleural effusion. There is a lung nodule.",   # effusion FP, nodule TP
            "Cardiomegaly is present. There is emphysema."]         # cardiomegaly TP, emphysema FP
    truth, pred = rm.ce_labels(refs), rm.ce_labels(hyps)
    j = {label: LABELS.index(label) for label in ("Pleural effusion", "Cardiomegaly", "Lung nodule", "Emphysema")}
    assert truth[:, j["Pleural effusion"]].tolist() == [1, 0, 0]  # negated -> 0
    assert pred[:, j["Emphysema"]].tolist() == [0, 0, 1]
    ce = rm.clinical_efficacy(truth, pred)
    pl = ce["per_label"]
    assert (pl["Pleural effusion"]["precision"], pl["Pleural effusion"]["recall"]) == (0.5, 1.0)
    assert pl["Pleural effusion"]["f1"] == pytest.approx(2 / 3)
    assert (pl["Cardiomegaly"]["precision"], pl["Cardiomegaly"]["recall"]) == (1.0, 0.5)
    assert (pl["Lung nodule"]["f1"], pl["Emphysema"]["f1"], pl["Emphysema"]["support"]) == (1.0, 0.0, 0)
    # micro: TP 3, FP 2, FN 1 -> P 3/5, R 3/4
    assert ce["micro"]["precision"] == pytest.approx(0.6) and ce["micro"]["recall"] == pytest.approx(0.75)
    assert ce["micro"]["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    # macro: the mean over all 18 labels, absent ones scoring 0 (scikit-learn's zero_division=0)
    assert ce["macro"]["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1.0 + 0.0) / 18)


def test_score_reports_of_the_references_is_perfect_and_intervals_bracket(tmp_path):
    refs = ["There is pleural effusion. The heart is normal.", "No pleural effusion. There is a lung nodule.",
            "Cardiomegaly is present. No emphysema.", "There is consolidation in the lower lobe."] * 3
    perfect = rm.score_reports(refs, refs, n_bootstrap=30, meteor=False)
    assert perfect["bleu_4"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"]["value"] == 1.0 and perfect["ce"]["micro_f1"]["value"] == 1.0
    hyps = refs[1:] + refs[:1]
    s = rm.score_reports(refs, hyps, n_bootstrap=50, meteor=False)
    for key in ("bleu_1", "bleu_4", "rouge_l"):
        lo, hi = s[key]["ci95"]
        assert lo <= s[key]["value"] <= hi and hi > lo
    assert s["bleu_1"]["value"] < 1.0 and s["ce"]["micro_f1"]["value"] < 1.0
    assert set(s["ce"]["per_label"]) == set(LABELS)


def _tiny_bert(path, tokenizer, n_labels: int | None = None, id2label=None):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    if n_labels:
        cfg.num_labels = n_labels
        cfg.id2label = id2label
        cfg.label2id = {v: k for k, v in id2label.items()}
        cfg.problem_type = "multi_label_classification"
        model = BertForSequenceClassification(cfg)
    else:
        model = BertModel(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def small_tokenizer():
    from volvlp_ray.models.text import build_tokenizer

    return build_tokenizer(["There is pleural effusion. No cardiomegaly. The heart is normal.",
                            "There is a lung nodule in the right upper lobe. No emphysema."] * 2, 300)


def test_bertscore_from_a_local_model(tmp_path, small_tokenizer):
    _tiny_bert(tmp_path / "bert", small_tokenizer)
    refs = ["there is pleural effusion .", "no cardiomegaly ."]
    same = rm.bertscore(refs, refs, str(tmp_path / "bert"))
    assert same["model"] == str(tmp_path / "bert") and same["layers"] == 2  # the model's last layer
    assert same["f1"] == pytest.approx([1.0, 1.0], abs=1e-5)
    other = rm.bertscore(refs, ["the heart is normal .", "there is a lung nodule ."], str(tmp_path / "bert"),
                         layers=1)
    assert other["layers"] == 1 and (other["f1"] < 0.9999).all()
    s = rm.score_reports(refs, refs, bertscore_model=str(tmp_path / "bert"), n_bootstrap=5, meteor=False)
    assert s["bertscore_f1"]["value"] == pytest.approx(1.0, abs=1e-5) and s["bertscore_model"] == str(tmp_path / "bert")


def test_a_hugging_face_classifier_as_the_labeler(tmp_path, small_tokenizer):
    names = list(reversed(LABELS))  # the classifier's own order: columns are matched by name
    model = _tiny_bert(tmp_path / "clf", small_tokenizer, len(names), {i: n for i, n in enumerate(names)})
    texts = ["There is pleural effusion.", "No cardiomegaly. There is a lung nodule.", "Normal."]
    got = rm.ce_labels(texts, str(tmp_path / "clf"))
    enc = small_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.sigmoid(model.eval()(**enc).logits).numpy()
    want = np.stack([probs[:, names.index(label)] > 0.5 for label in LABELS], axis=1).astype(np.int8)
    assert got.shape == (3, 18) and (got == want).all()
    _tiny_bert(tmp_path / "bad", small_tokenizer, 3, {0: "Cardiomegaly", 1: "Emphysema", 2: "Other"})
    with pytest.raises(ValueError, match="lacks 16 of the 18 CT-RATE labels"):
        rm.ce_labels(texts, str(tmp_path / "bad"))


def test_meteor_without_java_is_reported_not_fatal(monkeypatch):
    monkeypatch.setattr(rm.shutil, "which", lambda _name: None)
    s = rm.score_systems(["no effusion."], {"a": ["no effusion."]}, n_bootstrap=2)
    assert s["a"]["meteor"]["value"] is None and "needs Java" in s["a"]["meteor"]["unavailable"]
    assert s["a"]["rouge_l"]["value"] == 1.0


# ------------------------------------------------------------------------------------------------------------------
# the generator


@pytest.fixture(scope="module")
def parts():
    from volvlp_ray.config import ModelConfig
    from volvlp_ray.downstream.reports import build_decoder, decoder_tokenizer
    from volvlp_ray.models.vision import vit3d_from_config

    corpus = ["There is pleural effusion. No cardiomegaly.", "The heart is normal. There is a lung nodule.",
              "No emphysema. Bones are intact."] * 3
    tok = decoder_tokenizer("scratch-tiny", corpus, 200)
    torch.manual_seed(0)
    vit = vit3d_from_config(ModelConfig())
    return tok, vit, lambda: build_decoder("scratch-tiny", tok, 64, seed=0)


def _generator(parts, **kw):
    from volvlp_ray.downstream.reports import ReportGenerator

    tok, vit, decoder = parts
    torch.manual_seed(1)
    return ReportGenerator(vit, decoder(), tok, n_visual=4, **kw)


def test_tokens_start_end_and_truncation(parts):
    from volvlp_ray.downstream.reports import encode_reports

    tok = parts[0]
    ids, mask = encode_reports(tok, ["No emphysema.", "There is pleural effusion. No cardiomegaly."], 6)
    assert ids.shape == (2, 6) and mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[0, 0] == tok.bos_token_id and ids[0, 4] == tok.eos_token_id and ids[0, 5] == tok.pad_token_id
    assert ids[1, -1] == tok.eos_token_id and mask[1].all()  # cut to 4 report tokens + start + end
    assert tok.decode(ids[0, 1:4].tolist()) == "no emphysema."


def test_loss_is_cross_entropy_of_the_report_tokens_only(parts):
    from volvlp_ray.downstream.reports import encode_reports, pad_volumes

    gen = _generator(parts).eval()
    tok = parts[0]
    rng = np.random.default_rng(0)
    vols = [rng.integers(-1000, 1000, (8, 64, 64)).astype(np.int16), rng.integers(-1000, 1000, (12, 64, 64))
            .astype(np.int16)]
    x, depths = pad_volumes(vols, 4, (-1000.0, 1000.0))
    ids, mask = encode_reports(tok, ["No emphysema.", "There is pleural effusion. No cardiomegaly."], 32)
    loss = gen(x, depths, ids, mask)
    # reference: the decoder's logits over [prefix, tokens]; the token at t is predicted at t - 1; only report
    # tokens and the end token count (not the prefix, not the start token, not padding)
    with torch.no_grad():
        prefix = gen.visual_prefix(x, depths)
        emb = gen.decoder.get_input_embeddings()(ids)
        logits = gen.decoder(inputs_embeds=torch.cat([prefix, emb], 1),
                             attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1)).logits
    p = prefix.shape[1]
    terms = []
    for b in range(2):
        for t in range(1, int(mask[b].sum())):
            terms.append(-torch.log_softmax(logits[b, p + t - 1], -1)[ids[b, t]])
    assert float(loss.detach()) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    # a volume's padding (air slices past its depth) changes nothing: one volume alone gives the same prefix
    alone, d1 = pad_volumes(vols[:1], 4, (-1000.0, 1000.0))
    with torch.no_grad():
        assert torch.allclose(gen.visual_prefix(alone, d1)[0], prefix[0], atol=1e-5)


def test_greedy_generation_is_the_argmax_loop(parts):
    from volvlp_ray.downstream.reports import pad_volumes

    gen = _generator(parts).eval()
    rng = np.random.default_rng(1)
    x, depths = pad_volumes([rng.integers(-1000, 1000, (8, 64, 64)).astype(np.int16)] * 2, 4, (-1000.0, 1000.0))
    x[1] = -x[1]
    got = gen.generate(x, depths, max_new_tokens=12, num_beams=1)
    with torch.no_grad():
        for b in range(2):
            seq = [gen.bos_id]
            out = []
            for _ in range(12):
                emb = gen.decoder.get_input_embeddings()(torch.tensor([seq]))
                h = torch.cat([gen.visual_prefix(x[b : b + 1], depths[b : b + 1]), emb], 1)
                nxt = int(gen.decoder(inputs_embeds=h).logits[0, -1].argmax())
                if nxt == gen.eos_id:
                    break
                out.append(nxt)
                seq.append(nxt)
            assert got[b] == out
    beams = gen.generate(x, depths, max_new_tokens=12, num_beams=3)
    assert len(beams) == 2 and all(isinstance(t, int) for row in beams for t in row)
    # these inputs tell greedy from 3-beam search apart (the untrained decoder mostly repeats one token, and on most
    # inputs both decodings agree): the argmax equality above fails for a generate that searches with 3 beams
    assert beams != got


def test_what_trains_under_each_setting(tmp_path, parts, monkeypatch):
    from volvlp_ray.config import config_from_dict
    from volvlp_ray.downstream import reports
    from volvlp_ray.models import VLP
    from volvlp_ray.models.text import build_tokenizer
    from volvlp_ray.models.vlp import build_model

    tok, vit, _ = parts
    from volvlp_ray.config import ModelConfig

    text_tok = build_tokenizer(["no effusion."], 50)
    torch.manual_seed(0)
    build_model(ModelConfig(), text_tok).save_pretrained(tmp_path / "export")

    def trainable(**report):
        cfg = config_from_dict({"report": {"visual_tokens": 4, "max_length": 32, **report}})
        gen = reports.build_generator(cfg, str(tmp_path / "export"), tok)
        names = {n for n, p in gen.named_parameters() if p.requires_grad}
        groups = reports._param_groups(gen, cfg)
        assert sum(len(g["params"]) for g in groups) == len(names)
        return gen, names, groups

    gen, names, groups = trainable()
    assert not any(n.startswith(("vit.", "image_head.")) for n in names) and any(n.startswith("decoder.") for n in names)
    assert any(n.startswith("prefix.") for n in names) and {g["name"] for g in groups} == {"decay", "no_decay"}
    assert "global_proj.weight" in names and gen.n_prefix == 5
    vlp = VLP.from_pretrained(tmp_path / "export")
    assert torch.equal(gen.vit.patch_embed.weight, vlp.vision.patch_embed.weight)
    # the first visual token carries the pre-trained image embedding (encode_image), in training mode too
    from volvlp_ray.downstream.reports import pad_volumes

    x, d = pad_volumes([np.random.default_rng(0).integers(-1000, 1000, (8, 64, 64)).astype(np.int16)] * 2, 4,
                       (-1000.0, 1000.0))
    gen.train()
    seen = {}
    gen.global_proj.register_forward_hook(lambda _m, args, _out: seen.setdefault("emb", args[0]))
    with torch.no_grad():
        gen.visual_prefix(x, d)
        assert torch.allclose(seen["emb"], vlp.encode_image(x, d), atol=1e-5)
    _, names, _ = trainable(global_token=False)
    assert not any(n.startswith("global_proj.") for n in names)
    _, names, _ = trainable(decoder_tuning="lora", lora_r=2)
    dec = {n for n in names if n.startswith("decoder.")}
    assert dec and all("lora_" in n for n in dec)
    _, names, _ = trainable(decoder_tuning="frozen")
    assert all(n.startswith(("prefix.", "global_proj.")) for n in names)
    _, names, groups = trainable(encoder="tuned", encoder_lr=3e-5)
    assert any(n.startswith("vit.") for n in names) and any(n.startswith("image_head.") for n in names)
    assert [g["lr"] for g in groups if g["name"] == "encoder"] == [3e-5]
    gen, _, _ = trainable(pooler="perceiver", perceiver_layers=2)
    assert len(gen.prefix.blocks) == 2 and gen.prefix.blocks[0].self_attn is not None


def test_report_config_errors():
    from volvlp_ray.config import ConfigError, config_from_dict

    for bad, match in [({"zero_stage": 3}, "generation needs whole weights"), ({"decoding": ["top-k"]}, "greedy"),
                       ({"decoder_tuning": "prefix"}, "decoder_tuning"), ({"visual_tokens": 0}, "visual_tokens"),
                       ({"max_length": 2}, "max_length")]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"report": bad})
    with pytest.raises(ConfigError):
        config_from_dict({"report": {"no_such_key": 1}})


def test_most_frequent_breaks_ties_by_text():
    from volvlp_ray.downstream.reports import most_frequent

    assert most_frequent(["b", "a", "b", "a", "c"]) == "a"
    assert most_frequent(["x", "y", "y"]) == "y"


def test_held_out_shares_are_disjoint_complete_and_read_only_by_their_rank(tiny_workspace):
    from volvlp_ray.config import load_config
    from volvlp_ray.downstream.reports import held_out, held_out_batches

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"workspace={tiny_workspace}"])
    everything = held_out(cfg, 0)
    assert [c["index"] for c in everything] == list(range(8)) and len({c["key"] for c in everything}) == 8
    # a reference reader: the tar members themselves, by tarfile and np.load
    import io
    import tarfile

    ref_volumes = {}
    for tar in sorted((Path(tiny_workspace) / "shards" / "valid").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".volume.npy"):
                    ref_volumes[m.name[: -len(".volume.npy")]] = np.load(io.BytesIO(t.extractfile(m).read()))
    assert set(ref_volumes) == {c["key"] for c in everything}
    assert all(np.array_equal(c["volume"], ref_volumes[c["key"]]) for c in everything)
    for n in (0, 5):
        seen = []
        for rank in range(3):
            batches = list(held_out_batches(cfg, n, rank, 3, batch_size=2))
            assert all(1 <= len(b) <= 2 for b in batches)
            mine = [c for b in batches for c in b]
            assert [c["index"] for c in mine] == [i for i in range(n or 8) if i % 3 == rank]
            for c in mine:
                ref = everything[c["index"]]
                assert c["key"] == ref["key"] and c["report"] == ref["report"]
                assert c["volume"].dtype == np.int16 and np.array_equal(c["volume"], ref["volume"])
            seen += [c["index"] for c in mine]
        assert sorted(seen) == list(range(n or 8))
