"""The steps task: optional column lines, the verifier reads the answer only, verbosity and intermediates."""

import pytest

from eetools import tasks
from eetools.tasks.steps import StepsTask


def test_every_style_of_the_same_sum_scores_one():
    t = StepsTask()
    for style in ("full", "partial", "terse"):
        ex = t.make(4821, 397, style)
        assert ex.prompt == "S: 4821+397\n"
        assert t.score(ex, ex.reasoning) == 1.0
    assert t.make(47, 38, "terse").reasoning == "A: 85\n"
    assert t.make(47, 38, "partial", written=1).reasoning == "7+8+0=15\nA: 85\n"
    assert t.make(47, 38, "full").reasoning == "7+8+0=15\n4+3+1=8\nA: 85\n"


def test_verifier_scores_the_answer_whatever_the_style_and_rejects_wrong_or_malformed():
    t = StepsTask()
    ex = t.make(47, 38, "full")
    assert t.score(ex, "A: 85\n") == 1.0
    assert t.score(ex, "A: 84\n") == 0.0
    assert t.score(ex, "junk\nA: 85\n") == t.malformed_score
    assert t.score(ex, None) == 0.0


def test_verbosity_style_and_steps_count_written_lines():
    t = StepsTask()
    ex = t.make(472, 38, "full")  # three columns
    assert t.verbosity(ex, "A: 510\n") == 0.0
    assert t.verbosity(ex, "2+8+0=10\nA: 510\n") == pytest.approx(1 / 3)
    assert t.verbosity(ex, ex.reasoning) == 1.0
    assert StepsTask.style_of(ex, "A: 510\n") == "terse"
    assert StepsTask.style_of(ex, "2+8+0=10\nA: 510\n") == "partial"
    assert StepsTask.style_of(ex, ex.reasoning) == "full"
    assert t.steps(ex, "A: 510\n") == [] and t.coherence(ex, "A: 510\n") == 0.0
    assert t.steps(ex, "2+8+0=10\n7+3+1=9\nA: 510\n") == [True, False]


def test_intermediates_give_column_sums_carries_and_where_their_lines_start():
    ex = StepsTask().make(47, 38, "terse")
    rows = StepsTask.intermediates(ex)
    assert [(r["sum"], r["digit"], r["carry_out"], r["offset"]) for r in rows] == [(15, 5, 1, 0), (8, 8, 0, 9)]
    full = StepsTask().make(47, 38, "full").reasoning
    assert full[rows[0]["offset"] :].startswith("7+8+0=15\n")
    assert full[rows[1]["offset"] :].startswith("4+3+1=8")


def test_mixture_draws_every_style_and_is_seeded():
    t = tasks.get("steps")
    exs = t.sample(300, seed=1)
    styles = {e.meta["style"] for e in exs}
    assert styles == {"full", "partial", "terse"}
    assert [e.to_json() for e in t.sample(20, seed=1)] == [e.to_json() for e in exs[:20]]
    # sums without a carry are written tersely more often than sums with one
    easy = [e for e in exs if all(r["carry_out"] == 0 for r in StepsTask.intermediates(e))]
    hard = [e for e in exs if e not in easy]
    share = lambda xs: sum(e.meta["style"] == "terse" for e in xs) / len(xs)  # noqa: E731
    assert share(easy) > share(hard)


def test_variants_and_test_split():
    assert {e.meta["style"] for e in tasks.get("steps-terse").sample(20, 0)} == {"terse"}
    assert {e.meta["style"] for e in tasks.get("steps-full").sample(20, 0)} == {"full"}
    split = tasks.get("steps").test_split()
    assert len(split) == 200 and split == tasks.get("steps").test_split()
    assert not {e.prompt for e in split} & {e.prompt for e in tasks.get("steps").validation_split(50)}
    assert isinstance(tasks.get("addition+steps"), tasks.MixtureTask)


def test_small_regime_variants_draw_one_and_two_digit_operands():
    """ "steps-small" (the regime whose terse style a tiny model learns): 1-2 digit operands, terse >= half."""
    xs = tasks.get("steps-small").sample(400, 0)
    sizes = {len(str(e.meta[k])) for e in xs for k in ("a", "b")}
    assert sizes == {1, 2}
    assert 0.5 <= sum(e.meta["style"] == "terse" for e in xs) / len(xs) <= 0.7
    choice = tasks.get("steps-small-choice").sample(400, 0)
    assert 0.3 <= sum(e.meta["style"] == "terse" for e in choice) / len(choice) <= 0.6
    assert {e.meta["style"] for e in tasks.get("steps-small-terse").sample(20, 0)} == {"terse"}
    assert {e.meta["style"] for e in tasks.get("steps-small-full").sample(20, 0)} == {"full"}
    split = tasks.get("steps-small").test_split()
    assert max(max(e.meta["a"], e.meta["b"]) for e in split) < 100 and split != tasks.get("steps").test_split()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"style": "silent"}, "style must be one of"),
        ({"min_digits": 3, "max_digits": 2}, "min_digits <= max_digits"),
        ({"p_terse_easy": 1.5}, "p_terse_easy must be a probability"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepsTask(**kwargs)
    with pytest.raises(ValueError, match="written must be in"):
        StepsTask().make(47, 38, "partial", written=5)
