"""SmolLM2-135M-Instruct's own greedy chat answers to reasoning-gym prompts, for tuning and measuring readouts.

Writes ``<out>/train.jsonl`` and ``<out>/heldout.jsonl``: one ``{"dataset", "prompt", "answer"}`` per
line, ``prompt`` the chat-formatted prompt text (the model's chat template, generation prompt
added) and ``answer`` its greedy continuation (up to ``--max-new-tokens``, EOS removed). The two
files draw prompts from the same datasets with different reasoning-gym seeds (no prompt in both).

    python scripts/smollm2_answers.py --out runs/smollm2-answers

``--model`` is a real-model preset (default ``smollm2-135m``, converted once by `eetools.io.gguf`) or an
HF-format folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DATASETS = (
    "basic_arithmetic",
    "leg_counting",
    "letter_counting",
    "word_sorting",
    "spell_backward",
    "number_sorting",
    "family_relationships",
    "syllogism",
    "chain_sum",
    "gsm_symbolic",
    "caesar_cipher",
    "count_primes",
)


def prompts(n_per: int, seed: int) -> list[tuple[str, str]]:
    import reasoning_gym

    out = []
    for name in DATASETS:
        ds = reasoning_gym.create_dataset(name, seed=seed, size=n_per)
        out += [(name, ds[i]["question"]) for i in range(n_per)]
    return out


@torch.no_grad()
def answers(model, tok, questions: list[str], max_new_tokens: int, batch: int) -> list[tuple[str, str]]:
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    out = []
    for b in range(0, len(texts), batch):
        chunk = texts[b : b + batch]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for t, g in zip(chunk, gen[:, enc["input_ids"].shape[1] :]):
            out.append((t, tok.decode(g, skip_special_tokens=True).strip()))
        print(f"{len(out)}/{len(texts)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="real-model preset or HF folder")
    ap.add_argument("--out", default="runs/smollm2-answers")
    ap.add_argument("--train-per-dataset", type=int, default=20)
    ap.add_argument("--heldout-per-dataset", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eetools.io.gguf import PRESETS, preset_folder

    folder = str(preset_folder(args.model)) if args.model in PRESETS else args.model
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("heldout", args.heldout_per_dataset, 1), ("train", args.train_per_dataset, 0)):
        if (out / f"{split}.jsonl").is_file():  # written whole (renamed into place): keep it
            continue
        qs = prompts(n, seed)
        res = answers(model, tok, [q for _, q in qs], args.max_new_tokens, args.batch)
        with open(out / f"{split}.jsonl.tmp", "w") as f:
            for (name, _), (p, a) in zip(qs, res):
                f.write(json.dumps({"dataset": name, "prompt": p, "answer": a}) + "\n")
        (out / f"{split}.jsonl.tmp").rename(out / f"{split}.jsonl")


if __name__ == "__main__":
    main()
