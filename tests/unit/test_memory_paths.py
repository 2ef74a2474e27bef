"""The streamed training losses (issue 29) equal the vocabulary-at-once computation they replaced.

`_old_calibration_sums` and `_old_policy_terms` are the computations before the change, kept here
as references: every exit layer's and position's log-probs at once (`teacher_forward`,
`prescribed_forward`), the teacher's log-probs copied per exit sample.
"""

from __future__ import annotations

import pytest
import torch

from eetools.core.encoding import encode_sequences
from eetools.core.heads import exit_log_probs
from eetools.train import calibration
from eetools.train.calibration import (
    ONE_PASS_ELEMENTS,
    _exitable,
    calibration_sums,
    exit_targets,
    kl_student_teacher,
    one_pass_size,
)

LOSS_ATOL = 1e-5
GRAD_ATOL = 1e-5
"""Absolute tolerances of the losses and of every trainable parameter's gradient (float32 rounding)."""


@pytest.fixture()
def tiny_ee(tiny_ee):
    """The shared model on the bridge's path, where the references run: these tests compare the streaming
    alone (the fast forwards' rounding is `tests/unit/test_fast_forwards.py`'s)."""
    tiny_ee.fast_forwards = False
    return tiny_ee


def _old_calibration_sums(ee_model, ids, attn, predict, kl_factor, exit_samples, generator):
    """The loss terms as computed before issue 29 (one padded student pass)."""
    L, layers = ee_model.n_layers, ee_model.exit_layers
    with torch.no_grad():
        teacher = ee_model.teacher_forward(ids, attn)
        target = exit_targets(teacher.logprobs, teacher.early_logprobs, kl_factor)
    exitable = _exitable(predict)
    b, t = ids.shape
    draws = torch.multinomial(target.reshape(-1, target.shape[-1]).cpu(), exit_samples, True, generator=generator)
    sampled = torch.tensor([*layers, L])[draws].reshape(b, t, exit_samples).permute(2, 0, 1)
    sampled = torch.where(exitable.unsqueeze(0), sampled, torch.full_like(sampled, L))
    rep = lambda x: x.unsqueeze(0).expand(exit_samples, *x.shape).reshape(exit_samples * b, *x.shape[1:])
    flat_s = sampled.reshape(exit_samples * b, t)
    out = ee_model.prescribed_forward(rep(ids), flat_s, attention_mask=rep(attn))
    kl = kl_student_teacher(out.logprobs, rep(teacher.logprobs))
    logpi = exit_log_probs(out.exit_logits)
    kl_sum = (kl * rep(predict).float()).sum()
    idx = ee_model.exit_index(flat_s)
    nll_sum = -(logpi.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * rep(exitable).float()).sum()
    return kl_sum, nll_sum, target


def _grads(ee_model, loss):
    params = ee_model.trainable_parameters()
    for p in params:
        p.grad = None
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _lively(ee_model):
    """Heads at bias 0 (exits drawn everywhere) and LoRA adapters with non-zero B (a gradient through the base)."""
    from eetools.core.adapters import adapter_parameters, add_lora

    add_lora(ee_model, r=2, alpha=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for h in ee_model.heads:
            h.net[-1].bias.fill_(0.0)
        for p in adapter_parameters(ee_model):
            p.normal_(0, 0.05)
    for p in ee_model.trainable_parameters():
        p.requires_grad_(True)


@pytest.mark.parametrize("one_pass_elements", [0, ONE_PASS_ELEMENTS], ids=["streamed", "one_pass"])
@pytest.mark.parametrize("checkpoint_blocks", [False, True])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_streamed_calibration_equals_the_old_computation(
    tiny_ee, checkpoint_blocks, backward_inside, one_pass_elements
):
    """Also with `backward_scale`: each student chunk's backward run inside, as `calibration_step` does.

    Both paths of `calibration_sums`: streamed (``one_pass_elements=0``) and, the tiny model's
    step being far below the default budget, one pass.
    """
    _lively(tiny_ee)
    ids, attn, predict = encode_sequences(tiny_ee, ["Q: 1+2\n", "Q: 12345+678\n"], ["3", "1+8=9\n4+7=11\nA: 13023"])
    kl0, nll0, target0 = _old_calibration_sums(tiny_ee, ids, attn, predict, 4.0, 3, torch.Generator().manual_seed(0))
    g0 = _grads(tiny_ee, 0.5 * kl0 + 2 * nll0)
    gen = torch.Generator().manual_seed(0)
    kw = dict(checkpoint_blocks=checkpoint_blocks, one_pass_elements=one_pass_elements)
    if backward_inside:
        for p in tiny_ee.trainable_parameters():
            p.grad = None
        kl1, nll1, sums = calibration_sums(tiny_ee, ids, attn, predict, 4.0, 3, gen, backward_scale=(0.5, 2.0), **kw)
        assert not kl1.requires_grad and not nll1.requires_grad
        g1 = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tiny_ee.trainable_parameters()]
    else:
        kl1, nll1, sums = calibration_sums(tiny_ee, ids, attn, predict, 4.0, 3, gen, **kw)
        g1 = _grads(tiny_ee, 0.5 * kl1 + 2 * nll1)
    e = _exitable(predict).float().unsqueeze(-1)
    torch.testing.assert_close(sums["target"], (target0 * e).sum((0, 1)), rtol=0, atol=LOSS_ATOL)
    torch.testing.assert_close(kl1, kl0, rtol=0, atol=LOSS_ATOL)
    torch.testing.assert_close(nll1, nll0, rtol=0, atol=LOSS_ATOL)
    assert any(bool(g.abs().sum() > 0) for g in g0[len(tiny_ee.heads) * 2 :])  # the adapters get a gradient
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=GRAD_ATOL)


def _shape(vocab, exit_layers):
    from types import SimpleNamespace

    return SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(d_vocab=vocab)), exit_layers=list(exit_layers))


def test_one_pass_is_taken_only_for_small_vocabulary_sized_tensors():
    """The one-pass readout's element count, and where the default budget puts real shapes."""
    tiny = _shape(79, range(1, 8))  # the shipped reasoner
    assert one_pass_size(tiny, 8, 68, 4) == 8 * 68 * 79 * (7 + 1 + 4) <= ONE_PASS_ELEMENTS
    assert one_pass_size(tiny, 8, 409, 4) <= ONE_PASS_ELEMENTS  # a batch with long ToM traces
    assert one_pass_size(tiny, 16, 512, 8) <= ONE_PASS_ELEMENTS  # 16 sequences of 512 tokens, 8 exit samples
    qwen06 = _shape(151_936, range(1, 8))  # bench_memory's 0.6B shape, 8 blocks
    qwen4b = _shape(151_936, range(4, 36, 4))  # Qwen3-4B, 36 blocks, about 8 exitable layers
    for shape in (qwen06, qwen4b):
        assert one_pass_size(shape, 1, 8, 4) <= ONE_PASS_ELEMENTS  # a few tokens: small either way
        assert one_pass_size(shape, 1, 16, 4) > ONE_PASS_ELEMENTS
        assert one_pass_size(shape, 1, 256, 1) > ONE_PASS_ELEMENTS  # one exit sample of a short trace streams


@pytest.mark.parametrize("margin,streamed", [(-1, True), (0, False), (None, True)])
def test_calibration_sums_takes_the_path_its_budget_names(tiny_ee, monkeypatch, margin, streamed):
    """Streamed: readouts per span of positions, the student's under checkpoint; one pass: every position at once.

    `margin`: the budget relative to this batch's `one_pass_size` (None: budget 0).
    """
    _lively(tiny_ee)
    ids, attn, predict = encode_sequences(tiny_ee, ["Q: 1+2\n", "Q: 12345+678\n"], ["3", "1+8=9\n4+7=11\nA: 13023"])
    size = one_pass_size(tiny_ee, *ids.shape, 3)
    assert size == 2 * ids.shape[1] * tiny_ee.model.cfg.d_vocab * (len(tiny_ee.exit_layers) + 1 + 3)
    assert size <= ONE_PASS_ELEMENTS  # the tiny model's default: one pass
    calls = {"forward": 0, "readout": 0, "checkpoint": 0}

    def count(name, f):
        def wrapped(*a, **k):
            calls[name] += 1
            return f(*a, **k)

        return wrapped

    monkeypatch.setattr(tiny_ee, "final_residual", count("forward", tiny_ee.final_residual))
    monkeypatch.setattr(tiny_ee, "readout", count("readout", tiny_ee.readout))
    monkeypatch.setattr(calibration, "checkpoint", count("checkpoint", calibration.checkpoint))
    budget = 0 if margin is None else size + margin
    calibration_sums(
        tiny_ee,
        ids,
        attn,
        predict,
        4.0,
        3,
        torch.Generator().manual_seed(0),
        backward_scale=(1, 1),
        one_pass_elements=budget,
    )
    assert calls["forward"] == 1 + 3  # the teacher's, then one student pass per exit sample either way
    one_pass_readouts = 1 + len(tiny_ee.exit_layers) + 3  # teacher: final and each exit layer; student: each pass
    if streamed:
        assert calls["checkpoint"] > 0 and calls["readout"] > one_pass_readouts
    else:
        assert calls["checkpoint"] == 0 and calls["readout"] == one_pass_readouts


def _old_rl_objective(ee_model, rollout, task_reward, k, lam, beta):
    """RL's objective as computed before issue 29: one pass, reference and policy log-probs ``[b, n, vocab]``."""
    from eetools.train.rl import rloo_advantages

    P, n = rollout.prompt_tokens.shape[1], rollout.tokens.shape[1]
    seqs = torch.cat([rollout.prompt_tokens, rollout.tokens], 1)
    attn = torch.cat([rollout.prompt_mask, rollout.mask], 1).long()
    exits = rollout.prescribed_exit_layers()
    with torch.no_grad():
        ref = ee_model.teacher_forward(seqs, attn).logprobs[:, P - 1 : -1]
    out = ee_model.prescribed_forward(seqs, exits, attention_mask=attn)
    pol, z = out.logprobs[:, P - 1 : -1], out.exit_logits[:, P - 1 : -1]
    allowed = None if rollout.exit_allowed is None else rollout.exit_allowed[:, :n]
    tok_lp = pol.gather(-1, rollout.tokens[..., None]).squeeze(-1)
    ex_lp = exit_log_probs(z, allowed).gather(-1, ee_model.exit_index(rollout.exit_layers)[..., None]).squeeze(-1)
    ex_lp = torch.cat([torch.zeros_like(ex_lp[:, :1]), ex_lp[:, 1:]], 1)
    mask = rollout.mask.float()
    with torch.no_grad():
        kl = ((pol.exp() * (pol - ref)).sum(-1) * mask).sum(1) / mask.sum(1).clamp(min=1)
        adv = rloo_advantages((task_reward - beta * kl - lam * rollout.compute).view(-1, k)).view(-1)
    return -(adv * ((tok_lp + ex_lp) * mask).sum(1)).sum(), kl


@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_streamed_rl_terms_equal_the_old_computation(tiny_ee, checkpoint_blocks):
    import dataclasses

    from eetools.train.rl import rl_terms

    _lively(tiny_ee)
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(-0.5)
    r = tiny_ee.generate(["Q: 1+2\n", "Q: 1+2\n", "Q: 12345+678\nab", "Q: 12345+678\nab"], 10, seed=0)
    mask = r.mask.clone()
    mask[0, 4:] = False
    r = dataclasses.replace(r, mask=mask)
    reward = torch.tensor([1.0, 0.0, 0.0, 1.0])
    obj0, kl0 = _old_rl_objective(tiny_ee, r, reward, 2, 1.5, 0.25)
    g0 = _grads(tiny_ee, obj0)
    obj1, per = rl_terms(tiny_ee, r, reward, 2, 1.5, 0.25, checkpoint_blocks=checkpoint_blocks)
    g1 = _grads(tiny_ee, obj1)
    assert float(per["adv"].abs().sum()) > 0
    torch.testing.assert_close(obj1, obj0, rtol=0, atol=LOSS_ATOL)
    torch.testing.assert_close(per["kl"], kl0, rtol=0, atol=LOSS_ATOL)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=GRAD_ATOL)


@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_checkpointed_policy_pass_keeps_a_few_residuals_per_block_and_token(tiny_ee, checkpoint_blocks):
    """With activation checkpointing, what the policy pass keeps for its backward grows like the blocks'
    inputs (norms, attention, MLP and exit heads recompute theirs): about 4 residual-sized tensors per
    block and token; without it, several times that (the heads alone keep float32 copies of their input,
    norm and hidden layer at every exitable layer)."""
    _lively(tiny_ee)
    ids = torch.randint(4, tiny_ee.model.cfg.d_vocab, (2, 24))
    exits = torch.full_like(ids, tiny_ee.n_layers)
    exits[:, 12:] = tiny_ee.exit_layers[1]
    params = {p.untyped_storage().data_ptr() for p in tiny_ee.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:  # a parameter is there anyway: only what the pass adds counts
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        resid, z, _ = tiny_ee.final_residual(ids, exit_at=exits, checkpoint_blocks=checkpoint_blocks)
    (resid.float().pow(2).mean() + z.float().mean()).backward()  # the graph is a real one
    residual = ids.numel() * tiny_ee.model.cfg.d_model * resid.element_size()
    per_block = sum(saved.values()) / residual / tiny_ee.n_layers
    # checkpointed: the inputs of the two norms, attention and MLP (4; Qwen3 shares one) and a few small tensors
    assert (per_block < 4.5) == checkpoint_blocks, per_block


def test_length_groups_cut_a_mixed_batch_where_padding_costs_more_than_a_forward():
    from eetools.train.calibration import length_groups

    lengths = torch.tensor([45, 300, 40, 310, 44, 290])
    groups = length_groups(lengths, cost=128)
    assert [sorted(g.tolist()) for g in groups] == [[1, 3, 5], [0, 2, 4]]  # the stories, then the sums
    assert [g.tolist() for g in length_groups(lengths, cost=10**6)] == [[3, 1, 5, 0, 4, 2]]  # one padded pass
    assert sorted(torch.cat(length_groups(lengths, cost=0)).tolist()) == list(range(6))  # every row once


def test_teacher_targets_in_length_groups_equal_one_padded_pass(tiny_ee, monkeypatch):
    """The teacher runs in groups of similar length (`length_groups`); at every real position its targets
    and logits are those of one forward of the whole right-padded batch."""
    from eetools.train import calibration

    ids, attn, _ = encode_sequences(
        tiny_ee, ["Q: 1+2\n", "Q: 12345+678\n", "Q: 5+5\n"], ["3", "1+8=9\n4+7=11\nA: 13023", "A: 10"]
    )
    monkeypatch.setattr(calibration, "GROUP_COST_POSITIONS", 10**6)
    one_t, one_z = calibration.streamed_targets(tiny_ee, ids, attn, 4.0)
    monkeypatch.setattr(calibration, "GROUP_COST_POSITIONS", 0)
    calls = []
    real = tiny_ee.final_residual
    monkeypatch.setattr(tiny_ee, "final_residual", lambda *a, **k: (calls.append(a[0].shape), real(*a, **k))[1])
    grp_t, grp_z = calibration.streamed_targets(tiny_ee, ids, attn, 4.0)
    assert len(calls) > 1 and min(s[1] for s in calls) < ids.shape[1]  # several forwards, each cut to its rows
    m = attn.bool()
    torch.testing.assert_close(grp_t[m], one_t[m], rtol=0, atol=LOSS_ATOL)
    torch.testing.assert_close(grp_z[m], one_z[m], rtol=0, atol=LOSS_ATOL)
    assert torch.allclose(grp_t.sum(-1), torch.ones_like(grp_t.sum(-1)))  # padding too holds a distribution
