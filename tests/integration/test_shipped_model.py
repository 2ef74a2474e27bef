"""The shipped tiny reasoner and its exit heads (integration tier)."""

import pytest
import torch

import eetools
from eetools import tasks
from eetools.io.models import shipped_model_dir

pytestmark = pytest.mark.integration

BRIDGE_VS_HF = 1e-5
SAMPLE = 40  # examples per task: enough to see a broken model, quick on 2 cores


def test_boots_offline_and_matches_hf(reasoner):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(shipped_model_dir()).eval()
    toks = reasoner.to_tokens(["Q: 4821+397\n"], prepend_bos=True)
    assert toks[0, 0].item() == reasoner.tokenizer.bos_token_id
    with torch.no_grad():
        torch.testing.assert_close(reasoner(toks), hf(toks).logits, atol=BRIDGE_VS_HF, rtol=0)
    assert reasoner.cfg.n_layers >= 8


@pytest.mark.parametrize("name", tasks.NAMES)
def test_greedy_accuracy_on_the_frozen_test_split(reasoner, name):
    ee = eetools.attach_exit_heads(reasoner)
    exs = tasks.get(name).test_split()[:SAMPLE]
    task = tasks.get(name)
    r = ee.generate([e.prompt for e in exs], task.max_new_tokens, mode="off", temperature=0, seed=0)
    acc = sum(task.score(e, tasks.cut_at_answer(t)) == 1.0 for e, t in zip(exs, r.text)) / len(exs)
    assert acc >= 0.9, f"{name}: greedy accuracy {acc:.2f} on {len(exs)} held-out examples"


def test_bridge_generate_writes_a_worked_sum(reasoner):
    out = reasoner.generate("Q: 4821+397\n", max_new_tokens=60, do_sample=False, verbose=False)
    assert "A: 5218" in out


def test_exit_parity_on_the_shipped_model(reasoner):
    ee = eetools.attach_exit_heads(reasoner, layers=[2, 4, 6])
    toks = reasoner.to_tokens(["Q: 123+45\n3+5+0=8\n"], prepend_bos=True)
    base = reasoner(toks).log_softmax(-1)
    out = ee.prescribed_forward(toks, torch.full_like(toks, ee.n_layers))
    torch.testing.assert_close(out.logprobs, base)
    ex = torch.full_like(toks, ee.n_layers)
    ex[0, 12] = 4
    got = ee.prescribed_forward(toks, ex).logprobs[0, 12]
    _, cache = reasoner.run_with_cache(toks)
    torch.testing.assert_close(got, ee.readout(cache["blocks.4.hook_resid_pre"][0, 12]).log_softmax(-1))


def test_cached_equals_uncached_on_the_shipped_model(reasoner):
    ee = eetools.attach_exit_heads(reasoner)
    with torch.no_grad():
        for h in ee.heads:
            h.net[-1].bias.fill_(-1.0)
    prompts = [e.prompt for e in tasks.get("addition").sample(2, seed=9)]
    a = ee.generate(prompts, 30, seed=4)
    b = ee.generate(prompts, 30, seed=4, use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers)
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "preset",
    ["tiny-reasoner/calibrated", "tiny-reasoner/rl", "tiny-reasoner/rl-slow-adapters", "tiny-reasoner/rl-lam6"],
)
def test_shipped_exit_models_load_and_exit(preset):
    from eetools.io.exit_checkpoint import PRESETS
    from eetools.io.paths import data_dir

    if not (data_dir() / "models" / PRESETS[preset]).is_dir():
        pytest.skip(f"{preset} not shipped yet")
    ee = eetools.load_exit_model(preset)
    exs = tasks.get("addition").test_split()[:SAMPLE]
    r = ee.generate([e.prompt for e in exs], 80, mode="sample", temperature=0, seed=0)
    acc = sum(tasks.get("addition").score(e, tasks.cut_at_answer(t)) == 1.0 for e, t in zip(exs, r.text)) / len(exs)
    assert acc >= 0.85, f"{preset}: accuracy with sampled exits {acc:.2f}"
    assert r.batch_compute < 0.95, f"{preset}: exits barely used (compute {r.batch_compute:.2f})"


def test_compute_skipping_matches_masking_on_the_shipped_model():
    """`skip="compute"` on the shipped RL model: same tokens, exits and log-probs (1e-4) as masking."""
    from eetools.io.exit_checkpoint import PRESETS
    from eetools.io.paths import data_dir

    if not (data_dir() / "models" / PRESETS["tiny-reasoner/rl"]).is_dir():
        pytest.skip("tiny-reasoner/rl not shipped yet")
    ee = eetools.load_exit_model("tiny-reasoner/rl")
    prompts = [e.prompt for e in tasks.get("addition").test_split()[:8]]
    a = ee.generate(prompts, 60, seed=5, temperature=1.0)
    b = ee.generate(prompts, 60, seed=5, temperature=1.0, skip="compute")
    assert (a.exit_layers[a.mask] < ee.n_layers).float().mean() > 0.2, "the test needs exits"
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers)
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.exit_logprobs, b.exit_logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("skip", ["compute", "mask"])
def test_finished_rows_leave_the_batch_without_changing_results(monkeypatch, skip):
    """Sums of different lengths end at different steps; dropping finished rows from the batch and
    the KV cache gives the tokens, exits and log-probs (1e-4) of keeping every row to the end."""
    from transformers.cache_utils import DynamicCache

    from eetools.core import generation

    ee = eetools.load_exit_model("tiny-reasoner/calibrated")
    prompts = [e.prompt for e in tasks.get("addition").test_split()[:8]]
    selects = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(
        DynamicCache, "batch_select_indices", lambda self, idx: (selects.append(len(idx)), select(self, idx))
    )
    a = ee.generate(prompts, 80, seed=5, temperature=1.0, skip=skip)
    assert selects and min(selects) < len(prompts), "the test needs rows that finish early"
    monkeypatch.setattr(generation._Decoder, "_drop_finished", lambda self, done, n_done: None)
    b = ee.generate(prompts, 80, seed=5, temperature=1.0, skip=skip)
    assert int(a.n_tokens.min()) < int(a.n_tokens.max())
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers) and torch.equal(a.mask, b.mask)
    for name in ("token_logprobs", "exit_logprobs", "exit_probs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=0)


@pytest.mark.parametrize("skip", ["compute", "mask"])
def test_repeated_prompts_are_prefilled_once_without_changing_results(monkeypatch, skip):
    """RL decodes k rollouts of each prompt: each distinct prompt is prefilled once and its cache
    copied to its duplicates, giving the tokens, exits and log-probs (1e-4) of prefilling every row."""
    from eetools.core import generation
    from eetools.core import model as exits

    ee = eetools.load_exit_model("tiny-reasoner/calibrated")
    examples = tasks.get("addition").test_split()[:3]
    prompts = [e.prompt for e in examples for _ in range(4)]
    widths = []
    forward = exits.EarlyExitModel.run_with_exits
    monkeypatch.setattr(
        exits.EarlyExitModel,
        "run_with_exits",
        lambda self, tokens, *a, **k: (widths.append(len(tokens)), forward(self, tokens, *a, **k))[1],
    )
    a = ee.generate(prompts, 40, seed=5, temperature=1.0, skip=skip)
    assert widths[0] == 3, "the prefill should run on the 3 distinct prompts"
    monkeypatch.setattr(generation, "distinct_rows", lambda rows: None)
    widths.clear()
    b = ee.generate(prompts, 40, seed=5, temperature=1.0, skip=skip)
    assert widths[0] == len(prompts)
    assert not torch.equal(a.tokens[0], a.tokens[1]), "rollouts of one prompt should still differ"
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers) and torch.equal(a.mask, b.mask)
    for name in ("token_logprobs", "exit_logprobs", "exit_probs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=0)


def test_slow_adapters_keep_the_full_depth_model_near_the_base():
    """The `rl-slow-adapters` preset exists for this: with no exit, its adapted model stays as close to
    the base model on ToM reasoning as the calibrated one (KL per token), where the `rl` preset's adapters,
    trained four times faster, moved it 18 times further (docs/experiments.md, "Slower adapters")."""
    exs = tasks.get("tom").test_split()[:8]

    def kl_to_base(preset: str) -> float:
        ee = eetools.load_exit_model(preset)
        kls = []
        for e in exs:
            toks = ee.model.to_tokens(e.text)
            start = ee.model.to_tokens(e.prompt).shape[1] - 1  # positions predicting the reasoning
            with torch.no_grad():
                pol = ee.model(toks, return_type="logits")[0, start:-1].float().log_softmax(-1)
                with ee.adapters_disabled():
                    ref = ee.model(toks, return_type="logits")[0, start:-1].float().log_softmax(-1)
            kls.append(float((pol.exp() * (pol - ref)).sum(-1).mean()))
        return sum(kls) / len(kls)

    slow, rl, calibrated = (kl_to_base(f"tiny-reasoner/{p}") for p in ("rl-slow-adapters", "rl", "calibrated"))
    assert slow < 2 * calibrated and slow < rl / 4, (slow, rl, calibrated)


def test_the_lam6_preset_with_its_exit_rules_saves_40_percent_within_a_point():
    """README's operating point: `tiny-reasoner/rl-lam6` at the default threshold 0.5 with patience 1 and a
    lens-confidence floor of 0.9 (99.6 % / 40.6 % on the 500 test prompts); here the first 100."""
    ee = eetools.load_exit_model("tiny-reasoner/rl-lam6")
    ev = eetools.evaluate(
        ee,
        "addition",
        n=100,
        mode="threshold",
        threshold=0.5,
        patience=1,
        min_confidence=0.9,
        compare=False,
        progress=False,
    )
    row = ev.summary.set_index("system").loc["model"]
    assert row["accuracy"] >= 0.99 and row["layers_saved"] >= 0.40, row.to_dict()
    plain = eetools.evaluate(ee, "addition", n=100, mode="threshold", threshold=0.5, compare=False, progress=False)
    assert (
        plain.summary.set_index("system").loc["model", "layers_saved"] > row["layers_saved"]
    )  # the rules hold exits back


def test_shipped_mixed_style_model_chooses_both_styles():
    """`tiny-reasoner-mixed/calibrated` (docs/experiments.md 2026-12-04 (13)): greedy, no exits, on 40 held-out
    sums of its regime (``steps-small``: 1-2 digit operands) it answers some tersely and writes the rest, and
    both its written and its terse answers are right (requirement (c) of issue 30)."""
    from eetools.io.paths import data_dir

    if not (data_dir() / "models" / "tiny-reasoner-mixed-calibrated").is_dir():
        pytest.skip("tiny-reasoner-mixed/calibrated not shipped")
    ee = eetools.load_exit_model("tiny-reasoner-mixed/calibrated")
    task = tasks.get("steps-small")
    exs = task.test_split()[:40]
    with ee.adapters_disabled():
        r = ee.generate([e.prompt for e in exs], task.max_new_tokens, mode="off", temperature=0, seed=0)
        forced = ee.generate([e.prompt + "A: " for e in exs], task.max_new_tokens, mode="off", temperature=0, seed=0)
    comps = [tasks.cut_at_answer(t) for t in r.text]
    terse = [task.written_lines(c) == 0 for c in comps]
    assert 0.2 <= sum(terse) / len(terse) <= 0.8, f"terse share {sum(terse) / len(terse):.2f}"
    written = [task.score(e, c) == 1.0 for e, c, t in zip(exs, comps, terse) if not t]
    assert sum(written) / len(written) >= 0.9
    silent = [task.score(e, tasks.cut_at_answer("A: " + t)) == 1.0 for e, t in zip(exs, forced.text)]
    assert sum(silent) / len(silent) >= 0.9
