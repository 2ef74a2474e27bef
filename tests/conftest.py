"""Shared fixtures: tiny random bridges of two architectures, built offline in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--device", default="cpu", help="device of the tiny bridges (cpu, cuda); see benchmarks/gpu_check.sh"
    )


@pytest.fixture(scope="session")
def device(request):
    import torch as _torch

    d = request.config.getoption("--device")
    if d.startswith("cuda") and not _torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device is available")
    return d


ROTARY = {"qwen3": "Qwen3", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
"""Architectures `_build` makes with RMSNorm, rotary embeddings and grouped-query attention (transformers' prefix)."""


def _build(folder, arch: str, n_layers: int = 4, seed: int = 0):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from eetools.io.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch in ROTARY:
        cfg = getattr(transformers, f"{ROTARY[arch]}Config")(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            **ids,
        )
        model = getattr(transformers, f"{ROTARY[arch]}ForCausalLM")(cfg)
    else:  # LayerNorm, learned positions
        cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=n_layers, n_head=4, n_positions=256, **ids)
        model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # random init is too tame for exits to matter; spread the weights
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def build_tiny():
    """``build_tiny(folder, arch, n_layers=4, seed=0)``: write another tiny random model."""
    return _build


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    return {arch: _build(tmp_path_factory.mktemp(arch), arch) for arch in ("qwen3", "gpt2")}


@pytest.fixture(scope="session", params=["qwen3", "gpt2"])
def arch(request):
    return request.param


@pytest.fixture()
def tiny_bridge(tiny_folders, arch, device):
    """A fresh tiny random bridge (function scope: tests may add adapters), on ``--device``."""
    import eetools

    bridge = eetools.load_model(tiny_folders[arch], device=device)
    bridge.cfg.default_prepend_bos = True
    return bridge


@pytest.fixture()
def tiny_ee(tiny_bridge):
    import eetools

    torch.manual_seed(0)
    return eetools.attach_exit_heads(tiny_bridge, layers=[1, 2, 3])


@pytest.fixture(scope="session")
def reasoner():
    """The shipped tiny reasoner (integration tier)."""
    import eetools
    from eetools.io.models import shipped_model_dir

    if not (shipped_model_dir() / "config.json").exists():
        pytest.skip("the shipped tiny reasoner is not in data/models/tiny-reasoner")
    return eetools.load_model()
