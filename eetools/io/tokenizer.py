"""The character-level tokenizer of the tiny reasoner, in HF format.

Every character of the tasks' alphabet is one token; encoding prepends ``<bos>``; ``<bos>``, ``<eos>``, ``<pad>`` and
``<unk>`` are special. Built with the `tokenizers` library and wrapped in
`transformers.PreTrainedTokenizerFast`, so it saves as ``tokenizer.json`` and loads
with ``AutoTokenizer.from_pretrained`` like any hub tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
ALPHABET = "\n " + string.digits + string.ascii_letters + "+-=:,.?!'()"


def build_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over `alphabet` (ids: specials first, then characters)."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters")
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # "." does not match a newline; "[\s\S]" matches every single character.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Like Llama/Qwen tokenizers, encoding a text prepends <bos> (the model was trained so).
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    return fast
