"""Coherence judges never raise on garbage and rank reasoning sensibly."""

import math

import pytest

from eetools import tasks
from eetools.analysis.judges import CallableJudge, JudgeError, ReasoningJudge, ReferenceLikelihoodJudge, score_all

GARBAGE = ["", "\n", "🙂 ünï", "A: 1", "x" * 50_000, None, 12]


@pytest.mark.parametrize("name", tasks.NAMES)
def test_reasoning_judge_scores_reference_one_and_garbage_zero(name):
    j = ReasoningJudge()
    for ex in tasks.get(name).sample(30, seed=0):
        assert j(ex, ex.reasoning) == 1.0
        for g in GARBAGE:
            assert j(ex, g) == 0.0


def test_reasoning_judge_partial_credit():
    ex = tasks.get("addition").make(4821, 397)
    half = ex.reasoning.replace("2+9+0=11", "2+9+0=12").replace("8+3+1=12", "8+3+1=13")
    assert ReasoningJudge()(ex, half) == 0.5


def test_callable_judge_clips_and_reports_failures():
    ex = tasks.get("addition").sample(1, seed=0)[0]
    assert CallableJudge(lambda e, c: 3.0)(ex, "x") == 1.0
    assert CallableJudge(lambda e, c: -1)(ex, "x") == 0.0

    def bad(e, c):
        raise RuntimeError("api down")

    with pytest.raises(JudgeError, match="api down"):
        CallableJudge(bad, name="llm")(ex, "some text")
    with pytest.raises(JudgeError, match="NaN"):
        CallableJudge(lambda e, c: math.nan)(ex, "x")
    assert score_all(lambda e, c: 0.5, [ex, ex], ["a", "b"]) == [0.5, 0.5]


def test_reference_likelihood_judge_normalises_to_greedy(tiny_ee):
    exs = tasks.get("addition").sample(3, seed=0)
    j = ReferenceLikelihoodJudge(tiny_ee).fit([e.prompt for e in exs], max_new_tokens=12)
    with tiny_ee.adapters_disabled():
        r = tiny_ee.generate([e.prompt for e in exs], 12, mode="off", temperature=0, seed=0)
    greedy = score_all(j, exs, r.text)
    assert all(0.3 < s <= 1.0 for s in greedy)
    assert sum(greedy) / 3 > 0.7
    for g in GARBAGE:
        s = j(exs[0], g)
        assert 0.0 <= s <= 1.0
