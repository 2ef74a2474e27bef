"""Where a model gets the ToM running belief wrong, teacher-forced, by case.

For every move line of the frozen ToM test split, feed the true text up to the bracket and
check the model's greedy prediction of every token in the brackets (the questioned agents with
their marks, then the belief); a line counts as wrong if any of them is. Error rates are split by
question kind and by whether the questioned agents saw the move (``saw=False``: the
false-belief case, where the belief must *not* follow the object).

    python scripts/tom_bracket_errors.py [MODEL_FOLDER] [--n 500]
"""

from __future__ import annotations

import argparse
import collections

import torch


def bracket_errors(model_dir: str | None = None, n: int = 500) -> dict[tuple, tuple[int, int]]:
    """``{(question kind, saw): (move lines, wrong brackets)}`` plus ``("all",)``."""
    from transformers import AutoModelForCausalLM

    from eetools import tasks
    from eetools.io.models import resolve
    from eetools.io.tokenizer import build_tokenizer
    from eetools.tasks.tom import _presence, trace

    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(resolve(model_dir)[0]).eval()
    stats = collections.defaultdict(lambda: [0, 0])
    for ex in tasks.get("tom").test_split()[:n]:
        ids = tok(ex.text)["input_ids"]  # prompt + reasoning, starting with <bos> as in training
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0].argmax(-1)
        start = len(tok(ex.prompt)["input_ids"])  # index of the first reasoning token
        kind, *need = ex.meta["question"]
        events = [None] + [(ev, seen) for ev, seen in _presence(ex.meta)]
        offset = 0
        for line, event in zip(trace(ex.meta), events):
            at = ex.reasoning.index(line, offset)
            offset = at + len(line)
            if event is None or event[0][0] != "move":
                continue
            b = start + at + line.rindex("(") + 1  # first token of the bracketed word
            word = line[line.rindex("(") + 1 : -1]
            wrong = any(pred[b - 1 + k].item() != ids[b + k] for k in range(len(word)))
            for key in (("all",), (kind, set(need) <= set(event[1]))):
                stats[key][0] += 1
                stats[key][1] += wrong
    return {k: tuple(v) for k, v in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="HF-format folder (default: the shipped model)")
    parser.add_argument("--n", type=int, default=500, help="test examples")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for key, (lines, wrong) in sorted(bracket_errors(args.model, args.n).items(), key=str):
        label = "all move lines" if key == ("all",) else f"{key[0]:8s} saw={key[1]}"
        print(f"{label:24s} {wrong:3d} / {lines:3d} wrong ({wrong / lines:.1%})")


if __name__ == "__main__":
    main()
