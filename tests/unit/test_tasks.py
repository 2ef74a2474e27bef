"""Task generators, formats and verifiers (no model)."""

import pytest

import eetools.tasks as T
from eetools.io.tokenizer import build_tokenizer

GARBAGE = [
    "",
    " ",
    "\n\n",
    "A: ",
    "A:",
    "🙂 ünïcödé ∑",
    "A: " + "9" * 10_000,
    "x" * 100_000,
    "\x00\x01",
    "A: 12\nA: 13",
    None,
]


@pytest.mark.parametrize("name", T.NAMES)
def test_generator_is_deterministic_per_seed_and_varies_across_seeds(name):
    task = T.get(name)
    assert task.sample(20, seed=3) == task.sample(20, seed=3)
    assert [e.prompt for e in task.sample(20, seed=3)] != [e.prompt for e in task.sample(20, seed=4)]
    assert len({e.prompt for e in task.sample(200, seed=5)}) > 150


@pytest.mark.parametrize("name", T.NAMES)
def test_reference_reasoning_scores_one_and_every_step_is_right(name):
    task = T.get(name)
    for ex in task.sample(200, seed=0):
        assert task.score(ex, ex.reasoning) == 1.0
        assert all(task.steps(ex, ex.reasoning))
        assert ex.reasoning.endswith(f"A: {ex.answer}\n")


@pytest.mark.parametrize("name", T.NAMES)
@pytest.mark.parametrize("junk", GARBAGE)
def test_score_never_raises_and_rejects_garbage(name, junk):
    task = T.get(name)
    ex = task.sample(1, seed=0)[0]
    assert task.score(ex, junk) in (0.0, task.malformed_score)
    assert isinstance(task.steps(ex, junk if isinstance(junk, str) else ""), list)


def test_addition_wrong_and_malformed_answers():
    task = T.get("addition")
    ex = task.make(4821, 397)
    assert ex.answer == "5218"
    assert ex.reasoning == "1+7+0=8\n2+9+0=11\n8+3+1=12\n4+0+1=5\nA: 5218\n"
    wrong = ex.reasoning.replace("A: 5218", "A: 5219")
    assert task.score(ex, wrong) == 0.0
    # right answer, no written reasoning: lower than a well-formed completion
    assert task.score(ex, "A: 5218\n") == task.malformed_score < 1.0
    assert task.score(ex, "the sum is 5218\nA: 5218") < 1.0
    bad_step = ex.reasoning.replace("8+3+1=12", "8+3+1=13")
    assert task.steps(ex, bad_step) == [True, True, False, True]


def test_addition_final_carry_and_operand_range():
    task = T.get("addition")
    ex = task.make(99, 1)
    assert ex.reasoning == "9+1+0=10\n9+0+1=10\nA: 100\n"
    for e in task.sample(300, seed=1):
        a, b = e.meta["a"], e.meta["b"]
        assert 10 <= a < 100_000 and 10 <= b < 100_000


def test_tom_false_belief_logic():
    from eetools.tasks.tom import decision, placements, trace

    meta = {
        "agents": ["Ann", "Bob", "Eve"],
        "object": "ball",
        "start": "box",
        "events": [
            ["leave", "Bob"],
            ["move", "Ann", "bag"],
            ["enter", "Bob"],
            ["leave", "Eve"],
            ["move", "Ann", "jar"],
        ],
        "question": ["first", "Eve"],
    }
    assert placements(meta) == [("box", ["Ann", "Bob", "Eve"]), ("bag", ["Ann", "Eve"]), ("jar", ["Ann", "Bob"])]
    # the running belief is Eve's (the question's): she saw the move to the bag, not the one to the jar
    assert trace(meta) == [
        "box: Ann+ Bob+ Eve+ (Eve+ box)",
        "Bob out: Ann+ Bob- Eve+ (Eve+ box)",
        "bag: Ann+ Bob- Eve+ (Eve+ bag)",
        "Bob in: Ann+ Bob+ Eve+ (Eve+ bag)",
        "Eve out: Ann+ Bob+ Eve- (Eve- bag)",
        "jar: Ann+ Bob+ Eve- (Eve- bag)",
    ]
    assert trace({**meta, "question": ["reality"]})[-1] == "jar: Ann+ Bob+ Eve- (jar)"
    # second order: the questioned agents in the question's order, each with its mark on the line
    assert trace({**meta, "question": ["second", "Eve", "Bob"]})[2:4] == [
        "bag: Ann+ Bob- Eve+ (Eve+ Bob- box)",
        "Bob in: Ann+ Bob+ Eve+ (Eve+ Bob+ box)",
    ]
    assert decision(meta) == ("Eve saw bag", "bag")
    assert decision({**meta, "question": ["reality"]}) == ("now jar", "jar")
    assert decision({**meta, "question": ["first", "Bob"]}) == ("Bob saw jar", "jar")
    # Eve thinks Bob will look where both last saw the ball together: the box
    assert decision({**meta, "question": ["second", "Eve", "Bob"]}) == ("Eve Bob saw box", "box")


def test_tom_covers_all_question_kinds_and_scores_wrong_answers_zero():
    task = T.get("tom")
    exs = task.sample(300, seed=2)
    assert {e.meta["question"][0] for e in exs} == {"reality", "first", "second"}
    assert any(len(e.meta["agents"]) == 3 for e in exs) and any(len(e.meta["agents"]) == 2 for e in exs)
    ex = exs[0]
    other = next(c for c in ("box", "bag", "jar") if c != ex.answer)
    assert task.score(ex, ex.reasoning.replace(f"A: {ex.answer}", f"A: {other}")) == 0.0
    assert task.score(ex, f"A: {ex.answer}\n") == task.malformed_score
    # a line whose marks are dropped (the pre-2026-12 format) is malformed, the answer still right
    unmarked = ex.reasoning.replace("+", "").replace("-", "")
    assert task.score(ex, unmarked) == task.malformed_score


def test_frozen_test_splits_are_shipped_and_disjoint_from_training_seeds():
    for name in T.NAMES:
        split = T.get(name).test_split()
        assert len(split) >= 500
        assert split == T.get(name).sample(len(split), seed=-1)
        assert all(T.get(name).score(e, e.reasoning) == 1.0 for e in split)


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="available: addition, tom"):
        T.get("chess")


@pytest.mark.parametrize("name", T.NAMES)
def test_tokenizer_round_trips_every_task_text(name):
    tok = build_tokenizer()
    for ex in T.get(name).sample(300, seed=7):
        ids = tok(ex.text)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == len(ex.text) + 1
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == ex.text


def test_mixture_alternates_and_dispatches():
    mix = T.get("addition+tom")
    exs = mix.sample(6, seed=0)
    assert [e.task for e in exs] == ["addition", "tom"] * 3
    assert all(mix.score(e, e.reasoning) == 1.0 for e in exs)
    assert mix.sample(6, seed=0) == exs
    assert len(mix.test_split()) == 1000


@pytest.mark.parametrize("name", T.NAMES)
def test_max_new_tokens_fits_every_written_reasoning(name):
    from eetools.io.tokenizer import build_tokenizer

    tok = build_tokenizer()
    task = T.get(name)
    longest = max(
        len(tok(e.reasoning, add_special_tokens=False)["input_ids"]) + 1
        for e in task.sample(2000, seed=5) + task.test_split()
    )
    assert longest <= task.max_new_tokens, f"{name}: {longest} tokens > max_new_tokens {task.max_new_tokens}"


def test_false_belief_variant_asks_about_agents_who_missed_a_move():
    from eetools.tasks.tom import _presence

    exs = T.get("tom-false-belief").sample(200, seed=3)
    assert "tom-false-belief" not in T.NAMES and all(e.task == "tom" for e in exs)

    def missed(e):
        need = set(e.meta["question"][1:])
        return e.meta["question"][0] != "reality" and any(
            ev[0] == "move" and not need <= set(seen) for ev, seen in _presence(e.meta)
        )

    always = [missed(e) for e in T.TomTask(false_belief=1.0).sample(200, seed=3)]
    uniform = [missed(e) for e in T.get("tom").sample(200, seed=3)]
    # every story with a move someone missed gets such a question; uniform questions rarely do
    assert sum(always) > 2 * sum(uniform) and sum(uniform) < 0.3 * 200 < sum(missed(e) for e in exs)
    assert all(T.get("tom").score(e, e.reasoning) == 1.0 for e in exs)
    with pytest.raises(ValueError, match="false_belief"):
        T.TomTask(false_belief=1.5)


@pytest.mark.parametrize("name", ["addition", "tom", "addition+tom"])
def test_validation_split_is_fixed_and_leaves_out_the_test_split(name):
    task = T.get(name)
    val = task.validation_split(60)
    assert len(val) == 60 and [e.prompt for e in val] == [e.prompt for e in task.validation_split(60)]
    assert [e.prompt for e in task.validation_split(20)] == [e.prompt for e in val[:20]]
    assert not {e.prompt for e in val} & {e.prompt for e in task.test_split()}
    assert {e.prompt for e in val} != {e.prompt for e in task.sample(60, seed=0)}  # not a training draw


def test_validation_split_skips_prompts_of_the_test_split(monkeypatch):
    task = T.get("addition")
    first = task.sample(3, seed=T.base.VALIDATION_SEED)
    monkeypatch.setattr(type(task), "test_split", lambda self: first[:2])  # pretend two of them are test items
    assert [e.prompt for e in task.validation_split(3)] == [e.prompt for e in task.sample(5, seed="validation")[2:]]
