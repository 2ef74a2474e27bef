"""Re-make `docs/token_colouring.png`: tokens of the shipped calibrated model coloured by the layer they exited at.

Two held-out addition problems and one theory-of-mind story, greedy tokens, exits sampled from the
heads (seed 0), rendered by `ee.views.color_tokens_many` and saved uncropped by `ee.views.save`
(a headless Chromium screenshot as tall as the page):

    python scripts/token_colouring.py                        # docs/token_colouring.png
    python scripts/token_colouring.py --out tokens.html      # any format ee.views.save takes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import eetools as ee

ROOT = Path(__file__).resolve().parents[1]


def render(model: str = "tiny-reasoner/calibrated", seed: int = 0):
    """The `TokenView` of the picture: 2 addition prompts and 1 ToM prompt of the tasks' test splits."""
    exit_model = ee.load_exit_model(model)
    addition, tom = ee.tasks.get("addition"), ee.tasks.get("tom")
    prompts = [e.prompt for e in addition.test_split()[:2]] + [tom.test_split()[0].prompt]
    n = max(addition.max_new_tokens, tom.max_new_tokens)
    rollout = exit_model.generate(prompts, n, mode="sample", temperature=0, seed=seed)
    return ee.views.color_tokens_many(rollout)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-reasoner/calibrated", help="exit model (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled exits (default: 0)")
    parser.add_argument("--width", type=int, default=900, help="page width in CSS pixels (default: 900)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "token_colouring.png"), help="output file")
    args = parser.parse_args(argv)
    path = ee.views.save(render(args.model, args.seed), args.out, width=args.width)
    print(path)
    return path


if __name__ == "__main__":
    main()
