"""`ExitRule`: the exit settings as one frozen value, validated once; the old keyword arguments build the
same rule and give the same rollouts; the entropy ceiling (`max_entropy`) lets a token exit only where the
logit lens's entropy at that layer is low enough, thresholded or sampled (a mask, like patience)."""

import dataclasses
import math

import pandas as pd
import pytest
import torch

import eetools
from eetools import ExitRule
from eetools.cli import main, make_parser
from eetools.core.rule import lens_entropy
from eetools.io.exit_checkpoint import save_exit_model


def _constant_heads(ee, p):
    """Every head gives ``c = p`` whatever it reads."""
    with torch.no_grad():
        for h in ee.heads:
            h.net[-1].weight.zero_()
            h.net[-1].bias.fill_(math.log(p / (1 - p)))


def _replayed_entropy(ee, rollout):
    """The logit lens's entropy (nats) at each exitable layer for every generated token ``[new, n_exit]``,
    by a teacher-forced replay of the rollout with its exits prescribed (one unpadded prompt)."""
    L, n_new = ee.n_layers, rollout.tokens.shape[1]
    tokens = torch.cat([rollout.prompt_tokens, rollout.tokens], 1)
    exit_at = torch.full_like(tokens, L)
    start = rollout.prompt_tokens.shape[1] - 1  # the position that predicts the first generated token
    exit_at[0, start : start + n_new] = rollout.exit_layers[0]
    resid = {}
    hooks = [(f"blocks.{l}.hook_resid_pre", lambda x, hook, l=l: resid.__setitem__(l, x)) for l in ee.exit_layers]
    with torch.no_grad():
        with ee.model.hooks(fwd_hooks=hooks):
            ee(tokens, exit_layers=exit_at)
        return torch.stack([lens_entropy(ee.readout(resid[l][0, start : start + n_new])) for l in ee.exit_layers], -1)


def _ceiling_in_a_gap(values):
    """A ceiling some values pass and some do not, far from every value (decoding rounds differently)."""
    v = values.flatten().sort().values
    lo, hi = len(v) // 4, 3 * len(v) // 4
    gap = int((v[lo + 1 : hi + 1] - v[lo:hi]).argmax()) + lo
    return float(v[gap] + v[gap + 1]) / 2


# ------------------------------------------------------------------ the value


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(mode="maybe"), ValueError, "mode must be one of"),
        (dict(threshold=0.0), ValueError, r"in \(0, 1\]"),
        (dict(threshold=1.5), ValueError, r"in \(0, 1\]"),
        (dict(threshold=(0.5, 0.0)), ValueError, r"in \(0, 1\]"),
        (dict(threshold="high"), TypeError, "one per exitable layer"),
        (dict(patience=-1), ValueError, ">= 0"),
        (dict(patience=1.0), TypeError, "must be an int"),
        (dict(mode="off", patience=1), ValueError, "never exits"),
        (dict(min_confidence=1.0), ValueError, r"\[0, 1\)"),
        (dict(min_confidence=-0.1), ValueError, r"\[0, 1\)"),
        (dict(min_confidence="0.9"), TypeError, "a number"),
        (dict(mode="off", min_confidence=0.5), ValueError, "never exits"),
        (dict(max_entropy=-0.5), ValueError, ">= 0"),
        (dict(max_entropy=float("nan")), ValueError, ">= 0"),
        (dict(max_entropy="1"), TypeError, "a number"),
        (dict(mode="off", max_entropy=1.0), ValueError, "never exits"),
    ],
)
def test_bad_rules_are_refused_at_construction_with_one_line(kw, error, match):
    with pytest.raises(error, match=match) as e:
        ExitRule(**kw)
    assert "\n" not in str(e.value)


def test_the_model_checks_the_layer_count_and_the_patience_range():
    assert ExitRule(threshold=(0.5, 0.6, 0.7), patience=2).checked(3).patience == 2
    with pytest.raises(ValueError, match="2 values but the model has 3 exitable layers"):
        ExitRule(threshold=(0.5, 0.6)).checked(3)
    with pytest.raises(ValueError, match=r"0 \.\. 2"):
        ExitRule(patience=3).checked(3)
    with pytest.raises(ValueError, match=r"0 \.\. 2"):  # with a model at hand, the range is the message
        ExitRule.from_kwargs(patience=-1, n_exit=3)


def test_rules_are_values():
    a = ExitRule(mode="threshold", threshold=[0.5, 0.6, 0.7], patience=1, min_confidence=0.5, max_entropy=2)
    b = ExitRule(mode="threshold", threshold=(0.5, 0.6, 0.7), patience=1, min_confidence=0.5, max_entropy=2.0)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert isinstance(a.threshold, tuple) and isinstance(a.max_entropy, float) and isinstance(a.min_confidence, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.patience = 0
    assert a.replace(patience=0) != a and a.patience == 1
    assert ExitRule(threshold=1).threshold == 1.0 and ExitRule() == ExitRule(mode="sample", threshold=0.5)
    assert ExitRule(mode="threshold", threshold=(0.3, 0.4)).thresholds(2) == (0.3, 0.4)
    assert ExitRule(threshold=0.3).thresholds(3) == (0.3, 0.3, 0.3)
    assert not ExitRule(mode="threshold").ruled
    assert all(ExitRule(**kw).ruled for kw in (dict(patience=1), dict(min_confidence=0.1), dict(max_entropy=0.0)))
    assert a.heads_only("off") == ExitRule(mode="off", threshold=(0.5, 0.6, 0.7))
    assert eetools.core.ExitRule is ExitRule and "ExitRule" in eetools.__all__


def test_keywords_build_the_rule_and_may_not_contradict_it():
    from eetools.core.rule import UNSET

    rule = ExitRule(mode="threshold", threshold=0.7, patience=1)
    assert ExitRule.from_kwargs(mode="threshold", threshold=0.7, patience=1) == rule
    assert ExitRule.from_kwargs(rule, mode=UNSET, threshold=0.7, patience=UNSET) is rule  # agreeing or left out
    with pytest.raises(ValueError, match="disagree"):
        ExitRule.from_kwargs(rule, patience=2)
    with pytest.raises(ValueError, match="disagree"):
        ExitRule.from_kwargs(rule, max_entropy=1.0)
    with pytest.raises(TypeError, match="must be an ExitRule"):
        ExitRule.from_kwargs({"mode": "threshold"})


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("skip", ["mask", "compute"])
def test_a_rule_and_the_old_keywords_give_the_same_rollout(tiny_ee, skip):
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(0.4)
    prompts = ["Q: 12+34\n", "Q: 5+678\n"]
    for kw in (
        dict(mode="sample"),
        dict(mode="threshold", threshold=[0.5, 0.6, 0.55], patience=1),
        dict(mode="sample", min_confidence=0.05, max_entropy=50.0),
        dict(mode="off"),
    ):
        old = tiny_ee.generate(prompts, 8, seed=3, skip=skip, **kw)
        new = tiny_ee.generate(prompts, 8, seed=3, skip=skip, rule=ExitRule(**kw))
        assert old.rule == new.rule == ExitRule(**kw) and old.text == new.text
        for field in ("tokens", "exit_layers", "exit_logprobs"):
            assert torch.equal(getattr(old, field), getattr(new, field)), field
        assert (old.exit_allowed is None) == (new.exit_allowed is None)
        assert new.mode == kw["mode"] and new.patience == kw.get("patience", 0)
    with pytest.raises(ValueError, match="disagree"):
        tiny_ee.generate(prompts, 4, rule=ExitRule(mode="threshold"), mode="sample")


def test_evaluate_takes_a_rule_like_its_keywords(tiny_ee):
    kw = dict(n=2, compare=False, progress=False, judges=())
    by_rule = eetools.evaluate(tiny_ee, "addition", rule=ExitRule(mode="threshold", threshold=0.4, patience=1), **kw)
    by_kw = eetools.evaluate(tiny_ee, "addition", mode="threshold", threshold=0.4, patience=1, **kw)
    pd.testing.assert_frame_equal(by_rule.per_example, by_kw.per_example)
    with pytest.raises(ValueError, match=r"0 \.\. 2"):
        eetools.evaluate(tiny_ee, "addition", rule=ExitRule(patience=3), **kw)


def test_rollouts_carry_their_rule():
    from eetools.core.rollout import Rollout

    fields = dict(
        prompts=["a"],
        prompt_tokens=torch.ones(1, 2, dtype=torch.long),
        prompt_mask=torch.ones(1, 2, dtype=torch.long),
        tokens=torch.ones(1, 3, dtype=torch.long),
        mask=torch.ones(1, 3, dtype=torch.bool),
        exit_layers=torch.full((1, 3), 4),
        token_logprobs=torch.zeros(1, 3),
        exit_logprobs=torch.zeros(1, 3),
        exit_probs=torch.zeros(1, 3, 3),
        text=["b"],
        str_tokens=[["b"]],
        prompt_str_tokens=[["a"]],
        n_layers=4,
        layers=[1, 2, 3],
    )
    legacy = Rollout(**fields, mode="threshold", patience=1)  # the loose fields still build one
    assert legacy.rule == ExitRule(mode="threshold", patience=1) and legacy.max_entropy is None
    r = Rollout(**fields, rule=ExitRule(min_confidence=0.5, max_entropy=1.5))
    assert (r.mode, r.patience, r.min_confidence, r.max_entropy) == ("sample", 0, 0.5, 1.5)


@pytest.mark.parametrize("skip", ["mask", "compute"])
def test_an_entropy_ceiling_lets_a_token_exit_only_where_the_lens_is_sharp(tiny_ee, skip):
    _constant_heads(tiny_ee, 0.9)  # the threshold always holds: only the ceiling decides
    prompt, L, layers = "Q: 12+34\n", tiny_ee.n_layers, tiny_ee.exit_layers
    free = tiny_ee.generate(prompt, 12, mode="threshold", threshold=0.5, temperature=0, seed=0)
    h = _ceiling_in_a_gap(_replayed_entropy(tiny_ee, free)[1 : int(free.mask[0].sum())])
    r = tiny_ee.generate(
        prompt, 12, rule=ExitRule(mode="threshold", threshold=0.5, max_entropy=h), temperature=0, seed=0, skip=skip
    )
    assert r.max_entropy == h and r.exit_allowed is not None
    entropy = _replayed_entropy(tiny_ee, r)
    outcomes = set()
    for k in range(1, int(r.mask[0].sum())):  # the first token comes from the prompt, which never exits
        sharp = [i for i in range(len(layers)) if entropy[k, i] <= h]
        assert r.exit_layers[0, k] == (layers[sharp[0]] if sharp else L)
        if r.exit_layers[0, k] < L:  # every exit the rule allowed satisfies it
            assert entropy[k, layers.index(int(r.exit_layers[0, k]))] <= h
        outcomes.add(bool(sharp))
    assert outcomes == {True, False}, "the test needs both exits and vetoes"
    both = tiny_ee.generate(
        prompt, 12, mode="threshold", threshold=0.5, max_entropy=h, patience=1, temperature=0, seed=0, skip=skip
    )
    entropy = _replayed_entropy(tiny_ee, both)
    for k in range(1, int(both.mask[0].sum())):  # with patience, an exit needs both (layer 1 never holds)
        exited = int(both.exit_layers[0, k])
        assert exited == L or (exited > layers[0] and entropy[k, layers.index(exited)] <= h)


def test_sampled_exits_under_an_entropy_ceiling_follow_the_masked_policy(tiny_ee):
    from eetools.core.heads import exit_log_probs

    _constant_heads(tiny_ee, 0.6)
    L, layers = tiny_ee.n_layers, tiny_ee.exit_layers
    free = tiny_ee.generate("Q: 12+34\n", 12, mode="sample", temperature=0, seed=3)
    h = _ceiling_in_a_gap(_replayed_entropy(tiny_ee, free)[1 : int(free.mask[0].sum())])
    z = torch.full((len(layers),), math.log(0.6 / 0.4))
    vetoed = allowed = 0
    for prompt in ("Q: 12+34\n", "Q: 5+67\n"):
        r = tiny_ee.generate(prompt, 12, mode="sample", max_entropy=h, temperature=0, seed=3)
        entropy = _replayed_entropy(tiny_ee, r)
        for k in range(1, int(r.mask[0].sum())):
            sharp = entropy[k] <= h
            exited = int(r.exit_layers[0, k])
            upto = layers.index(exited) + 1 if exited < L else len(layers)  # the layers the token was decided at
            assert torch.equal(r.exit_allowed[0, k, :upto], sharp[:upto])
            assert exited == L or sharp[layers.index(exited)]  # never exits where the lens is spread out
            want = exit_log_probs(z, sharp)[int(tiny_ee.exit_index(torch.tensor(exited)))]
            assert math.isclose(float(r.exit_logprobs[0, k]), float(want), rel_tol=1e-5)
            vetoed, allowed = vetoed + int((~sharp[:upto]).sum()), allowed + int(sharp[:upto].sum())
        assert torch.equal(r.allowed_exit_probs == 0, ~r.exit_allowed & r.mask[..., None] | ~r.mask[..., None])
    assert vetoed and allowed, "the test needs vetoes and allowed layers"


def test_tradeoff_takes_a_rule(tiny_ee):
    _constant_heads(tiny_ee, 0.9)
    kw = dict(thresholds=[0.5], n=2, sample=False, progress=False)
    sharp = eetools.tradeoff(tiny_ee, "addition", rule=ExitRule(max_entropy=0.0), **kw)
    free = eetools.tradeoff(tiny_ee, "addition", **kw)
    saved = lambda res: res.df.set_index("system").loc["threshold", "layers_saved"]
    assert saved(sharp) == 0 < saved(free)  # a random lens is never one-hot: nothing exits
    pd.testing.assert_frame_equal(eetools.tradeoff(tiny_ee, "addition", max_entropy=0.0, **kw).df, sharp.df)
    with pytest.raises(ValueError, match=">= 0"):
        eetools.tradeoff(tiny_ee, "addition", max_entropy=-1.0, **kw)


def test_rl_samples_under_the_entropy_ceiling_and_keeps_it_in_its_configuration(tiny_ee):
    from eetools.train.rl import RLConfig, train_rl

    kw = dict(
        k=2,
        prompts_per_step=2,
        max_new_tokens=6,
        eval_every=0,
        lr=1e-2,
        progress=False,
        reward_fn=lambda e, c: float(len(c) % 3),
    )
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(0.4)
    res = train_rl(tiny_ee, "addition", steps=1, max_entropy=1e3, **kw)
    assert res.config.max_entropy == 1e3 and res.history["loss"].notna().all()
    assert res.config.exit_rule() == ExitRule(max_entropy=1e3)
    assert RLConfig().max_entropy is None and RLConfig().exit_rule("threshold") == ExitRule(mode="threshold")
    with pytest.raises(ValueError, match="rule.mode must be 'sample'"):
        train_rl(tiny_ee, "addition", steps=1, rule=ExitRule(mode="threshold"), **kw)
    with pytest.raises(ValueError, match=">= 0"):
        train_rl(tiny_ee, "addition", steps=1, max_entropy=-1.0, **kw)


# ------------------------------------------------------------------ command line


def test_the_command_line_takes_an_entropy_ceiling(tiny_folders, tmp_path, capsys):
    ee = eetools.attach_exit_heads(eetools.load_model(tiny_folders["qwen3"]), layers=[1, 2, 3])
    _constant_heads(ee, 0.9)
    folder = tmp_path / "ee"
    save_exit_model(ee, folder)
    common = ["--exit-model", str(folder), "--n", "2", "--no-progress"]
    saved = {}
    for ceiling in ("0.01", "1e9"):
        assert (
            main(
                ["evaluate", *common, "--mode", "threshold", "--max-entropy", ceiling, "--out", str(tmp_path / ceiling)]
            )
            == 0
        )
        summary = pd.read_csv(tmp_path / ceiling / "evaluation.csv").set_index("system")
        saved[ceiling] = summary.loc["model", "layers_saved"]
    assert saved["0.01"] == 0 < saved["1e9"]  # an untrained model's lens is never that sharp; no ceiling: all exit
    capsys.readouterr()
    for bad, says in (("-1", ">= 0"), ("nan", ">= 0")):
        assert (
            main(["evaluate", *common, "--mode", "threshold", "--max-entropy", bad, "--out", str(tmp_path / "bad")])
            == 2
        )
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    assert main(["evaluate", *common, "--mode", "off", "--max-entropy", "1", "--out", str(tmp_path / "off")]) == 2
    assert "never exits" in capsys.readouterr().err
    assert main(["tradeoff", *common, "--thresholds", "0.5", "--max-entropy", "-2", "--out", str(tmp_path / "tr")]) == 2
    assert ">= 0" in capsys.readouterr().err
    assert make_parser().parse_args(["rl", "--max-entropy", "2.5"]).max_entropy == 2.5  # from RLConfig's field
