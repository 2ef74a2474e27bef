"""Greedy accuracy of a base model on reasoning-gym datasets, per config, prompt variant and answer protocol.

Each (dataset, config, variant) is decoded once, greedily, in batches (exits off, the base model's own
tokens); the completions are then scored under every answer protocol, so a protocol that reads prose
("the last number") is measured on the same text as the ones that need a marked answer. A variant is
the prompt: the instruction of one protocol, a system message, worked examples (``shots``). Rows already
in the CSV are skipped, so an interrupted run resumes.

    python scripts/gym_survey.py --model /work/smollm2-hf --n 30                 # the screen
    python scripts/gym_survey.py --model /work/smollm2-hf --n 200 --only basic_arithmetic/add1 \\
        --variants final --out data/results/gym_survey_n200.csv                  # a candidate at n = 200
    python scripts/gym_survey.py --table data/results/gym_survey*.csv            # the markdown table
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

_PLAIN = dict(allow_parentheses=False, allow_negation=False)
# (dataset, config label, config, max new tokens): easy configs first, then harder ones
GRID = [
    (
        "basic_arithmetic",
        "add1",
        dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+",), **_PLAIN),
        32,
    ),
    (
        "basic_arithmetic",
        "addsub1",
        dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"), **_PLAIN),
        32,
    ),
    (
        "basic_arithmetic",
        "add2",
        dict(min_terms=2, max_terms=2, min_digits=2, max_digits=2, operators=("+",), **_PLAIN),
        32,
    ),
    ("chain_sum", "2x1", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, allow_negation=False), 32),
    ("chain_sum", "3x1", dict(min_terms=3, max_terms=3, min_digits=1, max_digits=1, allow_negation=False), 32),
    ("products", "2x1", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, allow_negation=False), 32),
    ("leg_counting", "1", dict(min_animals=1, max_animals=1, max_instances=3), 48),
    ("leg_counting", "1-2", dict(min_animals=1, max_animals=2, max_instances=3), 48),
    ("letter_counting", "3-5", dict(min_words=3, max_words=5), 48),
    ("number_sorting", "3", dict(min_numbers=3, max_numbers=3, min_decimals=0, max_decimals=0), 48),
    ("spell_backward", "3-4", dict(min_word_len=3, max_word_len=4), 32),
    ("gcd", "2x<=20", dict(min_numbers=2, max_numbers=2, min_value=1, max_value=20), 32),
    ("coin_flip", "1-3", dict(min_trials=1, max_trials=3), 48),
    ("aiw", "default", dict(), 64),
]
# variant -> (protocol whose instruction the prompt carries, system message, worked examples); the text is
# scored under every protocol (a preset reads with one: instruction= keeps the variant's prompt)
VARIANTS = {
    "tags": ("tags", None, 0),
    "final": ("final-answer", None, 0),
    "number": ("last-number", None, 0),
    "system": ("final-answer", "You are a careful assistant. Answer briefly.", 0),
    "fewshot3": ("final-answer", None, 3),
}
FIELDS = [
    "dataset",
    "config",
    "variant",
    "protocol",
    "n",
    "correct",
    "accuracy",
    "ci_low",
    "ci_high",
    "max_new_tokens",
    "seconds",
]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson interval of `k` successes in `n` trials."""
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def table(paths: list[str]) -> str:
    """A markdown table of survey CSVs: one row per (dataset, config, variant, n), each protocol's accuracy,
    and the best protocol with its 95 % interval."""
    rows: dict[tuple, dict[str, dict]] = {}
    for path in paths:
        with open(path) as f:
            for r in csv.DictReader(f):
                rows.setdefault((r["dataset"], r["config"], r["variant"], int(r["n"])), {})[r["protocol"]] = r
    protos = ["tags", "final-answer", "last-number", "last-line", "boxed", "answer-line"]
    out = [
        "| dataset | config | variant | n | " + " | ".join(protos) + " | best (95 % CI) |",
        "|" + "---|" * (len(protos) + 5),
    ]
    for (dataset, config, variant, n), by in rows.items():
        best = max(by.values(), key=lambda r: float(r["accuracy"]))
        accs = " | ".join(f"{float(by[p]['accuracy']):.0%}" if p in by else "" for p in protos)
        ci = f"{best['protocol']} {float(best['accuracy']):.1%} [{float(best['ci_low']):.1%}, {float(best['ci_high']):.1%}]"
        out.append(f"| {dataset} | {config} | {variant} | {n} | {accs} | {ci} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/work/smollm2-hf", help="an HF folder, a .gguf file or a preset")
    ap.add_argument("--n", type=int, default=30, help="test-split examples per cell")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--variants", default="fewshot3,final,tags", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--only", default="", help="comma-separated dataset or dataset/config labels (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the cores are shared)")
    ap.add_argument("--out", default="data/results/gym_survey.csv")
    ap.add_argument("--table", nargs="+", metavar="CSV", help="print the markdown table of these CSVs and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant {', '.join(bad)}; choose from: {', '.join(VARIANTS)}")
    only = {s for s in args.only.split(",") if s}
    grid = [g for g in GRID if not only or g[0] in only or f"{g[0]}/{g[1]}" in only]
    if not grid:
        raise SystemExit(f"--only {args.only!r} matches no dataset/config of the grid; e.g. basic_arithmetic/add1")

    import torch

    import eetools as ee
    from eetools.core.model import attach_exit_heads
    from eetools.core.rule import ExitRule
    from eetools.tasks.gym import from_reasoning_gym
    from eetools.tasks.protocols import PROTOCOLS, get_protocol

    out = Path(args.out)
    done = set()
    if out.exists():
        with out.open() as f:
            done = {(r["dataset"], r["config"], r["variant"], int(r["n"])) for r in csv.DictReader(f)}
    cells = [(g, v) for g in grid for v in variants if (g[0], g[1], v, args.n) not in done]
    torch.set_num_threads(args.threads)
    model = ee.load_model(args.model)
    ee_model = attach_exit_heads(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as f, tqdm(total=len(cells) * args.n, desc="gym survey") as bar:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for (dataset, label, config, max_new), variant in cells:
            protocol, system, shots = VARIANTS[variant]
            task = from_reasoning_gym(
                dataset, size=args.n, protocol=protocol, tokenizer=model, system=system, shots=shots, **config
            )
            exs, texts, t0 = task.test_split(), [], time.perf_counter()
            for i in range(0, len(exs), args.batch_size):
                batch = [e.prompt for e in exs[i : i + args.batch_size]]
                r = ee_model.generate(batch, max_new, rule=ExitRule(mode="off"), temperature=0.0, skip="compute")
                texts += r.text
                bar.update(len(batch))
            seconds = time.perf_counter() - t0
            ks = {}
            for name in PROTOCOLS:
                p = get_protocol(name)
                scored = from_reasoning_gym(dataset, size=1, protocol=p, **config)
                k = ks[name] = sum(scored.score(e, p.cut(t)) == 1.0 for e, t in zip(exs, texts))
                lo, hi = wilson(k, len(exs))
                w.writerow(
                    dict(
                        dataset=dataset,
                        config=label,
                        variant=variant,
                        protocol=name,
                        n=len(exs),
                        correct=k,
                        accuracy=round(k / len(exs), 4),
                        ci_low=round(lo, 4),
                        ci_high=round(hi, 4),
                        max_new_tokens=max_new,
                        seconds=round(seconds, 1),
                    )
                )
            f.flush()
            best = max(ks, key=ks.get)
            tqdm.write(
                f"{dataset}/{label} {variant}: best {best} {ks[best]}/{len(exs)} ({seconds:.0f} s); e.g. {texts[0][:60]!r}"
            )


if __name__ == "__main__":
    main()
