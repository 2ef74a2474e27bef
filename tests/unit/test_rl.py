"""RLOO: advantages by hand, guard rails, a short run, resume."""

import math

import pytest
import torch

from eetools.train.rl import RewardError, rl_terms, rloo_advantages, train_rl

FAST = dict(prompts_per_step=2, k=2, max_new_tokens=6, eval_every=0, progress=False, lr=1e-2)


def test_rloo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0]])
    a = rloo_advantages(r)
    torch.testing.assert_close(a[0], torch.tensor([1 - 0.25, 0 - 0.75, 0.5 - 0.5]))
    assert torch.equal(a[1], torch.zeros(3))
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.ones(3, 1))
    r2 = torch.full((2, 4), 0.1 + 0.2)  # flat groups with awkward floats: exactly zero
    assert torch.equal(rloo_advantages(r2), torch.zeros(2, 4))


def _params(ee):
    return [p.detach().clone() for p in ee.trainable_parameters()]


@pytest.mark.parametrize("token_term", [True, False])
def test_chunked_and_prompt_shared_terms_equal_one_pass(tiny_ee, token_term):
    """Rollouts of different prompt and completion lengths, cut into chunks, each prompt run once for its
    rollouts (its KV cache copied to them): the objective, values and gradients of one plain pass."""
    import dataclasses

    from eetools.core.adapters import adapter_parameters, add_lora

    add_lora(tiny_ee, r=2)  # gradients must reach the adapters through the shared prompts' cache
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(-0.5)
        for p in adapter_parameters(tiny_ee):  # lora_B starts at 0: make the adapters change the model
            p.normal_(std=0.3)
    prompts = ["Q: 1+2\n", "Q: 1+2\n", "Q: 12345+678\nab cd", "Q: 12345+678\nab cd", "Q: 9+99\nx", "Q: 9+99\nx"]
    r = tiny_ee.generate(prompts, 12, seed=0)
    mask = r.mask.clone()
    mask[0, 5:] = False  # as if rows 0 and 3 had stopped at EOS early
    mask[3, 9:] = False
    r = dataclasses.replace(r, mask=mask)
    reward = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    params = tiny_ee.trainable_parameters()
    results = []
    # first the reference: one pass over every prompt and completion; then chunks, prompts shared or not
    for chunk_rows, share in ((None, False), (None, True), (1, True), (4, True), (4, False)):
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        objective, per = rl_terms(
            tiny_ee, r, reward, 2, 1.5, 0.25, token_term=token_term, chunk_rows=chunk_rows, share_prompts=share
        )
        objective.backward()
        results.append(
            (objective.detach(), per, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
        )
    (obj, per, grads), others = results[0], results[1:]
    assert float(per["adv"].abs().sum()) > 0, "the test needs a non-flat group"
    assert float(per["kl"].min()) > 0, "the adapters should move the policy away from the reference"
    n_heads = len(list(tiny_ee.heads.parameters()))
    assert any(float(g.abs().sum()) > 0 for g in grads[n_heads:]), "the adapters should get a gradient"
    for o, pr, gr in others:
        torch.testing.assert_close(o, obj, rtol=1e-5, atol=1e-5)
        for key in per:
            torch.testing.assert_close(pr[key], per[key], rtol=1e-5, atol=1e-5)
        for a, b in zip(gr, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_k_equal_one_is_a_configuration_error(tiny_ee):
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        train_rl(tiny_ee, "addition", steps=1, **{**FAST, "k": 1})


def test_flat_rewards_leave_parameters_unchanged(tiny_ee):
    before = _params(tiny_ee)
    # constant task reward and no exit cost/KL differences would still vary; make everything flat:
    res = train_rl(
        tiny_ee, "addition", steps=2, reward_fn=lambda e, c: 1.0, lam=0.0, beta=0.0, temperature=0.0, **{**FAST}
    )
    assert (res.history["flat_groups"] == 1.0).all()
    for a, b in zip(before, _params(tiny_ee)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, "x"])
def test_bad_rewards_are_reported_and_weights_untouched(tiny_ee, bad):
    before = _params(tiny_ee)
    with pytest.raises(RewardError, match="sample 0"):
        train_rl(tiny_ee, "addition", steps=1, reward_fn=lambda e, c: bad, **FAST)
    for a, b in zip(before, _params(tiny_ee)):
        assert torch.equal(a, b)


def test_raising_reward_names_the_completion(tiny_ee):
    def boom(e, c):
        raise KeyError("verifier broke")

    with pytest.raises(RewardError, match="completion .*verifier broke"):
        train_rl(tiny_ee, "addition", steps=1, reward_fn=boom, **FAST)


def test_short_run_updates_heads_and_logs_history(tiny_ee):
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(-0.5)
    before = _params(tiny_ee)
    res = train_rl(tiny_ee, "addition", steps=3, reward_fn=lambda e, c: float(len(c) % 3), **FAST)
    h = res.history
    assert len(h) == 3
    for col in (
        "reward",
        "task",
        "kl",
        "exitcost",
        "accuracy",
        "compute",
        "layers_saved",
        "coherence",
        "adv_std",
        "length",
    ):
        assert col in h.columns and h[col].notna().all()
    assert (h["kl"] >= -1e-6).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(tiny_ee)))


def test_resume_is_identical(tiny_folders, tmp_path):
    import eetools

    def fresh():
        b = eetools.load_model(tiny_folders["qwen3"])
        b.cfg.default_prepend_bos = True
        torch.manual_seed(0)
        ee = eetools.attach_exit_heads(b, layers=[1, 2, 3])
        with torch.no_grad():
            for h in ee.heads:
                h.net[-1].bias.fill_(-0.5)
        return ee

    rf = lambda e, c: float(len(c) % 3)
    kw = {**FAST, "checkpoint_every": 2, "reward_fn": rf}
    full = train_rl(fresh(), "addition", steps=4, **kw)
    train_rl(fresh(), "addition", steps=2, checkpoint_dir=tmp_path / "ck", **kw)
    res = train_rl(fresh(), "addition", steps=4, checkpoint_dir=tmp_path / "ck", **kw)
    for a, b in zip(full.ee_model.trainable_parameters(), res.ee_model.trainable_parameters()):
        assert torch.equal(a, b)
    assert list(full.history["reward"]) == list(res.history["reward"])
    with pytest.raises(ValueError, match="lam"):
        train_rl(fresh(), "addition", steps=4, checkpoint_dir=tmp_path / "ck", **{**kw, "lam": 0.5})
    with pytest.raises(ValueError, match="trained on 'addition', this run trains on 'addition\\+tom'"):
        train_rl(fresh(), "addition+tom", steps=4, checkpoint_dir=tmp_path / "ck", **kw)


def test_exit_cost_alone_pushes_exit_probabilities_up(tiny_ee):
    """With reward = -exitcost only, RLOO must make the heads exit more."""
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(-1.0)
    toks = tiny_ee.model.to_tokens(["Q: 12+34\n1+4+0=5\n"], prepend_bos=True)

    def mean_exit_prob():
        with torch.no_grad():
            out = tiny_ee.prescribed_forward(toks, torch.full_like(toks, tiny_ee.n_layers))
            return float(1 - out.exit_logprobs()[..., -1].exp().mean())  # P(exit somewhere)

    before = mean_exit_prob()
    train_rl(
        tiny_ee,
        "addition",
        steps=6,
        reward_fn=lambda e, c: 0.0,
        lam=1.0,
        beta=0.0,
        **{**FAST, "k": 4, "max_new_tokens": 8, "lr": 3e-2},
    )
    assert mean_exit_prob() > before + 0.02


def test_head_lr_moves_heads_at_their_own_rate(tiny_ee):
    """`head_lr` trains the heads at their own rate; the adapters keep `lr` (here ~0: they stay put)."""
    from eetools.core.adapters import adapter_parameters, add_lora

    add_lora(tiny_ee, r=2)
    heads0 = [p.detach().clone() for p in tiny_ee.heads.parameters()]
    lora0 = [p.detach().clone() for p in adapter_parameters(tiny_ee)]
    train_rl(
        tiny_ee, "addition", steps=2, reward_fn=lambda e, c: float(len(c) % 3), **{**FAST, "lr": 1e-12, "head_lr": 1e-2}
    )
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(heads0, tiny_ee.heads.parameters()))
    assert all((a - b).abs().max() < 1e-9 for a, b in zip(lora0, adapter_parameters(tiny_ee)))
    with pytest.raises(ValueError, match="head_lr must be a finite number >= 0"):
        train_rl(tiny_ee, "addition", steps=1, **{**FAST, "head_lr": -1.0})


def test_frozen_adapters_stay_exact_while_the_heads_learn(tiny_ee):
    """`train_adapters=False`: RL moves only the heads; a later calibration trains the adapters again."""
    from eetools.core.adapters import adapter_parameters, add_lora
    from eetools.train.calibration import calibrate

    add_lora(tiny_ee, r=2)
    heads0 = [p.detach().clone() for p in tiny_ee.heads.parameters()]
    lora0 = [p.detach().clone() for p in adapter_parameters(tiny_ee)]
    train_rl(tiny_ee, "addition", steps=2, reward_fn=lambda e, c: float(len(c) % 3), train_adapters=False, **FAST)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(heads0, tiny_ee.heads.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(lora0, adapter_parameters(tiny_ee)))
    assert all(p.grad is None for p in adapter_parameters(tiny_ee)), "frozen adapters keep no gradients"
    calibrate(tiny_ee, "addition", steps=2, batch_size=2, max_new_tokens=6, lr=1e-2, progress=False)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(lora0, adapter_parameters(tiny_ee)))


def test_checkpoint_from_before_an_option_existed_resumes_with_its_default(tiny_ee, tmp_path):
    """A checkpoint written before `head_lr` existed ran with its default: resuming with it works, not without."""
    import json

    kw = {**FAST, "reward_fn": lambda e, c: float(len(c) % 3), "checkpoint_every": 1}
    train_rl(tiny_ee, "addition", steps=1, checkpoint_dir=tmp_path / "ck", **kw)
    record = tmp_path / "ck" / "trainer.json"
    saved = json.loads(record.read_text())
    del saved["config"]["head_lr"]
    record.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"head_lr \(saved 0.0, now 0.01\)"):
        train_rl(tiny_ee, "addition", steps=2, checkpoint_dir=tmp_path / "ck", **{**kw, "head_lr": 1e-2})
    res = train_rl(tiny_ee, "addition", steps=2, checkpoint_dir=tmp_path / "ck", **kw)
    assert list(res.history["step"]) == [1, 2]


def test_non_finite_loss_stops_after_saving_a_checkpoint(tiny_ee, tmp_path):
    """A NaN exit head: the run stops at step 0 naming it, saves where it stopped, and applies no update."""
    with torch.no_grad():
        tiny_ee.heads[0].net[-1].bias.fill_(float("nan"))
    before = _params(tiny_ee)
    with pytest.raises(FloatingPointError, match=r"step 0 .*state before step 0 is saved in"):
        train_rl(
            tiny_ee,
            "addition",
            steps=2,
            reward_fn=lambda e, c: float(len(c) % 3),
            checkpoint_dir=tmp_path / "ck",
            **FAST,
        )
    assert (tmp_path / "ck" / "trainer.json").exists(), "checkpoint saved before stopping"
    for a, b in zip(before, _params(tiny_ee)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), "no optimizer step may be applied"


def test_rl_with_adapters_leaves_the_base_weights_exact(tiny_ee):
    """Rollouts fold LoRA into the base weights for speed; after training the base weights are bit for bit the same."""
    from eetools.core.adapters import adapter_parameters, add_lora

    add_lora(tiny_ee, r=2)
    base = {n: p.detach().clone() for n, p in tiny_ee.model.named_parameters() if "lora_" not in n}
    lora = [p.detach().clone() for p in adapter_parameters(tiny_ee)]
    train_rl(tiny_ee, "addition", steps=2, reward_fn=lambda e, c: float(len(c) % 3), **FAST)
    assert any(not torch.equal(a, b) for a, b in zip(lora, adapter_parameters(tiny_ee))), "the adapters did not train"
    for n, p in tiny_ee.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"base weight {n} changed"


def test_total_exit_cost_charges_every_token_where_the_mean_rewards_cheap_ones():
    """Hand-made rollouts of an 8-block model, cap 10: a short deep answer and the same answer after
    four cheap (layer-2) tokens. The mean cost falls with the cheap tokens, the total cost rises."""
    from types import SimpleNamespace

    from eetools.train.rl import exit_costs

    exit_layers = torch.tensor([[8, 8, 0, 0, 0, 0], [2, 2, 2, 2, 8, 8]])
    mask = torch.tensor([[True, True, False, False, False, False], [True] * 6])
    r = SimpleNamespace(exit_layers=exit_layers, mask=mask, n_layers=8)
    torch.testing.assert_close(exit_costs(r, "mean"), torch.tensor([1.0, (4 * 0.25 + 2) / 6]))
    torch.testing.assert_close(exit_costs(r, "total", cap=10), torch.tensor([2 / 10, 3 / 10]))
    torch.testing.assert_close(exit_costs(r, "total"), torch.tensor([2 / 6, 3 / 6]))  # cap: the rollout's width
    mean, total = exit_costs(r, "mean"), exit_costs(r, "total", cap=10)
    assert mean[1] < mean[0] and total[1] > total[0]
    with pytest.raises(ValueError, match="exit cost must be one of"):
        exit_costs(r, "sum")


def test_exit_cost_option_is_checked_and_reaches_the_reward(tiny_ee):
    from eetools.core.options import validate_config
    from eetools.train.rl import RLConfig

    with pytest.raises(ValueError, match="exit_cost must be one of 'mean', 'total'"):
        validate_config(RLConfig(exit_cost="sum"))
    costs = {}
    for kind in ("mean", "total"):
        res = train_rl(tiny_ee, "addition", steps=1, lam=1.0, beta=0.0, seed=3, exit_cost=kind, **FAST)
        costs[kind] = res.history["exitcost"].iloc[0]
        assert res.config.exit_cost == kind
    # FAST caps generation at 6 tokens: total = mean * n_tokens / 6 <= mean, equal only for full-length rollouts
    assert costs["total"] <= costs["mean"] + 1e-9
