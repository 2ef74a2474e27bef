"""Probes: token classes by hand, residual shapes, linear probes, skipped computation, oracle exits."""

import numpy as np
import pandas as pd
import pytest
import torch

from eetools.analysis import probes
from eetools.core.hooks import resid_post, resid_pre
from eetools.tasks import AdditionTask, Example, TomTask

torch.set_num_threads(1)

ADD = AdditionTask()


def _n_tokens(ee, text):
    return ee.model.to_tokens(text, prepend_bos=False, truncate=False).shape[1]


# ----------------------------------------------------------------------------- token annotation


def test_addition_token_classes_by_hand():
    ex = ADD.make(4821, 397)
    assert ex.reasoning == "1+7+0=8\n2+9+0=11\n8+3+1=12\n4+0+1=5\nA: 5218\n"
    df = probes.annotate_tokens(list(ex.reasoning), "addition", ex)
    code = {"format": ".", "copied_digit": "c", "computed_digit": "S", "answer": "A"}
    got = "".join(code[c] for c in df["token_class"])
    want = "c.c.c.S.c.c.c.SS.c.c.c.SS.c.c.c.S....AAAA."
    assert got == want
    lines = df[df["line"] < 4].groupby("line")
    assert lines["carry"].first().tolist() == [0, 1, 1, 0]
    assert lines["sum_digit"].first().tolist() == [8, 1, 2, 5]
    assert lines["answer_digit"].first().tolist() == [8, 1, 2, 5]
    ans = df[df["token_class"] == "answer"]
    assert ans["column"].tolist() == [3, 2, 1, 0] and ans["answer_digit"].tolist() == [5, 2, 1, 8]
    assert df.loc[df["token"] == "A", "answer_digit"].isna().all()
    # multi-character tokens take the most informative class
    multi = probes.annotate_tokens(["1+", "7+0", "=8\n", "A: ", "5218", "\n"], "addition", ADD.make(1, 7))
    assert multi["token_class"].tolist() == [
        "copied_digit",
        "copied_digit",
        "computed_digit",
        "format",
        "answer",
        "format",
    ]


def test_tom_token_classes_by_hand():
    text = "box: Ann+ Bob+ (Bob+ box)\nBob out: Ann+ Bob- (Bob- box)\nbag: Ann+ Bob- (Bob- box)\nBob saw box\nA: box\n"
    ex = Example(task="tom", prompt="...", reasoning=text, answer="box", meta={})
    df = probes.annotate_tokens(list(text), "tom", ex)
    code = {"format": ".", "copied_name": "N", "mark": "M", "container": "C", "answer": "A"}
    got = "".join(code[c] for c in df["token_class"])
    assert got == (
        "CCC..NNNM.NNNM..NNNM.CCC..NNN......NNNM.NNNM..NNNM.CCC..CCC..NNNM.NNNM..NNNM.CCC..NNN.....CCC....AAA."
    )
    assert (df["believed_location"] == "box").all()
    # a real example: every class occurs, nothing is "other"
    real = TomTask().sample(1, seed=3)[0]
    cls = set(probes.annotate_tokens(list(real.reasoning), "tom", real)["token_class"])
    assert cls == {"format", "copied_name", "mark", "container", "answer"}


# ----------------------------------------------------------------------------- residuals


def test_collect_residuals_rows_and_shapes(tiny_ee):
    examples = ADD.sample(3, seed=0) + [ADD.make(4821, 397)]
    rs = probes.collect_residuals(tiny_ee, examples, batch_size=3)
    n = sum(_n_tokens(tiny_ee, e.reasoning) for e in examples)
    L = tiny_ee.n_layers
    assert rs.layers == [1, 2, 3, L]
    assert tuple(rs.resid.shape) == (n, 4, tiny_ee.model.cfg.d_model) and len(rs.df) == n
    assert rs.df.groupby("seq").size().tolist() == [_n_tokens(tiny_ee, e.reasoning) for e in examples]
    last = rs.df[rs.df["seq"] == 3]
    assert "".join(last["token"]) == examples[3].reasoning
    assert (
        last["token_class"].tolist()
        == probes.annotate_tokens(list(examples[3].reasoning), "addition", examples[3])["token_class"].tolist()
    )
    # the captured values are the bridge's own hook values at those positions
    from eetools.core.encoding import encode_sequences

    ids, attn, _ = encode_sequences(tiny_ee, [examples[0].prompt], [examples[0].reasoning])
    _, cache = tiny_ee.model.run_with_cache(ids, names_filter=[resid_pre(2), resid_post(L - 1)])
    pos = torch.tensor(rs.df.loc[rs.df["seq"] == 0, "position"].to_numpy())
    rows = torch.from_numpy(np.flatnonzero((rs.df["seq"] == 0).to_numpy()))
    torch.testing.assert_close(rs.acts(2)[rows], cache[resid_pre(2)][0, pos].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rs.acts("final")[rows], cache[resid_post(L - 1)][0, pos].float(), atol=1e-4, rtol=1e-4)
    # prompt_last adds one "prompt" row per sequence
    rs2 = probes.collect_residuals(tiny_ee, examples[:2], layers=[0, "final"], prompt_last=True)
    assert rs2.layers == [0, L] and len(rs2) == sum(_n_tokens(tiny_ee, e.reasoning) + 1 for e in examples[:2])
    assert rs2.df.loc[rs2.df["rel_position"] == -1, "token_class"].tolist() == ["prompt", "prompt"]
    assert rs2.figure(layer=0) is not None
    with pytest.raises(KeyError):
        rs2.acts(2)


def test_collect_residuals_with_exits(tiny_ee):
    examples = ADD.sample(2, seed=1)
    L = tiny_ee.n_layers
    exits = []
    for e in examples:
        s = _n_tokens(tiny_ee, e.prompt) + 1  # BOS + prompt
        n = _n_tokens(tiny_ee, e.reasoning)
        x = torch.full((s + n,), L)
        x[s + 1 : s + n : 3] = 1
        x[s + 2 : s + n : 3] = 2
        exits.append(x)
    rs = probes.collect_residuals(tiny_ee, examples, exit_layers=exits)
    assert rs.exit_resid is not None and rs.exit_resid.shape == (len(rs), tiny_ee.model.cfg.d_model)
    el = rs.df["exit_layer"].to_numpy()
    assert set(el) == {1, 2, L}
    for l in (1, 2, L):
        m = torch.from_numpy(np.flatnonzero(el == l))
        torch.testing.assert_close(rs.acts("exit")[m], rs.acts(l)[m])
    # the final residual is the frozen state the prediction reads: readout = prescribed output
    from eetools.core.encoding import encode_sequences

    ids, attn, _ = encode_sequences(tiny_ee, [e.prompt for e in examples], [e.reasoning for e in examples])
    ex_mat = torch.full(ids.shape, L)
    for i, x in enumerate(exits):
        ex_mat[i, : len(x)] = x
    with torch.no_grad():
        out = tiny_ee.prescribed_forward(ids, ex_mat, attn)
        want = out.logprobs[torch.tensor(rs.df["seq"].to_numpy()), torch.tensor(rs.df["position"].to_numpy())]
        got = tiny_ee.readout(rs.acts("final")).log_softmax(-1)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- linear probes


def _synthetic(n=600, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    dirs = torch.randn(3, d, generator=g)
    noise = torch.randn(n, 2, d, generator=g)
    resid = noise.clone()
    resid[:, 1] += 3 * dirs[y]  # layer 5 encodes the label, layer 0 does not
    z = torch.randn(n, generator=g)
    resid[:, 1, 0] += 4 * z
    df = pd.DataFrame(
        {
            "seq": np.arange(n) // 5,
            "position": np.arange(n) % 5,
            "token_class": "format",
            "label": y.numpy(),
            "value": z.numpy(),
        }
    )
    return probes.ResidualSet(resid=resid, layers=[0, 5], df=df, n_layers=5)


def test_fit_probe_on_a_linearly_encoded_label():
    rs = _synthetic()
    r = probes.fit_probe(rs, 5, "label")
    assert r.score > 0.9 and abs(r.baseline - 1 / 3) < 0.15
    row = r.df.iloc[0]
    assert row["metric"] == "accuracy" and row["n_classes"] == 3 and row["n_train"] + row["n_test"] == 600
    # sequences are not split across train and test
    assert probes.fit_probe(rs, 0, "label").score < 0.5
    reg = probes.fit_probe(rs, "final", "value", kind="ridge")
    assert reg.score > 0.9 and reg.baseline < 0.2
    assert r.figure() is not None
    with pytest.raises(KeyError):
        probes.fit_probe(rs, 5, "nope")
    with pytest.raises(ValueError, match="kind"):
        probes.fit_probe(rs, 5, "label", kind="svm")


def test_probe_sweep_one_row_per_layer_and_real_residuals(tiny_ee):
    sweep = probes.probe_sweep(_synthetic(), "label")
    assert sweep.df["layer"].tolist() == [0, 5] and sweep.df["score"].iloc[1] > sweep.df["score"].iloc[0]
    assert len(sweep.figure().data) == 3
    rs = probes.collect_residuals(tiny_ee, ADD.sample(8, seed=2))
    r = probes.fit_probe(rs, 2, "carry", token_class=["copied_digit", "computed_digit"])
    assert 0 <= r.score <= 1 and r.df.iloc[0]["n_test"] > 0


# ----------------------------------------------------------------------------- oracle and depth


def test_oracle_from_logprobs_by_hand():
    final = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.2, 0.6]]).log()
    early = (
        torch.tensor(
            [
                [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]],  # agrees from layer 2
                [[0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]],  # agrees at 1 (and 3)
                [[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]],  # never
            ]
        )
        .clamp(min=1e-6)
        .log()
    )
    got = probes.oracle_from_logprobs(final, early, [1, 2, 3], 4)
    assert got.tolist() == [2, 1, 4]
    # the teacher against itself: the first exitable layer
    same = probes.oracle_from_logprobs(final, final.unsqueeze(1).expand(3, 3, 3), [2, 5, 7], 9)
    assert same.tolist() == [2, 2, 2]
    assert probes.oracle_from_logprobs(final[None], early[None], [1, 2, 3], 4).shape == (1, 3)


def test_oracle_exits_and_depth_necessity(tiny_ee):
    examples = ADD.sample(3, seed=4)
    L = tiny_ee.n_layers
    o = probes.oracle_exits(tiny_ee, examples)
    assert len(o.df) == sum(_n_tokens(tiny_ee, e.reasoning) + 1 for e in examples)  # + EOS
    assert set(o.df["oracle_layer"]) <= {1, 2, 3, L}
    assert (o.df.loc[~o.df["exitable"], "oracle_layer"] == L).all() and (~o.df["exitable"]).sum() == 3
    assert (o.df.groupby("seq")["token_class"].last() == "eos").all()
    assert 0 <= o.layers_saved < 1
    assert o.figure() is not None and set(o.summary()["token_class"]) == set(o.df["token_class"])
    d = probes.depth_necessity(tiny_ee, examples)
    assert d.df["layer"].tolist() == tiny_ee.exit_layers
    assert d.df["agreement"].between(0, 1).all() and (d.df["nll"] > 0).all() and (d.df["n_tokens"] == len(o.df)).all()
    # agreement at the first exitable layer is exactly the oracle's share of layer 1
    assert d.df["agreement"].iloc[0] == pytest.approx((o.df["lens_oracle"] == 1).mean())
    assert d.figure() is not None and len(d.by_class)


# ----------------------------------------------------------------------------- skipped computation


def test_linearised_final_norm_adds_up_to_the_norm(tiny_ee):
    x = torch.randn(5, tiny_ee.model.cfg.d_model) * 3
    ln = tiny_ee.model.ln_final
    bias = getattr(ln, "bias", None)
    lin = probes.linearised_final_norm(tiny_ee, x, x)
    with torch.no_grad():
        want = ln(x) - (bias if isinstance(bias, torch.Tensor) else 0)
        parts = probes.linearised_final_norm(tiny_ee, x * 0.25, x) + probes.linearised_final_norm(tiny_ee, x * 0.75, x)
    torch.testing.assert_close(lin, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(parts, want, atol=1e-4, rtol=1e-4)


def test_skipped_computation_rows_only_for_exited_tokens(tiny_ee):
    prompts = [e.prompt for e in ADD.sample(3, seed=5)]
    L = tiny_ee.n_layers
    r = tiny_ee.generate(prompts, max_new_tokens=8, mode="threshold", threshold=1e-6, seed=0)  # every exit at layer 1
    exited = (r.exit_layers < L) & r.mask
    assert int(exited.sum()) > 0
    s = probes.skipped_computation(tiny_ee, r, task="addition")
    assert len(s.df) == int(exited.sum())
    assert sorted(zip(s.df["seq"], s.df["t"])) == sorted(map(tuple, exited.nonzero().tolist()))
    assert (s.df["kl"] >= 0).all() and (s.df["exit_layer"] < L).all()
    assert len(s.blocks) == int((L - s.df["exit_layer"]).sum())
    assert (s.blocks["block"] >= s.blocks["exit_layer"]).all() and (s.blocks["norm"] >= 0).all()
    per_tok = s.blocks.groupby(["seq", "t"])["dla"].sum()
    np.testing.assert_allclose(
        s.df.set_index(["seq", "t"])["skipped_dla"].sort_index(), per_tok.sort_index(), rtol=1e-5
    )
    assert s.figure() is not None and s.summary()["n"].sum() == len(s.df)
    # early readout = the rollout's own log-prob of the chosen token
    lp = r.token_logprobs[torch.tensor(s.df["seq"].to_numpy()), torch.tensor(s.df["t"].to_numpy())]
    np.testing.assert_allclose(s.df["chosen_logprob_early"], lp.numpy(), atol=2e-3)
    none = probes.skipped_computation(tiny_ee, tiny_ee.generate(prompts[:1], max_new_tokens=4, mode="off", seed=0))
    assert none.df.empty and none.summary().empty and none.figure() is not None


# ----------------------------------------------------------------------------- hidden planning


def test_hidden_planning_same_model_has_zero_delta(tiny_ee):
    examples = ADD.sample(24, seed=6)
    h = probes.hidden_planning(tiny_ee, tiny_ee, examples, n_positions=2, layers=[1, "final"])
    assert set(h.df["model"]) == {"before", "after"} and set(h.df["rel_position"]) <= {-1, 0}
    assert len(h.df) > 0 and h.df["score"].between(0, 1).all()
    s = h.summary()
    np.testing.assert_allclose(s["delta"], 0.0)
    assert h.figure() is not None
    with pytest.raises(ValueError, match="not a number"):
        probes.hidden_planning(tiny_ee, tiny_ee, TomTask().sample(6, seed=0), n_positions=1)


def test_skipped_block_attributions_sum_to_full_minus_exited_logit(tiny_folders):
    """Sum of the skipped blocks' DLA = full-depth logit - exit-layer residual's logit (same linearised norm)."""
    import eetools
    from eetools.analysis.probes import linearised_final_norm, skipped_computation

    ee_model = eetools.attach_exit_heads(eetools.load_model(tiny_folders["qwen3"]), layers=[1, 2, 3])
    ee_model.model.cfg.default_prepend_bos = True
    with torch.no_grad():
        for h in ee_model.heads:
            h.net[-1].bias.fill_(0.0)
    r = ee_model.generate(["Q: 1+2\n"], 10, seed=0)
    res = skipped_computation(ee_model, r, task="addition")
    assert len(res.df)
    _, cache = ee_model.model.run_with_cache(r.sequences, attention_mask=r.attention_mask)
    L = ee_model.n_layers
    final = cache[f"blocks.{L - 1}.hook_resid_post"][0]
    full_logits = ee_model.model(r.sequences, attention_mask=r.attention_mask)[0]
    for row in res.df.itertuples():
        tok = int(r.tokens[0, row.t])
        w = ee_model.model.W_U[:, tok]
        early = cache[f"blocks.{row.exit_layer}.hook_resid_pre"][0, row.position]
        want = full_logits[row.position, tok] - (linearised_final_norm(ee_model, early, final[row.position]) @ w)
        assert abs(row.skipped_dla - float(want.detach())) < 1e-3, (row, float(want.detach()))


def test_oracle_equals_brute_force(tiny_ee):
    """Oracle exit = the earliest exitable layer whose logit-lens argmax equals the final argmax, by brute force."""
    from eetools import tasks
    from eetools.analysis.probes import oracle_exits

    exs = tasks.get("addition").sample(2, seed=3)
    res = oracle_exits(tiny_ee, exs, base=True)
    from eetools.core.encoding import encode_sequences

    for i, ex in enumerate(exs):
        ids, attn, predict = encode_sequences(tiny_ee, [ex.prompt], [ex.reasoning])
        _, cache = tiny_ee.model.run_with_cache(ids, attention_mask=attn)
        final = tiny_ee.model(ids, attention_mask=attn)[0].argmax(-1)
        got = res.df[res.df["seq"] == i]["oracle_layer"].tolist()
        want = []
        for p in predict[0].nonzero().squeeze(-1).tolist():
            layer = tiny_ee.n_layers
            for l in tiny_ee.exit_layers:
                if int(tiny_ee.readout(cache[f"blocks.{l}.hook_resid_pre"][0, p]).argmax()) == int(final[p]):
                    layer = l
                    break
            want.append(layer)
        want[0] = tiny_ee.n_layers  # the prompt's last position never exits
        assert got == want
