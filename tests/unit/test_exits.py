"""The early-exit model on tiny random bridges (Qwen3-like and GPT-2-like): parity and exactness.

Tolerances: exact-path parity uses torch.testing defaults for fp32 (rtol 1.3e-6, atol 1e-5);
cached vs uncached log-probs 1e-4; batched vs single 1e-3 (RELIABILITY.md).
"""

import pytest
import torch

import eetools
from eetools.core.heads import exit_log_probs, stick_breaking
from eetools.core.hooks import count_hooks, required_hook_names
from eetools.core.model import validate_exit_layers
from eetools.io.exit_checkpoint import save_exit_model

CACHE_TOL = 1e-4
BATCH_TOL = 1e-3


def _toks(bridge, text="Q: 12+34\nab cd"):
    return bridge.to_tokens([text], prepend_bos=True).to(bridge.cfg.device)


def _eager_heads(ee, bias=-0.5):
    """Make exits frequent so the tests exercise them."""
    with torch.no_grad():
        for h in ee.heads:
            h.net[-1].bias.fill_(bias)


def test_every_hook_name_exists(tiny_bridge):
    for name in required_hook_names(tiny_bridge.cfg.n_layers):
        assert name in tiny_bridge.hook_dict, f"{name} missing: the bridge renamed its residual hooks"


@pytest.mark.parametrize(
    "layers,match",
    [
        ([0], "out of range.*1..3"),
        ([4], "out of range.*1..3"),
        ([-1], "out of range"),
        ([1, 9], r"\[9\] are out of range"),
        ([1, 1], "duplicates"),
        ([], "empty"),
        ([3, 1], "not sorted"),
        (["a"], "must be integers in 1..3"),
        ([1.5], "must be integers"),
    ],
)
def test_bad_exit_layers_are_clear_errors(tiny_bridge, layers, match):
    with pytest.raises(ValueError, match=match):
        eetools.attach_exit_heads(tiny_bridge, layers=layers)


def test_default_layers_and_heads():
    assert validate_exit_layers(None, 8) == [1, 2, 3, 4, 5, 6, 7]
    assert validate_exit_layers(None, 28) == [4, 8, 12, 16, 20, 24]
    from eetools.core.heads import ExitHead, make_head

    with pytest.raises(ValueError, match="head must be one of .*'confidence'"):
        make_head("transformer", 8, readout=None)
    with pytest.raises(ValueError, match="kind must be"):
        ExitHead(8, "confidence")  # a parameter-free head is not a learned one


def test_confidence_heads_exit_where_the_logit_lens_is_confident(tiny_bridge, tmp_path):
    """``head="confidence"``: no parameters, ``c_l`` = the logit lens's top probability, exits where it reaches t."""
    from eetools.core.heads import ConfidenceHead

    ee = eetools.attach_exit_heads(tiny_bridge, layers=[1, 2, 3], head="confidence")
    assert ee.trainable_parameters() == [] and "confidence" in repr(ee)
    _, cache = tiny_bridge.run_with_cache(_toks(tiny_bridge))
    resid = cache["blocks.2.hook_resid_pre"][0]
    top = ee.readout(resid).float().softmax(-1).amax(-1)
    torch.testing.assert_close(torch.sigmoid(ee.heads[1](resid)), top)
    # the logit stays exact where the probability rounds to 1 in float32
    z = ConfidenceHead(lambda x: x)(torch.tensor([[30.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(
        z, torch.tensor([30.0 - torch.log(torch.tensor(2.0)).item(), -torch.log(torch.tensor(2.0)).item()])
    )
    # threshold the median first-layer confidence: some tokens exit, and each exits at its first confident layer
    off = ee.generate("Q: 12+34\n", 16, mode="off", temperature=0, seed=0)
    t = float(off.exit_probs[0, 1:, 0][off.mask[0, 1:]].median())
    r = ee.generate("Q: 12+34\n", 16, mode="threshold", threshold=t, temperature=0, seed=0)
    m = r.mask[0].clone()
    m[0] = False  # the first token is predicted from the prompt, which never exits
    confident = torch.cat([r.exit_probs[0] >= t, torch.ones_like(r.exit_probs[0, :, :1], dtype=torch.bool)], -1)
    expected = torch.tensor([*ee.exit_layers, ee.n_layers])[confident.float().argmax(-1)]
    assert bool((r.exit_layers[0] < ee.n_layers)[m].any()), "no token exited"
    assert r.exit_layers[0][m].tolist() == expected[m].tolist()
    fast = ee.generate("Q: 12+34\n", 16, mode="threshold", threshold=t, temperature=0, seed=0, skip="compute")
    assert fast.exit_layers.tolist() == r.exit_layers.tolist() and fast.text == r.text
    # a checkpoint of it round-trips (nothing but its config to save)
    save_exit_model(ee, tmp_path / "conf")
    back = eetools.load_exit_model(tmp_path / "conf", model=tiny_bridge)
    assert back.head_kind == "confidence"
    again = back.generate("Q: 12+34\n", 16, mode="threshold", threshold=t, temperature=0, seed=0)
    assert again.exit_layers.tolist() == r.exit_layers.tolist() and again.text == r.text
    with pytest.raises(ValueError, match="nothing to train"):
        eetools.calibrate(ee, "addition", steps=1)
    with pytest.raises(ValueError, match="nothing to train"):
        eetools.train_rl(ee, "addition", steps=1)


def test_no_exits_equals_base_model(tiny_ee):
    toks = _toks(tiny_ee.model)
    base = tiny_ee.model(toks).float().log_softmax(-1)
    out = tiny_ee.prescribed_forward(toks, torch.full_like(toks, tiny_ee.n_layers))
    torch.testing.assert_close(
        out.logprobs, base, msg="heads attached but no exits changed the logits: a hook writes when it should not"
    )
    teacher = tiny_ee.teacher_forward(toks)
    torch.testing.assert_close(teacher.logprobs, base)
    assert out.exit_logits.shape == (1, toks.shape[1], 3)
    assert teacher.early_logprobs.shape == (1, 3, toks.shape[1], tiny_ee.model.cfg.d_vocab)


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_exited_token_reads_out_the_logit_lens_and_only_later_tokens_change(tiny_ee, exit_layer):
    bridge, L = tiny_ee.model, tiny_ee.n_layers
    toks = _toks(bridge)
    p = 6
    exits = torch.full_like(toks, L)
    exits[0, p] = exit_layer
    base = tiny_ee.prescribed_forward(toks, torch.full_like(toks, L)).logprobs
    out = tiny_ee.prescribed_forward(toks, exits).logprobs
    _, cache = bridge.run_with_cache(toks)
    lens = tiny_ee.readout(cache[f"blocks.{exit_layer}.hook_resid_pre"][0, p]).float().log_softmax(-1)
    torch.testing.assert_close(
        out[0, p], lens, msg="exited token's logits are not unembed(ln_final(resid_pre)): freezing broke"
    )
    torch.testing.assert_close(
        out[0, :p], base[0, :p], msg="earlier tokens changed: they cannot attend to a later token"
    )
    later = (out[0, p + 1 :] - base[0, p + 1 :]).abs().amax(-1)
    if exit_layer < L - 1:
        assert bool((later > 1e-4).all()), (
            "later tokens attend to the frozen token's keys/values in blocks > exit and must change"
        )
    else:  # block L-1 still sees the same input for the exited token: nothing later can differ
        torch.testing.assert_close(out[0, p + 1 :], base[0, p + 1 :])
    # the teacher's early readout at that layer is the same logit lens
    teacher = tiny_ee.teacher_forward(toks)
    torch.testing.assert_close(teacher.early_logprobs[0, exit_layer - 1, p], lens)


def test_prescribed_exit_layers_validated(tiny_ee):
    toks = _toks(tiny_ee.model)
    with pytest.raises(ValueError, match="exitable layer"):
        tiny_ee.prescribed_forward(toks, torch.zeros_like(toks))
    with pytest.raises(ValueError, match="shape"):
        tiny_ee.prescribed_forward(toks, torch.full((1, 2), 4))


def test_prescribed_is_differentiable_into_heads(tiny_ee):
    toks = _toks(tiny_ee.model)
    exits = torch.full_like(toks, tiny_ee.n_layers)
    exits[0, 4:8] = 2
    out = tiny_ee.prescribed_forward(toks, exits)
    loss = out.logprobs[0, :, 5].sum() + out.exit_logprobs()[..., -1].sum()  # "no exit" involves every head
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_ee.heads.parameters() if p.requires_grad)


def test_cached_generation_equals_uncached_and_rescoring_reproduces_logprobs(tiny_ee):
    _eager_heads(tiny_ee)
    prompts = ["Q: 12+34\n", "Q: 1+2\nab c"]
    a = tiny_ee.generate(prompts, 16, seed=3)
    b = tiny_ee.generate(prompts, 16, seed=3, use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers)
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=CACHE_TOL, rtol=0)
    torch.testing.assert_close(a.exit_logprobs, b.exit_logprobs, atol=CACHE_TOL, rtol=0)
    assert (a.exit_layers < tiny_ee.n_layers).any(), "test needs some exits"
    assert (a.exit_layers[:, 0] == tiny_ee.n_layers).all(), "the first generated token is predicted at full depth"
    # re-score in prescribed mode
    out = tiny_ee.prescribed_forward(a.sequences, a.prescribed_exit_layers(), attention_mask=a.attention_mask)
    P = a.prompt_tokens.shape[1]
    # the rollout's tensors may sit elsewhere (CPU) than the model's outputs (--device cuda)
    out = type(out)(*(t.to(a.tokens.device) for t in (out.logprobs, out.exit_logits, out.exit_layers)))
    tok_lp = out.logprobs[:, P - 1 : -1].gather(-1, a.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(tok_lp * a.mask, a.token_logprobs, atol=CACHE_TOL, rtol=0)
    ex_lp = out.exit_logprobs()[:, P - 1 : -1].gather(-1, tiny_ee.exit_index(a.exit_layers)[..., None]).squeeze(-1)
    ex_lp[:, 0] = 0
    torch.testing.assert_close(ex_lp * a.mask, a.exit_logprobs, atol=CACHE_TOL, rtol=0)


def test_same_seed_same_rollout_and_seeds_differ(tiny_ee):
    _eager_heads(tiny_ee)
    a = tiny_ee.generate("Q: 5+6\n", 12, seed=1)
    b = tiny_ee.generate("Q: 5+6\n", 12, seed=1)
    c = tiny_ee.generate("Q: 5+6\n", 12, seed=2)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers)
    assert not (torch.equal(a.tokens, c.tokens) and torch.equal(a.exit_layers, c.exit_layers))


def test_left_padded_batch_matches_single_prompts(tiny_ee):
    _eager_heads(tiny_ee, 0.0)
    prompts = ["Q: 1+2\nab c", "Q: 12345+6\n"]
    batch = tiny_ee.generate(prompts, 10, seed=0, temperature=0, mode="threshold", threshold=0.45)
    for i, p in enumerate(prompts):
        one = tiny_ee.generate(p, 10, seed=0, temperature=0, mode="threshold", threshold=0.45)
        n = one.tokens.shape[1]
        assert torch.equal(one.tokens[0], batch.tokens[i, :n])
        assert torch.equal(one.exit_layers[0], batch.exit_layers[i, :n])
        torch.testing.assert_close(one.token_logprobs[0], batch.token_logprobs[i, :n], atol=BATCH_TOL, rtol=0)


def test_mode_off_never_exits_and_equals_bridge_greedy(tiny_ee):
    _eager_heads(tiny_ee, 3.0)
    r = tiny_ee.generate("Q: 1+2\n", 12, mode="off", temperature=0, seed=0)
    assert (r.exit_layers == tiny_ee.n_layers).all() and float(r.compute[0]) == 1.0
    ref = tiny_ee.model.generate(
        "Q: 1+2\n",
        max_new_tokens=12,
        do_sample=False,
        verbose=False,
        return_type="tokens",
        prepend_bos=True,
        stop_at_eos=True,
    )
    n = r.tokens.shape[1]
    assert r.tokens[0].tolist() == ref[0, -n:].tolist() or r.tokens[0].tolist() == ref[0, -12:][:n].tolist()


@pytest.mark.parametrize("skip", ["mask", "compute"])
def test_exits_off_without_heads_runs_no_head_and_gives_the_same_text(tiny_ee, skip):
    """``heads=False`` (the base model's decode at its own cost): the same tokens and log-probs as exits
    off with the heads recording, no head runs, and the heads' record is 0; with exits on it is refused."""
    _eager_heads(tiny_ee, 3.0)
    prompts = ["Q: 1+2\n", "Q: 35+467\n"]
    ref = tiny_ee.generate(prompts, 12, mode="off", temperature=0, seed=0, skip=skip)
    calls = []
    handles = [h.register_forward_hook(lambda *a: calls.append(1)) for h in tiny_ee.heads]
    try:
        bare = tiny_ee.generate(prompts, 12, mode="off", temperature=0, seed=0, skip=skip, heads=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == [], "an exit head ran with heads=False"
    assert bare.tokens.tolist() == ref.tokens.tolist() and bare.text == ref.text
    assert torch.equal(bare.token_logprobs, ref.token_logprobs)
    assert (ref.exit_probs[ref.mask] > 0).all() and (bare.exit_probs == 0).all()
    assert (bare.exit_logprobs == 0).all() and (bare.exit_layers == tiny_ee.n_layers).all()
    with pytest.raises(ValueError, match="heads=False needs mode='off'"):
        tiny_ee.generate(prompts, 4, mode="sample", heads=False)
    with pytest.raises(TypeError, match="heads must be True or False"):
        tiny_ee.generate(prompts, 4, mode="off", heads="no")


def test_threshold_mode_is_deterministic_in_exits(tiny_ee):
    _eager_heads(tiny_ee, 5.0)  # c ~ 0.99 >= 0.5 at the first exitable layer
    r = tiny_ee.generate("Q: 1+2\n", 8, mode="threshold", seed=0)
    assert (r.exit_layers[0, 1:][r.mask[0, 1:]] == tiny_ee.exit_layers[0]).all()
    assert float(r.compute[0]) < 0.5


def test_sampled_exit_frequencies_match_stick_breaking(tiny_ee):
    """With constant heads, exits over many tokens follow P(e_i) = c_i prod_{j<i}(1-c_j)."""
    torch.manual_seed(0)
    biases = [-1.0, 0.0, 0.5]
    with torch.no_grad():
        for h, b in zip(tiny_ee.heads, biases):
            h.net[-1].weight.zero_()
            h.net[-1].bias.fill_(b)
    r = tiny_ee.generate(["Q: 1+2\n"] * 64, 24, seed=0, temperature=1.0)
    mask = r.mask.clone()
    mask[:, 0] = False  # first token: forced full depth
    counts = torch.tensor([float(((r.exit_layers == l) & mask).sum()) for l in [1, 2, 3, 4]])
    n = counts.sum()
    freq = counts / n
    expected = stick_breaking(torch.sigmoid(torch.tensor(biases)))
    se = (expected * (1 - expected) / n).sqrt()
    assert n > 500
    assert bool(((freq - expected).abs() < 4 * se + 1e-3).all()), f"{freq} vs {expected} (4 standard errors)"


def test_stick_breaking_maths():
    c = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.3]])
    p = stick_breaking(c)
    torch.testing.assert_close(p[0], torch.tensor([0.5, 0.25, 0.125, 0.125]))
    torch.testing.assert_close(p[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    z = torch.randn(5, 7, 3)
    torch.testing.assert_close(exit_log_probs(z).exp(), stick_breaking(torch.sigmoid(z)))
    torch.testing.assert_close(exit_log_probs(z).exp().sum(-1), torch.ones(5, 7))


def test_rollout_accounting(tiny_ee):
    _eager_heads(tiny_ee)
    r = tiny_ee.generate(["Q: 1+2\n", "Q: 3+4\n"], 10, seed=5)
    L = tiny_ee.n_layers
    for i in range(2):
        m = r.mask[i]
        assert float(r.compute[i]) == pytest.approx(float((r.exit_layers[i][m].float() / L).mean()))
    assert torch.allclose(r.layers_saved, 1 - r.compute)
    assert float(r.exit_histogram().sum()) == pytest.approx(1.0)


def test_bad_prompts(tiny_ee):
    with pytest.raises(ValueError, match="empty"):
        tiny_ee.generate("", 5)
    with pytest.raises(ValueError, match="context of 256"):
        tiny_ee.generate("x" * 300, 5)
    with pytest.raises(ValueError, match="context"):
        tiny_ee.generate("x" * 250, 10)
    with pytest.raises(ValueError, match="mode"):
        tiny_ee.generate("x", 5, mode="maybe")


def test_hooks_never_leak_after_an_exception(tiny_ee):
    bridge = tiny_ee.model
    toks = _toks(bridge)
    before = bridge(toks).detach().clone()
    mine = bridge.hook_dict["blocks.0.hook_resid_post"]
    mine.add_hook(lambda x, hook: None)
    n_user = count_hooks(bridge)

    def boom(*a, **k):
        raise RuntimeError("injected")

    orig = tiny_ee.heads[1].forward
    tiny_ee.heads[1].forward = boom
    for call in (
        lambda: tiny_ee.prescribed_forward(toks, torch.full_like(toks, 4)),
        lambda: tiny_ee.generate("Q: 1+2\n", 4, seed=0),
    ):
        with pytest.raises(RuntimeError, match="injected"):
            call()
        assert count_hooks(bridge) == n_user, "an eetools hook stayed attached after an exception"
    tiny_ee.heads[1].forward = orig
    bridge.reset_hooks()
    assert count_hooks(bridge) == 0
    assert torch.equal(bridge(toks), before), "the base model changed"


def test_bf16_model_with_fp32_heads(tiny_folders):
    b = eetools.load_model(tiny_folders["qwen3"], dtype=torch.bfloat16)
    b.cfg.default_prepend_bos = True
    ee = eetools.attach_exit_heads(b, layers=[1, 2, 3])
    assert next(b.parameters()).dtype == torch.bfloat16 and next(ee.heads.parameters()).dtype == torch.float32
    _eager_heads(ee, 0.0)
    r = ee.generate(["Q: 1+2\n"], 8, seed=0)
    assert torch.isfinite(r.token_logprobs).all() and torch.isfinite(r.exit_logprobs).all()
    toks = b.to_tokens(["Q: 1+2\n"], prepend_bos=True)
    out = ee.prescribed_forward(toks, torch.full_like(toks, 4))
    assert out.logprobs.dtype == torch.float32 and out.exit_logits.dtype == torch.float32


def test_boolean_exit_layers_are_refused():
    # True == 1 and would pass as layer 1
    for layers in ([True, 2], [1, False]):
        with pytest.raises(ValueError, match="not booleans"):
            validate_exit_layers(layers, 4)
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="not booleans"):
        validate_exit_layers([np.True_, 2], 4)


def test_prompts_of_unknown_characters_warn(tiny_ee):
    import warnings

    with pytest.warns(UserWarning, match="prompt 1 has 3 characters unknown to the tokenizer, encoded as '<unk>'"):
        tiny_ee.generate(["Q: 1+2\n", "😀中文"], 2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_ee.generate("Q: 1+2\n", 2, seed=0)  # known characters: no warning
