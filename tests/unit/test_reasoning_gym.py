"""reasoning-gym datasets as Tasks, and answer protocols: verifiers, splits, chat prompts, an RL step."""

from __future__ import annotations

import sys

import pytest
import torch

from eetools import tasks
from eetools.tasks.protocols import PROTOCOLS, get_protocol

pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed (pip install 'eetools[gym]')")

DATASETS = ["leg_counting", "aiw", "basic_arithmetic", "chain_sum"]


def _wrong(answer: str) -> str:
    """A wrong integer answer that does not contain the right one (+1 changes the last digit)."""
    return str(int(answer) + 1)


# ---- protocols on hand-written texts


def test_answer_line_protocol_is_the_shipped_tasks_behaviour():
    p = get_protocol("answer-line")
    text = "1+2+0=3\nA: 3\nQ: 5+5\nA: 10\n"
    assert p.extract(text) == "10"  # the last answer line
    assert p.cut(text) == "1+2+0=3\nA: 3\n"  # up to the first, its newline kept
    assert p.cut("A: 7") == "A: 7" and p.cut("A: 7\nmore") == "A: 7\n"
    assert p.cut("no answer here\nA:5") == "no answer here\nA:5" and p.extract("A:5") is None
    assert p.extract(p.format("42")) == "42" and p.format("42") == "A: 42\n"
    assert tasks.cut_at_answer(text) == p.cut(text)
    assert tasks.get("addition").protocol.name == "answer-line" and tasks.get("tom").protocol.name == "answer-line"


def test_tags_protocol():
    p = get_protocol("tags")
    text = "so 3 legs\n<answer> 8 </answer> wait, <answer>9</answer> end"
    assert p.extract(text) == "9"
    assert p.cut(text) == "so 3 legs\n<answer> 8 </answer>"
    assert p.extract(p.cut(text)) == "8"
    assert p.extract("<answer>two\nlines</answer>") == "two\nlines"
    assert p.extract("<answer>8") is None and p.cut("<answer>8") == "<answer>8"
    assert p.extract("8") is None and p.extract(None) is None and p.extract(3) is None


def test_boxed_protocol_nests_braces():
    p = get_protocol("boxed")
    assert p.extract(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert p.cut(r"so $\boxed{\frac{1}{2}}$. Also \boxed{3}") == r"so $\boxed{\frac{1}{2}}"
    assert p.extract(r"\boxed{1} then \boxed{ 2 }") == "2"
    assert p.extract(r"\boxed{1") is None and p.cut(r"x \boxed{1") == r"x \boxed{1"
    assert p.extract(r"\boxed{3} and \boxed{4") == "3"  # an unclosed box after a closed one
    assert p.extract(p.format("-4")) == "-4"


def test_last_line_protocol():
    p = get_protocol("last-line")
    assert p.extract("step one\nstep two\n 12 \n\n") == "12"
    assert p.extract("") is None and p.extract("\n \n") is None
    assert p.cut("a\nb\n") == "a\nb\n"  # nothing marks the answer's end: the whole completion
    assert p.extract(p.format("12")) == "12"


def test_last_number_protocol_reads_prose_answers():
    p = get_protocol("last-number")
    assert p.extract("4 + 4 = 8 legs.") == "8" and p.extract("so x is -3") == "-3"
    assert p.extract("The answer is 1,024.") == "1024" and p.extract("pi is about 3.14") == "3.14"
    assert p.extract("v2 has 2.5 and 7.") == "7"  # a digit inside a word is no number; the full stop ends it
    assert p.extract("no digits") is None and p.extract(None) is None and p.extract("") is None
    assert p.cut("8 legs\nthen 9") == "8 legs\nthen 9"  # nothing marks the end: the whole completion
    assert p.extract(p.format("-12")) == "-12"


def test_final_answer_protocol_reads_the_phrase():
    p = get_protocol("final-answer")
    assert p.extract("3 + 2 = 5\nThe answer is 5.") == "5"
    assert p.extract("The final answer is -4 + 9 = 5.") == "5"  # an equation gives its last side
    assert p.extract("Final answer: **7**") == "7" and p.extract("answer: 5\nThe answer is 6.") == "6"
    assert p.extract("The answer is\n") is None and p.extract("5") is None and p.extract(None) is None
    assert p.cut("The answer is 5.\nQuestion: 1+1\nThe answer is 2.") == "The answer is 5.\n"
    assert p.cut("no phrase") == "no phrase"
    assert p.extract(p.format("0.75")) == "0.75"


def test_shots_show_worked_examples_before_the_question():
    task = tasks.from_reasoning_gym("chain_sum", protocol="final-answer", shots=2, size=3)
    e = task.test_split()[0]
    assert e.prompt.startswith(task.protocol.instruction + "\n\nQuestion: ")
    assert e.prompt.count("Question: ") == 3 and e.prompt.count("Answer: The answer is ") == 2
    assert e.prompt.rstrip().endswith(e.meta["entry"]["question"].strip())
    assert task.score(e, "The answer is " + e.answer + ".") == 1.0
    plain = tasks.from_reasoning_gym("chain_sum", protocol="final-answer", size=3)
    assert [x.answer for x in plain.test_split()] == [x.answer for x in task.test_split()]  # same questions
    asked = tasks.from_reasoning_gym("chain_sum", protocol="last-number", instruction="Say it.", size=3)
    assert asked.test_split()[0].prompt.endswith("Say it.\n") and asked.protocol.name == "last-number"
    with pytest.raises(ValueError, match="shots must be an integer >= 0"):
        tasks.from_reasoning_gym("chain_sum", shots=-1)


def test_presets_resolve_by_name_with_the_datasets_test_split():
    from eetools.tasks.gym import PRESETS

    for name, spec in PRESETS.items():
        task = tasks.get("gym:" + name)
        assert task.name == "gym:" + name and task.protocol.name == spec["protocol"]
        assert task.max_new_tokens == spec["max_new_tokens"] and task.shots == spec["shots"]
        e = task.sample(1, seed=0)[0]
        assert e.task == "gym:" + name and task.score(e, task.protocol.format(e.answer)) == 1.0
        same = tasks.from_reasoning_gym(
            spec["dataset"],
            protocol=spec["protocol"],
            shots=spec["shots"],
            instruction=spec.get("instruction"),
            **spec["config"],
        )
        assert [x.prompt for x in same.test_split()[:5]] == [x.prompt for x in task.test_split()[:5]]
    assert tasks.from_reasoning_gym(name, protocol="tags").protocol.name == "tags"  # arguments override
    with pytest.raises(ValueError, match="unknown reasoning-gym preset 'chain_sum/huge'; presets: "):
        tasks.get("gym:chain_sum/huge")


def test_unknown_protocol_is_one_line_listing_them():
    with pytest.raises(ValueError, match="unknown answer protocol 'xml'; available: answer-line, tags") as e:
        get_protocol("xml")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown answer protocol"):
        tasks.from_reasoning_gym("aiw", protocol="xml")


def test_mixture_cuts_each_example_under_its_own_protocol():
    mix = tasks.get("addition+gym:aiw")
    add, aiw = mix.sample(2, seed=0)
    assert (add.task, aiw.task) == ("addition", "gym:aiw")
    text = "<answer>5</answer>\nA: 6\nA: 7\n"
    assert mix.cut(add, text) == "<answer>5</answer>\nA: 6\n"
    assert mix.cut(aiw, text) == "<answer>5</answer>"


# ---- the datasets' own verifiers through the protocols


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
@pytest.mark.parametrize("name", DATASETS)
def test_gold_answers_score_one_and_wrong_ones_zero(name, protocol):
    task = tasks.from_reasoning_gym(name, protocol=protocol, size=4)
    exs = task.sample(12, seed=0)
    assert len({e.prompt for e in exs}) > 1
    for e in exs:
        assert e.task == f"gym:{name}" and e.prompt.endswith(task.protocol.instruction + "\n")
        assert task.score(e, e.reasoning) == 1.0, (e.prompt, e.reasoning)
        assert task.score(e, "Let me think.\n" + task.protocol.format(e.answer)) == 1.0
        assert task.score(e, task.protocol.format(_wrong(e.answer))) == 0.0, (e.answer, _wrong(e.answer))
        assert task.score(e, task.protocol.format("banana")) == 0.0
        assert task.score(e, None) == 0.0 and task.score(e, "") == 0.0
        if protocol not in ("last-line", "last-number"):  # the bare answer is no answer under a marked protocol
            assert task.score(e, e.answer) == 0.0 and not task.is_well_formed(e.answer)
            assert task.score(e, task.cut(e, e.reasoning + "\nthen more")) == 1.0  # cut at the answer


def test_scoring_uses_the_datasets_own_score_answer(monkeypatch):
    task = tasks.from_reasoning_gym("leg_counting", size=2)
    e = task.sample(1, seed=3)[0]
    seen = []
    monkeypatch.setattr(task._verifier, "score_answer", lambda answer, entry: seen.append((answer, entry)) or 0.25)
    assert task.score(e, "<answer> 17 </answer>") == 0.25
    assert seen == [("17", e.meta["entry"])]
    monkeypatch.setattr(task._verifier, "score_answer", lambda answer, entry: 1 / 0)
    assert task.score(e, "<answer>17</answer>") == 0.0  # a verifier never raises
    assert e.meta["entry"]["metadata"]["source_dataset"] == "leg_counting"


# ---- splits, names, configs, install


def test_splits_are_deterministic_distinct_and_extend():
    task = tasks.from_reasoning_gym("leg_counting", seed=1, size=30)
    again = tasks.from_reasoning_gym("leg_counting", seed=1, size=30)
    assert task.sample(8, seed=0) == again.sample(8, seed=0)
    assert task.sample(8, seed=0) == task.sample(16, seed=0)[:8]  # a longer draw extends it
    train0, train1 = ({e.prompt for e in task.sample(30, seed=s)} for s in (0, 1))
    test = {e.prompt for e in task.test_split()}
    val = [e.prompt for e in task.validation_split(30)]
    assert len(test) == 30 and len(val) == 30 and task.test_split() == again.test_split()
    assert not test & set(val) and not test & train0 and not train0 & train1
    other = tasks.from_reasoning_gym("leg_counting", seed=2, size=30)
    assert not {e.prompt for e in other.test_split()} & test  # another base seed: another test split


def test_bad_names_and_configs_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'legs'; available: .*leg_counting") as e:
        tasks.from_reasoning_gym("legs")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown config min_legs .* its config fields: max_animals"):
        tasks.from_reasoning_gym("leg_counting", min_legs=2)
    with pytest.raises(ValueError, match="bad config .*min_animals must be positive"):
        tasks.from_reasoning_gym("leg_counting", min_animals=0)
    for bad in (dict(size=0), dict(seed=-1), dict(size=2.5), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match="must be an integer"):
            tasks.from_reasoning_gym("aiw", **bad)
    with pytest.raises(ValueError, match="gym:<reasoning-gym dataset>"):
        tasks.get("legcounting")
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'nope'"):
        tasks.get("gym:nope")
    small = tasks.from_reasoning_gym("leg_counting", min_animals=1, max_animals=1)
    assert all(len(e.meta["entry"]["metadata"]["animals"]) == 1 for e in small.sample(5, seed=0))


def test_datasets_generate_and_score_without_the_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("reasoning-gym tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in DATASETS:
        task = tasks.from_reasoning_gym(name, seed=5, size=3)
        assert all(task.score(e, e.reasoning) == 1.0 for e in task.test_split() + task.sample(3, seed=0))


def test_missing_install_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now fails
    with pytest.raises(ImportError, match=r"pip install 'eetools\[gym\]'"):
        tasks.from_reasoning_gym("aiw")


# ---- chat templates, a byte-level BPE model, an RL step

_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bpe_tokenizer(chat_template: str | None = _TEMPLATE):
    """A tiny byte-level BPE (every byte encodable, a few hundred merges learnt from task prompts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [e.prompt + e.reasoning for name in DATASETS for e in tasks.from_reasoning_gym(name).sample(50, 0)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.padding_side = "left"
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A tiny random Qwen3 with the byte-level BPE tokenizer and its chat template, written to a folder."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _bpe_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("bpe-qwen3")
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_prompts_go_through_the_chat_template_when_there_is_one():
    from eetools.io.tokenizer import build_tokenizer

    q = tasks.from_reasoning_gym("aiw").sample(1, seed=0)[0].meta["entry"]["question"]
    chat = tasks.from_reasoning_gym("aiw", tokenizer=_bpe_tokenizer(), system="Be brief.").sample(1, seed=0)[0]
    assert chat.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + q.strip())
    assert chat.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    plain = tasks.from_reasoning_gym("aiw", tokenizer=build_tokenizer()).sample(1, seed=0)[0]  # no template
    assert plain.prompt == q.strip() + "\n\n" + get_protocol("tags").instruction + "\n"
    bos_template = "{{ bos_token }}" + _TEMPLATE  # a template that writes <bos> (Llama-style)
    tok = _bpe_tokenizer(bos_template)
    with_bos = tasks.from_reasoning_gym("aiw", tokenizer=tok).sample(1, seed=0)[0].prompt
    assert with_bos.startswith("<|im_start|>user")  # encoding prepends it: the model sees one


def test_rl_step_on_a_byte_level_bpe_model(bpe_folder, monkeypatch):
    import eetools
    from eetools.train.rl import train_rl

    bridge = eetools.load_model(bpe_folder)
    torch.manual_seed(0)
    ee = eetools.attach_exit_heads(bridge, layers=[1, 2, 3])
    with torch.no_grad():
        for h in ee.heads:
            h.net[-1].bias.fill_(-0.5)
    task = tasks.get("gym:leg_counting", tokenizer=ee)
    assert "<|im_start|>assistant\n" in task.sample(1, seed=0)[0].prompt
    calls = []
    real = task._verifier.score_answer
    monkeypatch.setattr(task._verifier, "score_answer", lambda a, e: calls.append(a) or real(a, e))
    monkeypatch.setattr(task.protocol, "extract", lambda text: text[-3:])  # every rollout reaches the verifier
    before = [p.detach().clone() for p in ee.trainable_parameters()]
    res = train_rl(ee, task, steps=1, prompts_per_step=2, k=2, max_new_tokens=6, eval_every=0, progress=False, lr=1e-2)
    assert len(res.history) == 1
    assert len(calls) == 8 and calls[:4] == calls[4:]  # 2 prompts x k 2: the reward, then the logged score
    row = res.history.iloc[0]
    assert all(torch.isfinite(torch.tensor(float(row[c]))) for c in ("reward", "task", "kl", "compute"))
    assert row["coherence"] != row["coherence"]  # NaN: reasoning-gym checks answers, not steps
    assert any(not torch.equal(a, b) for a, b in zip(before, ee.trainable_parameters()))


def test_cli_calibrates_on_a_gym_task(bpe_folder, tmp_path, capsys):
    from eetools.cli import main

    out = tmp_path / "cal"
    argv = ["calibrate", "--model", str(bpe_folder), "--task", "gym:aiw", "--steps", "1", "--batch-size", "2"]
    assert main(argv + ["--lora-r", "2", "--out", str(out), "--no-progress"]) == 0
    assert (out / "model" / "heads.safetensors").exists()
    assert main(["calibrate", "--model", str(bpe_folder), "--task", "gym:legs", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown reasoning-gym dataset 'legs'" in err[0], err


def test_evaluate_runs_on_a_gym_task_through_the_bridges_template(bpe_folder):
    import eetools

    bridge = eetools.load_model(bpe_folder)
    assert "<|im_start|>assistant\n" in tasks.get("gym:aiw", tokenizer=bridge).test_split()[0].prompt
    torch.manual_seed(0)
    ee = eetools.attach_exit_heads(bridge, layers=[1, 2, 3])
    ev = eetools.evaluate(ee, "gym:aiw", n=3, max_new_tokens=4, progress=False)
    assert set(ev.summary["system"]) == {"model", "base", "oracle"}
    assert ev.summary["accuracy"].between(0, 1).all() and ev.summary["compute"].between(0, 1).all()
    assert ev.summary["coherence_reasoning"].isna().all()  # no step checker: NaN, not a score of 0
