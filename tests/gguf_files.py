"""Tiny GGUF files written from tiny HF models, so the GGUF path is tested without a 98 MB wheel.

`write_gguf` does what llama.cpp's converter does for Llama and Qwen2 (tensor names from `gguf`'s own
name map, Llama's q/k rows permuted for its rotary layout) with a byte-level BPE vocabulary of 256 bytes,
one merge and an end-of-text token. transformers reads such a file back to the same logits exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 258  # 256 bytes, "he", <|endoftext|>


def _byte_tokens() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (`bytes_to_unicode`)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _permute(w, n_head: int):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_model(arch: str = "llama", seed: int = 0, layers: int = 2):
    """A random 2-block Llama or Qwen2 causal LM (d_model 64, 4 query / 2 key-value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return model_cls(cfg).eval()


def write_gguf(model, path: str | Path, arch: str | None = None) -> Path:
    """Write `model` (a Llama or Qwen2 from `tiny_hf_model`) as a float32 GGUF file at `path`."""
    import gguf

    cfg = model.config
    arch = arch or cfg.model_type
    path = Path(path)
    tokens = [*_byte_tokens(), "he", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["h e"])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, cfg.model_type.upper()), cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
