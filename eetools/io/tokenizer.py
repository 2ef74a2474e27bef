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


def chat_prompt(tokenizer, user: str, *, system: str | None = None, prepend_bos: bool = True) -> str:
    """`user` (and `system`) as the text a chat model expects before its reply; `user` alone, ending with a
    newline, when `tokenizer` is None or has no chat template (a base model such as the tiny reasoner).

    Encoding a prompt prepends ``<bos>`` when the model does (`prepend_bos`, the bridge's
    ``cfg.default_prepend_bos``), so a template that writes ``<bos>`` itself has it dropped here:
    the model sees it once.

    Args:
        tokenizer: a Hugging Face tokenizer, or None.
        user: the user's message.
        system: an optional system message (templates without a system role get it above the user's).
        prepend_bos: whether the encoding of the prompt adds ``<bos>`` itself.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        text = user if system is None else f"{system}\n\n{user}"
        return text if text.endswith("\n") else text + "\n"
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template without a system role (it raises on one): the system text leads the user's
        if system is None:
            raise
        merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
        text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if prepend_bos and bos and text.startswith(bos):
        text = text[len(bos) :]
    return text
