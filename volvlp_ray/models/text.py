"""The text tower: a Hugging Face encoder (BERT-class) with cls / mean pooling, and its tokenizer.

Two ways to get one, chosen by ``ModelConfig.text_model``:

- ``"scratch-tiny"`` / ``"scratch-small"``: a randomly initialised ``BertModel`` sized for CPU, with a
  WordPiece tokenizer trained on the report corpus (no download, deterministic).
- anything else: a Hugging Face model id or a local folder (e.g. ``emilyalsentzer/Bio_ClinicalBERT``),
  loaded with ``AutoModel`` / ``AutoTokenizer`` (on clusters; tests never do this).

    tok = load_tokenizer(cfg, corpus=reports)
    tower = text_tower_from_config(cfg, tok)
    feats = tower(input_ids, attention_mask)   # (B, T), (B, T) -> (B, tower.hidden_size)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from volvlp_ray.config import ModelConfig

__all__ = [
    "SPECIAL_TOKENS",
    "TEXT_PRESETS",
    "TextTower",
    "build_tokenizer",
    "load_tokenizer",
    "text_flops_per_sample",
    "text_tower_from_config",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

TEXT_PRESETS: dict[str, dict[str, int]] = {
    "scratch-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "scratch-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "scratch-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
"""``BertConfig`` sizes of the randomly initialised text towers (``ModelConfig.text_model``). ``scratch-base`` is
BERT-base / BioClinicalBERT-sized: the benchmark's stand-in for a pretrained clinical encoder (no download)."""

MAX_POSITIONS = 512


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A lowercase BERT-style WordPiece tokenizer (``tokenizers`` library) for ``corpus``; deterministic.

    Normalisation and pre-tokenisation are BERT's (lowercase, accents stripped, split on whitespace and
    punctuation). The vocabulary is [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0..4), then every character seen at
    the start (``c``) and inside (``##c``) of a word, then whole words, each group by descending frequency
    (ties alphabetical), up to ``vocab_size``. WordPiece's greedy longest-match then splits an unseen word into
    known words and characters ("effusions" -> "effusion", "##s"), so only characters never seen become [UNK].

    The library's ``WordPieceTrainer`` is not used: its merges break ties by hash-map order, which differs
    between processes, and every worker that builds a tokenizer from the same corpus must get the same one.
    Encodings are ``[CLS] text [SEP]`` and return ``input_ids`` and ``attention_mask`` only;
    ``save_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)`` round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in corpus:
        if isinstance(text, str):
            words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    if not words:
        raise ValueError("build_tokenizer needs a non-empty corpus of strings")
    chars: Counter[str] = Counter()
    for w, n in words.items():
        chars[w[0]] += n
        for c in w[1:]:
            chars["##" + c] += n

    def ranked(counter: Counter[str]) -> list[str]:
        return [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]

    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for token in ranked(chars) + ranked(words):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(token, len(vocab))

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_POSITIONS,
        model_input_names=["input_ids", "attention_mask"],
    )


def load_tokenizer(cfg: ModelConfig, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer for ``cfg.text_model``: built from ``corpus`` for "scratch-*", else loaded from the
    model id / folder with ``AutoTokenizer``."""
    if cfg.text_model.startswith("scratch-"):
        if corpus is None:
            raise ValueError(f"text_model={cfg.text_model!r} builds its tokenizer from a corpus; pass corpus=")
        return build_tokenizer(corpus, cfg.text_vocab_size)
    return AutoTokenizer.from_pretrained(cfg.text_model)


def _layers(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's stack of transformer layers, for the common HF encoder layouts."""
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "layer"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    return None


class TextTower(nn.Module):
    """A Hugging Face encoder pooled to one vector per text.

    Args:
        model: a ``PreTrainedModel``, a ``PretrainedConfig`` (random init via ``AutoModel.from_config``; used to
            rebuild an export offline) or a model id / folder (``AutoModel.from_pretrained``).
        pool: "cls" (first token) or "mean" (mean over attended tokens).
        freeze_layers: N > 0 freezes the embeddings and the first N layers; 0 trains everything.

    The model's pooler head (if any) is dropped: it is unused, and unused parameters trouble ZeRO.
    """

    def __init__(
        self, model: PreTrainedModel | PretrainedConfig | str, pool: str = "cls", freeze_layers: int = 0
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"text pool={pool!r} is not one of ['cls', 'mean']")
        if isinstance(model, str):
            model = AutoModel.from_pretrained(model)
        elif isinstance(model, PretrainedConfig):
            model = AutoModel.from_config(model)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.model = model
        self.pool = pool
        self.freeze_layers = 0
        self.freeze(freeze_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def freeze(self, n_layers: int) -> None:
        """Freeze the embeddings and the first ``n_layers`` layers (0: nothing)."""
        if n_layers < 0:
            raise ValueError(f"freeze_text_layers must be >= 0, got {n_layers}")
        if n_layers == 0:
            return
        layers = _layers(self.model)
        embeddings = getattr(self.model, "embeddings", None)
        if layers is None or embeddings is None:
            raise ValueError(f"cannot find embeddings / layers to freeze in {type(self.model).__name__}")
        if n_layers > len(layers):
            raise ValueError(f"freeze_text_layers={n_layers} but the text model has {len(layers)} layers")
        for module in [embeddings, *layers[:n_layers]]:
            for p in module.parameters():
                p.requires_grad_(False)
        self.freeze_layers = n_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids (B, T), attention_mask (B, T) -> pooled features (B, hidden_size)."""
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, T), got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pool == "cls":
            return hidden[:, 0]
        w = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def text_tower_from_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> TextTower:
    """A scratch ``BertModel`` sized by ``TEXT_PRESETS[cfg.text_model]`` with the tokenizer's vocabulary, or
    the pretrained ``AutoModel`` at ``cfg.text_model``; pooled by ``cfg.text_pool``, frozen per
    ``cfg.freeze_text_layers``."""
    if cfg.text_model.startswith("scratch-"):
        if cfg.text_model not in TEXT_PRESETS:
            raise ValueError(f"text_model={cfg.text_model!r}: scratch towers are {list(TEXT_PRESETS)}")
        bert_cfg = BertConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **TEXT_PRESETS[cfg.text_model],
        )
        model: PreTrainedModel = BertModel(bert_cfg, add_pooling_layer=False)
    else:
        model = AutoModel.from_pretrained(cfg.text_model)
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but {cfg.text_model!r} embeds only {vocab}")
    return TextTower(model, pool=cfg.text_pool, freeze_layers=cfg.freeze_text_layers)


def text_flops_per_sample(model_or_config: TextTower | PreTrainedModel | PretrainedConfig, tokens: int) -> float:
    """Forward FLOPs of a BERT-class encoder on one text of ``tokens`` tokens (a training step is ~3x this).

    2 FLOPs per multiply-add of every layer matmul (q, k, v, output: 4 h^2; MLP: 2 h * intermediate) plus
    attention ``4 * tokens**2 * h`` per layer; embedding look-ups, norms, softmax and pooling are ignored.
    Reads ``hidden_size``, ``num_hidden_layers`` and ``intermediate_size`` (default 4 h) from the HF config.
    """
    if isinstance(model_or_config, TextTower):
        model_or_config = model_or_config.model
    config = model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config
    h, layers = int(config.hidden_size), int(config.num_hidden_layers)
    inter = int(getattr(config, "intermediate_size", None) or 4 * h)
    return layers * (2.0 * tokens * (4 * h * h + 2 * h * inter) + 4.0 * tokens * tokens * h)
