"""Small word-level tokenizers built locally (no download), for test models and the built-in world."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


def word_level_tokenizer(
    words: Iterable[str],
    special_tokens: Iterable[str],
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    unk_token: str,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A lower-casing word tokenizer over ``words`` (split on whitespace and punctuation).

    ``special_tokens`` are matched verbatim before splitting. A ``bos_token`` is prepended to every encoding, as
    Llama tokenizers do. Unknown words map to ``unk_token``.
    """
    specials = list(dict.fromkeys([pad_token, unk_token, eos_token, *([bos_token] if bos_token else []), *special_tokens]))
    vocab = {token: index for index, token in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if bos_token:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, vocab[bos_token])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        additional_special_tokens=[t for t in special_tokens if t not in (bos_token, eos_token, pad_token, unk_token)],
        padding_side="left",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
