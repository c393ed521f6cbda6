"""A word-level tokenizer for the random-weight builders: every word it knows is one token.

Real checkpoints bring their own tokenizer; models built from config (tests, ``arch:`` speed models, the lab
mini-VLM) need one that loads offline with ``AutoTokenizer``. Text is lower-cased and split on whitespace
and punctuation; an unknown word becomes the unknown token.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# The words every builder's tokenizer knows (chat roles, the usual question words, yes / no, ...).
BASE_WORDS = (
    "user assistant what is in the image describe this picture a an of and or to on at left right above "
    "below how many there color shape yes no"
).split()


def word_tokenizer(
    words: Sequence[str], specials: Sequence[str], *, unk: str, bos: str | None = None, **named: Any
) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is ``specials``, then ``words`` (lower-cased), then single letters, digits
    and punctuation. ``bos``: a token put before every encoded text (LLaVA's ``<s>``), or none (Qwen).
    ``named``: the special tokens' roles for ``PreTrainedTokenizerFast`` (``eos_token``, ``pad_token``,
    ``chat_template``, ``padding_side``, ...)."""
    vocab: dict[str, int] = {}
    for token in [*specials, *(w.lower() for w in words), *string.ascii_lowercase, *string.digits,
                  *string.punctuation]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.add_special_tokens(list(specials))
    if bos is not None:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if bos is not None:
        named = {"bos_token": bos, **named}
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=unk, **named)
