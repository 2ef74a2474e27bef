"""Thresholded exits with patience: a token exits only where the logit lens's top token has held for
`patience` exitable layers (the heads' threshold still has to be reached); with sampled exits the rule masks
the exit action, and RL trains the masked policy."""

import math

import pytest
import torch

import eetools
import eetools.analysis.evaluation
from eetools.cli import main
from eetools.io.exit_checkpoint import save_exit_model


def _constant_heads(ee, p):
    """Every head gives ``c = p`` whatever it reads."""
    with torch.no_grad():
        for h in ee.heads:
            h.net[-1].weight.zero_()
            h.net[-1].bias.fill_(math.log(p / (1 - p)))


def _replayed_lens(ee, rollout):
    """Top lens token at each exitable layer for every generated token, by a teacher-forced replay of the
    rollout with its exits prescribed ``[new, n_exit]`` (one unpadded prompt)."""
    L, n_new = ee.n_layers, rollout.tokens.shape[1]
    tokens = torch.cat([rollout.prompt_tokens, rollout.tokens], 1)
    exit_at = torch.full_like(tokens, L)
    start = rollout.prompt_tokens.shape[1] - 1  # the position that predicts the first generated token
    exit_at[0, start : start + n_new] = rollout.exit_layers[0]
    resid = {}
    hooks = [(f"blocks.{l}.hook_resid_pre", lambda x, hook, l=l: resid.__setitem__(l, x)) for l in ee.exit_layers]
    with torch.no_grad(), ee.model.hooks(fwd_hooks=hooks):
        ee(tokens, exit_layers=exit_at)
    return torch.stack([ee.readout(resid[l][0, start : start + n_new]).argmax(-1) for l in ee.exit_layers], -1)


def _replayed_top_probability(ee, rollout):
    """Like `_replayed_lens`, the lens's top probability ``[new, n_exit]``."""
    L, n_new = ee.n_layers, rollout.tokens.shape[1]
    tokens = torch.cat([rollout.prompt_tokens, rollout.tokens], 1)
    exit_at = torch.full_like(tokens, L)
    start = rollout.prompt_tokens.shape[1] - 1
    exit_at[0, start : start + n_new] = rollout.exit_layers[0]
    resid = {}
    hooks = [(f"blocks.{l}.hook_resid_pre", lambda x, hook, l=l: resid.__setitem__(l, x)) for l in ee.exit_layers]
    with torch.no_grad(), ee.model.hooks(fwd_hooks=hooks):
        ee(tokens, exit_layers=exit_at)
    return torch.stack(
        [ee.readout(resid[l][0, start : start + n_new]).float().softmax(-1).amax(-1) for l in ee.exit_layers], -1
    )


@pytest.mark.parametrize("skip", ["mask", "compute"])
def test_a_token_exits_at_the_first_layer_where_the_lens_has_held(tiny_ee, skip):
    _constant_heads(tiny_ee, 0.9)  # the threshold always holds: only patience decides
    r = tiny_ee.generate(
        "Q: 12+34\n", 12, mode="threshold", threshold=0.5, patience=1, temperature=0, seed=0, skip=skip
    )
    lens = _replayed_lens(tiny_ee, r)
    L, layers = tiny_ee.n_layers, tiny_ee.exit_layers
    for k in range(1, int(r.mask[0].sum())):  # the first token comes from the prompt, which never exits
        held = [i for i in range(1, len(layers)) if lens[k, i] == lens[k, i - 1]]
        assert r.exit_layers[0, k] == (layers[held[0]] if held else L)
    without = tiny_ee.generate("Q: 12+34\n", 12, mode="threshold", threshold=0.5, temperature=0, seed=0, skip=skip)
    assert set(without.exit_layers[0, 1 : int(without.mask[0].sum())].tolist()) == {layers[0]}


def test_patience_never_exits_earlier_and_the_threshold_still_applies(tiny_ee):
    kw = dict(mode="threshold", temperature=0, seed=0, skip="compute")
    _constant_heads(tiny_ee, 0.3)
    assert (tiny_ee.generate("Q: 7+8\n", 8, threshold=0.5, patience=1, **kw).exit_layers == tiny_ee.n_layers).all()
    _constant_heads(tiny_ee, 0.9)
    one = tiny_ee.generate(["Q: 7+8\n", "Q: 41+9\n"], 8, threshold=0.5, patience=1, **kw)
    two = tiny_ee.generate(["Q: 7+8\n", "Q: 41+9\n"], 8, threshold=0.5, patience=2, **kw)
    assert (one.exit_layers[one.mask] >= tiny_ee.exit_layers[1]).all()
    assert (two.exit_layers[two.mask] >= tiny_ee.exit_layers[2]).all()


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(mode="off", patience=1), ValueError, "never exits"),
        (dict(mode="threshold", patience=3), ValueError, r"0 \.\. 2"),
        (dict(mode="threshold", patience=-1), ValueError, r"0 \.\. 2"),
        (dict(mode="threshold", patience=1.0), TypeError, "must be an int"),
    ],
)
def test_bad_patience_is_refused(tiny_ee, kw, error, match):
    with pytest.raises(error, match=match):
        tiny_ee.generate("Q: 1+2\n", 4, **kw)
    with pytest.raises(error, match=match):
        eetools.analysis.evaluation.evaluate(tiny_ee, "addition", n=2, progress=False, **kw)


def test_tradeoff_and_the_command_line_take_patience(tiny_folders, tmp_path, capsys):
    ee = eetools.attach_exit_heads(eetools.load_model(tiny_folders["qwen3"]), layers=[1, 2, 3])
    _constant_heads(ee, 0.9)
    res = eetools.tradeoff(ee, "addition", thresholds=[0.5], n=2, sample=False, patience=1, progress=False)
    plain = eetools.tradeoff(ee, "addition", thresholds=[0.5], n=2, sample=False, progress=False)
    saved = {name: r.df.set_index("system").loc["threshold", "layers_saved"] for name, r in [("p", res), ("0", plain)]}
    assert saved["p"] <= saved["0"]
    folder = tmp_path / "ee"
    save_exit_model(ee, folder)
    assert (
        main(
            [
                "evaluate",
                "--exit-model",
                str(folder),
                "--n",
                "2",
                "--mode",
                "off",
                "--patience",
                "1",
                "--out",
                str(tmp_path / "ev"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "never exits" in capsys.readouterr().err


def test_sampled_exits_with_patience_follow_the_masked_policy(tiny_ee):
    """Sampled exits happen only where the lens held, and their recorded log-probs are the masked
    stick-breaking's."""
    from eetools.core.heads import exit_log_probs

    _constant_heads(tiny_ee, 0.6)
    L, layers = tiny_ee.n_layers, tiny_ee.exit_layers
    z = torch.full((len(layers),), math.log(0.6 / 0.4))
    vetoed = 0
    for prompt in ("Q: 12+34\n", "Q: 5+67\n"):
        r = tiny_ee.generate(prompt, 12, mode="sample", patience=1, temperature=0, seed=3)
        assert r.exit_allowed is not None and r.patience == 1
        lens = _replayed_lens(tiny_ee, r)
        for k in range(1, int(r.mask[0].sum())):
            held = torch.tensor([i > 0 and bool(lens[k, i] == lens[k, i - 1]) for i in range(len(layers))])
            exited = int(r.exit_layers[0, k])
            upto = layers.index(exited) + 1 if exited < L else len(layers)  # the layers the token was decided at
            assert torch.equal(r.exit_allowed[0, k, :upto], held[:upto])
            assert exited == L or held[layers.index(exited)]  # never exits where the lens moved
            want = exit_log_probs(z, held)[int(tiny_ee.exit_index(torch.tensor(exited)))]
            assert math.isclose(float(r.exit_logprobs[0, k]), float(want), rel_tol=1e-5)
            vetoed += int((~held[:upto]).sum())
    assert vetoed > len(layers), "the test needs vetoes beyond the first layer's"


@pytest.mark.parametrize("rules", [dict(patience=1), dict(min_confidence=0.05), dict(patience=1, min_confidence=0.05)])
def test_the_rl_loss_scores_sampled_exits_under_the_mask_they_were_sampled_with(tiny_ee, rules):
    """The teacher-forced passes of the loss give each sampled exit the log-prob decoding recorded
    (masked where the lens moved), one pass or prompts shared."""
    from eetools.train.rl import _policy_terms

    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(0.4)
    r = tiny_ee.generate(["Q: 12+34\n", "Q: 12+34\n", "Q: 5+678\n", "Q: 5+678\n"], 10, mode="sample", seed=1, **rules)
    assert not r.exit_allowed[r.mask].all() and r.exit_allowed[r.mask][:, 1:].any(), "the test needs vetoes and exits"
    recorded = (r.exit_logprobs * r.mask).sum(1)
    rows = torch.arange(len(r))
    for prompt_id in (None, torch.tensor([0, 0, 1, 1])):
        with torch.no_grad():
            scored, _ = _policy_terms(tiny_ee, r, r.prescribed_exit_layers(), rows, False, prompt_id)
        torch.testing.assert_close(scored, recorded, rtol=1e-4, atol=1e-4)


def test_masked_exit_log_probs_give_vetoed_heads_no_gradient():
    from eetools.core.heads import exit_log_probs

    z = torch.tensor([[0.3, -0.2, 1.0]], requires_grad=True)
    allowed = torch.tensor([[False, True, True]])
    lp = exit_log_probs(z, allowed)
    c = torch.sigmoid(z.detach())[0]
    assert torch.allclose(
        lp.exp()[0], torch.stack([torch.tensor(0.0), c[1], (1 - c[1]) * c[2], (1 - c[1]) * (1 - c[2])]), atol=1e-6
    )
    lp[0, 2].backward()
    assert z.grad[0, 0] == 0 and torch.isfinite(z.grad).all() and z.grad[0, 1] != 0


def test_rl_trains_the_masked_policy_and_resumes_with_it(tiny_ee, tmp_path):
    """RL with patience: rollouts carry the mask, the loss uses it (a step is finite and moves the heads),
    and the setting is part of the run's configuration."""
    from eetools.train.rl import train_rl

    kw = dict(
        k=2,
        prompts_per_step=2,
        max_new_tokens=8,
        eval_every=0,
        lr=1e-2,
        progress=False,
        reward_fn=lambda e, c: float(len(c) % 3),
    )
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(0.4)
    before = [p.detach().clone() for p in tiny_ee.heads.parameters()]
    res = train_rl(tiny_ee, "addition", steps=1, patience=1, checkpoint_dir=tmp_path / "ck", **kw)
    assert res.config.patience == 1 and res.history["loss"].notna().all()
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_ee.heads.parameters()))
    with pytest.raises(ValueError, match="patience"):
        train_rl(tiny_ee, "addition", steps=2, checkpoint_dir=tmp_path / "ck", **kw)
    with pytest.raises(ValueError, match=r"0 \.\. 2"):
        train_rl(tiny_ee, "addition", steps=1, patience=3, **kw)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        train_rl(tiny_ee, "addition", steps=1, min_confidence=1.0, **kw)
    floor = train_rl(tiny_ee, "addition", steps=1, min_confidence=0.05, **kw)  # the floor masks sampled exits too
    assert floor.config.min_confidence == 0.05 and floor.history["loss"].notna().all()


def test_views_show_the_exit_distribution_the_patience_rule_left(tiny_ee):
    from eetools.views.widgets import token_details

    _constant_heads(tiny_ee, 0.6)
    r = tiny_ee.generate("Q: 12+34\n", 12, mode="sample", patience=1, temperature=0, seed=3)
    assert torch.equal(r.allowed_exit_probs == 0, ~r.exit_allowed & r.mask[..., None] | ~r.mask[..., None])
    k = next(
        k for k in range(1, int(r.mask[0].sum())) if r.exit_layers[0, k] == tiny_ee.n_layers
    )  # decided at every layer
    dist = token_details(tiny_ee, r, 0, k).exit_distribution
    assert math.isclose(dist.sum(), 1.0, rel_tol=1e-6)
    assert (dist.iloc[:-1][~r.exit_allowed[0, k].numpy()] == 0).all() and dist.iloc[0] == 0  # layer 1 never held


@pytest.mark.parametrize("skip", ["mask", "compute"])
def test_a_confidence_floor_lets_a_token_exit_only_where_the_lens_is_sure(tiny_ee, skip):
    _constant_heads(tiny_ee, 0.9)  # the threshold always holds: only the floor decides
    prompt, L, layers = "Q: 12+34\n", tiny_ee.n_layers, tiny_ee.exit_layers
    free = tiny_ee.generate(prompt, 12, mode="threshold", threshold=0.5, temperature=0, seed=0)
    with torch.no_grad():  # a floor some layers pass and some do not, far from every value (decoding rounds)
        v = _replayed_top_probability(tiny_ee, free)[1 : int(free.mask[0].sum())].flatten().sort().values
    lo, hi = len(v) // 4, 3 * len(v) // 4
    gap = int((v[lo + 1 : hi + 1] - v[lo:hi]).argmax()) + lo
    q = float(v[gap] + v[gap + 1]) / 2
    r = tiny_ee.generate(
        prompt, 12, mode="threshold", threshold=0.5, min_confidence=q, temperature=0, seed=0, skip=skip
    )
    assert r.min_confidence == q and r.exit_allowed is not None
    top_p = _replayed_top_probability(tiny_ee, r)
    outcomes = set()
    for k in range(1, int(r.mask[0].sum())):
        sure = [i for i in range(len(layers)) if top_p[k, i] >= q]
        assert r.exit_layers[0, k] == (layers[sure[0]] if sure else L)
        outcomes.add(bool(sure))
    assert outcomes == {True, False}, "the test needs both exits and vetoes"
    both = tiny_ee.generate(
        prompt, 12, mode="threshold", threshold=0.5, min_confidence=q, patience=1, temperature=0, seed=0, skip=skip
    )
    lens = _replayed_lens(tiny_ee, both)
    top_p = _replayed_top_probability(tiny_ee, both)
    for k in range(1, int(both.mask[0].sum())):  # both rules must hold
        ok = [i for i in range(1, len(layers)) if top_p[k, i] >= q and lens[k, i] == lens[k, i - 1]]
        assert both.exit_layers[0, k] == (layers[ok[0]] if ok else L)


@pytest.mark.parametrize(
    "q, error, match", [(1.0, ValueError, r"\[0, 1\)"), (-0.1, ValueError, r"\[0, 1\)"), ("0.9", TypeError, "a number")]
)
def test_bad_confidence_floors_are_refused(tiny_ee, q, error, match):
    with pytest.raises(error, match=match):
        tiny_ee.generate("Q: 1+2\n", 4, mode="threshold", min_confidence=q)
    with pytest.raises(error, match=match):
        eetools.tradeoff(tiny_ee, "addition", thresholds=[0.5], n=2, min_confidence=q, progress=False)
    with pytest.raises(ValueError, match="never exits"):
        tiny_ee.generate("Q: 1+2\n", 4, mode="off", min_confidence=0.5)


def test_the_command_line_takes_a_confidence_floor(tiny_folders, tmp_path, capsys):
    ee = eetools.attach_exit_heads(eetools.load_model(tiny_folders["qwen3"]), layers=[1, 2, 3])
    _constant_heads(ee, 0.9)
    folder = tmp_path / "ee"
    save_exit_model(ee, folder)
    common = ["--exit-model", str(folder), "--n", "2", "--no-progress"]
    assert (
        main(["evaluate", *common, "--mode", "threshold", "--min-confidence", "0.999", "--out", str(tmp_path / "ev")])
        == 0
    )
    import pandas as pd

    saved = pd.read_csv(tmp_path / "ev" / "evaluation.csv").set_index("system").loc["model", "layers_saved"]
    assert saved == 0  # an untrained model's lens is never 99.9 % sure: nothing exits
    assert (
        main(["tradeoff", *common, "--thresholds", "0.5", "--min-confidence", "1.5", "--out", str(tmp_path / "tr")])
        == 2
    )
    assert "[0, 1)" in capsys.readouterr().err
