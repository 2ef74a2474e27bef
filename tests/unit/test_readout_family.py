"""The readout family (eetools.core.lenses): LogitLens, TunedLens, and exits read out through them."""

from __future__ import annotations

import pytest
import torch

from eetools.core.lens import capture_residuals, lens_logits
from eetools.core.lenses import LogitLens, TunedLens


def _tokens(ee):
    return ee.model.to_tokens(["Q: 12+34\n", "Q: 5+6\nA"], prepend_bos=True, padding_side="left")


def _perturbed(ee, scale: float = 0.3) -> TunedLens:
    """A tuned lens at the exitable layers with random (non-identity) translators."""
    lens = TunedLens(int(ee.model.cfg.d_model), ee.exit_layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in lens.translators.values():
            t.weight.copy_(scale * torch.randn(t.weight.shape, generator=g) / t.weight.shape[0] ** 0.5)
            t.bias.copy_(scale * torch.randn(t.bias.shape, generator=g))
    return lens


@torch.no_grad()
def test_a_tuned_lens_at_identity_equals_the_logit_lens_exactly(tiny_ee):
    toks = _tokens(tiny_ee)
    store = capture_residuals(tiny_ee, toks, tiny_ee.exit_layers)
    logit, tuned = LogitLens(), TunedLens(int(tiny_ee.model.cfg.d_model), tiny_ee.exit_layers)
    for l in tiny_ee.exit_layers:
        want = lens_logits(tiny_ee.model, store[l])
        assert torch.equal(logit.logits(tiny_ee.model, store[l], l), want)
        assert torch.equal(tuned.logits(tiny_ee.model, store[l], l), want)
    exits = torch.full_like(toks, tiny_ee.n_layers)
    exits[:, -3:] = tiny_ee.exit_layers[0]
    before = tiny_ee.prescribed_forward(toks, exits).logprobs
    tiny_ee.set_readout(TunedLens(int(tiny_ee.model.cfg.d_model), tiny_ee.exit_layers))
    assert torch.equal(tiny_ee.prescribed_forward(toks, exits).logprobs, before)


@torch.no_grad()
def test_an_exited_token_reads_out_through_the_tuned_lens_at_its_layer(tiny_ee):
    toks = _tokens(tiny_ee)
    lens = tiny_ee.set_readout(_perturbed(tiny_ee))
    L, (a, b, c) = tiny_ee.n_layers, tiny_ee.exit_layers
    exits = torch.full_like(toks, L)
    exits[0, -2], exits[1, -1], exits[1, -3] = a, b, c
    logits, _, _, _ = tiny_ee.run_with_exits(toks, exit_at=exits)
    # the frozen residual of each exited position is its residual entering its exit layer under the same exits
    ref = LogitLens()
    tiny_ee.set_readout(ref)
    from eetools.core.lens import capturing

    with capturing(tiny_ee, [a, b, c]) as store:
        plain, _, _, _ = tiny_ee.run_with_exits(toks, exit_at=exits)
        store = dict(store)
    for (row, pos), l in [((0, -2), a), ((1, -1), b), ((1, -3), c)]:
        want = lens_logits(tiny_ee.model, lens.translate(store[l][row, pos], l))
        torch.testing.assert_close(logits[row, pos], want)
        assert not torch.allclose(logits[row, pos], plain[row, pos])  # the translator did change it
    # positions that did not exit (and every position before the first exit) are untouched
    keep = exits == L
    torch.testing.assert_close(logits[keep], plain[keep])


@torch.no_grad()
def test_later_positions_keys_and_values_do_not_depend_on_the_readout(tiny_ee):
    toks = _tokens(tiny_ee)
    exits = torch.full_like(toks, tiny_ee.n_layers)
    exits[:, 3:6] = tiny_ee.exit_layers[0]
    names = [f"blocks.{j}.attn.hook_{kv}" for j in range(tiny_ee.n_layers) for kv in ("k", "v")]
    names = [n for n in names if n in tiny_ee.model.hook_dict]
    assert names, "the bridge names no key/value hooks"

    def keys_values():
        got = {}
        hooks = [(n, lambda t, hook, n=n: got.__setitem__(n, t.clone())) for n in names]
        with tiny_ee.model.hooks(fwd_hooks=hooks):
            logits, _, _, cache = tiny_ee.run_with_exits(toks, exit_at=exits, use_cache=True)
        return got, logits

    kv_logit, logits_logit = keys_values()
    tiny_ee.set_readout(_perturbed(tiny_ee))
    kv_tuned, logits_tuned = keys_values()
    for n in names:
        assert torch.equal(kv_logit[n], kv_tuned[n]), n
    later = exits == tiny_ee.n_layers
    torch.testing.assert_close(logits_logit[later], logits_tuned[later])
    assert not torch.allclose(logits_logit[~later], logits_tuned[~later])


@pytest.mark.parametrize("skip", ["mask", "compute"])
def test_generation_with_a_tuned_readout_matches_its_prescribed_replay(tiny_ee, skip):
    """Cached decoding under a tuned readout (either skip path) scores its tokens as a prescribed replay does."""
    with torch.no_grad():
        for h in tiny_ee.heads:  # heads that exit often
            h.net[-1].bias.fill_(0.0)
    tiny_ee.set_readout(_perturbed(tiny_ee))
    prompts = ["Q: 12+34\n", "Q: 1+2\nab c"]
    a = tiny_ee.generate(prompts, 12, seed=3, skip=skip)
    assert (a.exit_layers < tiny_ee.n_layers).any(), "test needs some exits"
    out = tiny_ee.prescribed_forward(a.sequences, a.prescribed_exit_layers(), attention_mask=a.attention_mask)
    P = a.prompt_tokens.shape[1]
    tok_lp = out.logprobs.to(a.tokens.device)[:, P - 1 : -1].gather(-1, a.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(tok_lp * a.mask, a.token_logprobs, atol=1e-4, rtol=0)


def test_bad_readouts_are_refused_in_one_line(tiny_ee):
    with pytest.raises(ValueError, match="lacks translators for layers \\[3\\]"):
        tiny_ee.set_readout(TunedLens(int(tiny_ee.model.cfg.d_model), [1, 2]))
    with pytest.raises(ValueError, match="readout must be one of"):
        tiny_ee.set_readout("fancy")
    with pytest.raises(ValueError, match="not for layer 5"):
        TunedLens(8, [1, 2]).translate(torch.zeros(8), 5)


@torch.no_grad()
def test_calibration_targets_read_out_through_the_exit_readout(tiny_ee):
    from eetools.train.calibration import exit_targets, streamed_targets

    toks = _tokens(tiny_ee)
    attn = torch.ones_like(toks)
    logit_targets, _ = streamed_targets(tiny_ee, toks, attn, kl_factor=4.0)
    tiny_ee.set_readout(_perturbed(tiny_ee))
    tuned_targets, _ = streamed_targets(tiny_ee, toks, attn, kl_factor=4.0)
    teacher = tiny_ee.teacher_forward(toks, attn)
    want = exit_targets(teacher.logprobs, teacher.early_logprobs, 4.0)
    torch.testing.assert_close(tuned_targets, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(tuned_targets, logit_targets, atol=1e-3), "the targets ignored the tuned readout"


def test_analyses_read_out_through_the_readout_they_are_given(tiny_ee):
    """oracle_exits, depth_necessity and lens_topk: the logit lens by default, a given readout, or "exit"."""
    from eetools.analysis.probes.oracle import depth_necessity, oracle_exits
    from eetools.core.lens import capturing
    from eetools.core.readouts import lens_topk

    pairs = [("Q: 12+34\n", "A: 46"), ("Q: 5+6\n", "A: 11 x")]
    lens = _perturbed(tiny_ee, scale=1.0)
    default = oracle_exits(tiny_ee, pairs, base=True).df
    assert oracle_exits(tiny_ee, pairs, base=True, readout=LogitLens()).df.equals(default)
    tuned = oracle_exits(tiny_ee, pairs, base=True, readout=lens).df
    tiny_ee.set_readout(lens)
    assert oracle_exits(tiny_ee, pairs, base=True, readout="exit").df.equals(tuned)
    assert oracle_exits(tiny_ee, pairs, base=True).df.equals(default)  # the default stays the logit lens
    assert not tuned["oracle_layer"].equals(default["oracle_layer"]), "the perturbed lens changed no oracle exit"
    d_logit = depth_necessity(tiny_ee, pairs, base=True).df
    d_tuned = depth_necessity(tiny_ee, pairs, base=True, readout=lens).df
    assert (d_logit["kl"] >= 0).all() and not d_logit["kl"].equals(d_tuned["kl"])
    # lens_topk: each layer's top-1 is the argmax of the readout of the residual entering it
    ids = tiny_ee.model.to_tokens("Q: 12+34\nA: 46", prepend_bos=True)
    layers = tiny_ee.exit_layers
    top = lens_topk(tiny_ee, ids, range(ids.shape[1]), layers, k=1, readout=lens)
    with torch.no_grad(), capturing(tiny_ee, layers) as store:
        tiny_ee.model(ids, return_type="logits")
        store = dict(store)
    for i, l in enumerate(layers):
        want = lens.logits(tiny_ee.model, store[l][0], l).argmax(-1).cpu()
        assert torch.equal(top.ids[i, :, 0], want), l


@torch.no_grad()
def test_the_explorer_reads_exitable_layers_through_the_exit_readout(tiny_ee):
    from eetools.core.lens import capture_residuals
    from eetools.views.widgets import token_details

    r = tiny_ee.generate(["Q: 12+34\n"], 6, seed=0, temperature=0)
    logit = token_details(tiny_ee, r, 0, 2).lens
    lens = tiny_ee.set_readout(_perturbed(tiny_ee, scale=1.0))
    tuned = token_details(tiny_ee, r, 0, 2).lens
    pos = r.prompt_tokens.shape[1] - 1 + 2
    store = capture_residuals(tiny_ee, r.sequences, tiny_ee.exit_layers, attention_mask=r.attention_mask)
    for l in tiny_ee.exit_layers:
        want = lens.logits(tiny_ee.model, store[l][0, pos], l).float().softmax(-1).max()
        assert tuned.loc[tuned.layer == l, "p_top1"].item() == pytest.approx(float(want), rel=1e-4), l
    assert not tuned["p_top1"].equals(logit["p_top1"])
