"""Why answers break under real exits: the exit itself, or the frozen context before it.

`scripts/exit_token_errors.py` simulates exits teacher-forced on full-depth completions, so every token
sees full-depth keys and values of the tokens before it. Real decoding differs: an exited token's residual
stays frozen, and every later token reads keys and values computed from it. This script decodes a task's
prompts twice, at full depth and with thresholded exits (real decoding, `skip="mask"`), and for every answer
the exits broke finds the first generated token where the two rollouts part. It then replays the exited
rollout with its exits prescribed, except that the parting token is predicted at full depth:

- "exit": at full depth, in the same (exited) context, the model predicts the full-depth token: the exit at
  that token made the mistake (its head, or the patience rule, let it go too early);
- "context": even at full depth the model now predicts another token: earlier exits, through their frozen
  residuals, changed what this token sees (the adapters' job, not the heads').

It also lists the logit lens's probability of the token each wrong exit emitted, at its exit layer and in
its own context, beside the same for every exited token of the exited rollouts (how sure the lens was when
it exited), which is what a floor on that probability (`min_confidence`) acts on.

    python scripts/exit_divergence.py EXIT_MODEL --threshold 0.6 [--patience 1] [--min-confidence 0.9] [--max-entropy 1.0]
        [--task addition] [--n 500] [--split test]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from eetools.core.rule import UNSET, ExitRule


@dataclass
class Parting:
    """Where one broken answer left the full-depth rollout."""

    prompt: str
    position: int  # index of the first differing generated token
    exit_layer: int  # layer the differing token was predicted at (n_layers: no exit)
    full_depth: str  # the full-depth rollout's token there
    exited: str  # the exited rollout's token there
    replayed: str  # the token predicted at full depth in the exited rollout's context
    lens_p: float  # the logit lens's probability of the exited token at its exit layer (nan without an exit)
    earlier_exits: int  # exited tokens before the parting one
    cause: str  # "exit" or "context"


def replay_top(ee_model, prompt_ids, new_ids, exit_layers, k: int, full_depth_at_k: bool = True) -> int:
    """Top token for generated position `k` when a rollout is replayed (teacher-forced) with its exits
    prescribed; with `full_depth_at_k` the position predicting token `k` runs at full depth instead."""
    L = ee_model.n_layers
    tokens = torch.cat([prompt_ids, new_ids[:k]]).unsqueeze(0)
    exit_at = torch.full_like(tokens, L)
    start = len(prompt_ids) - 1  # the position that predicts the first generated token
    exit_at[0, start : start + k + 1] = exit_layers[: k + 1]
    if full_depth_at_k:
        exit_at[0, -1] = L
    with torch.no_grad():
        out = ee_model(tokens, exit_layers=exit_at)
    return int(out.logprobs[0, -1].argmax())


def exit_confidences(ee_model, rollout) -> torch.Tensor:
    """The logit lens's probability of each exited token of `rollout` at its exit layer, in its own context,
    ``[batch, new]`` (nan where a token did not exit): one teacher-forced replay of the batch with its exits
    prescribed."""
    from eetools.core.lens import capturing

    # the model as it is (adapters on); the forward takes the norm shortcut itself
    with torch.no_grad(), capturing(ee_model, ee_model.exit_layers, norm_shortcut=False) as resid:
        ee_model(rollout.sequences, exit_layers=rollout.prescribed_exit_layers(), attention_mask=rollout.attention_mask)
        P, out = rollout.prompt_tokens.shape[1], torch.full(rollout.tokens.shape, float("nan"))
        for layer in ee_model.exit_layers:
            rows, ks = ((rollout.exit_layers == layer) & rollout.mask).nonzero(as_tuple=True)
            if len(rows):  # token k is predicted at position P + k - 1
                p = ee_model.readout(resid[layer][rows, P + ks - 1]).float().softmax(-1)
                out[rows, ks] = p.gather(-1, rollout.tokens[rows, ks][:, None]).squeeze(-1).cpu()
    return out


@dataclass
class Divergence:
    """What `partings` found over `n` prompts."""

    partings: list[Parting]
    n: int
    exit_confidence: np.ndarray  # the lens's probability of every exited token at its exit layer


def partings(
    ee_model,
    task="addition",
    *,
    rule=None,
    threshold=UNSET,
    patience=UNSET,
    min_confidence=UNSET,
    max_entropy=UNSET,
    n: int = 500,
    split: str = "test",
    batch: int = 50,
) -> Divergence:
    """Every answer that full depth gets right and thresholded exits get wrong, with where and why it
    parted, and the lens's confidence at every exit. The exits follow `rule` (an `ExitRule` of mode
    "threshold"), or one built from `threshold`, `patience`, `min_confidence` and `max_entropy`."""
    from eetools import tasks

    if rule is None and threshold is UNSET:
        raise TypeError("partings needs a threshold (or a rule)")
    rule = ExitRule.from_kwargs(
        rule,
        n_exit=len(ee_model.exit_layers),
        mode="threshold",
        threshold=threshold,
        patience=patience,
        min_confidence=min_confidence,
        max_entropy=max_entropy,
    )

    task = tasks.get(task) if isinstance(task, str) else task
    examples = task.test_split()[:n] if split == "test" else task.validation_split(n)
    tok = ee_model.model.tokenizer
    L, out, confidence = ee_model.n_layers, [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        prompts = [e.prompt for e in chunk]
        kw = dict(temperature=0.0, seed=0)
        with torch.no_grad():
            full = ee_model.generate(prompts, task.max_new_tokens, mode="off", **kw)
            ex = ee_model.generate(prompts, task.max_new_tokens, rule=rule, **kw)
        conf = exit_confidences(ee_model, ex)
        confidence.append(conf[~conf.isnan()].numpy())
        for r, e in enumerate(chunk):
            if task.score(e, full.text[r]) < 1 or task.score(e, ex.text[r]) >= 1:
                continue
            m = int(min(full.mask[r].sum(), ex.mask[r].sum()))
            differ = (full.tokens[r, :m] != ex.tokens[r, :m]).nonzero()
            if len(differ) == 0:  # equal up to the shorter one's EOS: only a length cut can do that
                continue
            k = int(differ[0])
            prompt_ids = ex.prompt_tokens[r][ex.prompt_mask[r].bool()]
            replayed = replay_top(ee_model, prompt_ids, ex.tokens[r], ex.exit_layers[r], k)
            want = int(full.tokens[r, k])
            out.append(
                Parting(
                    prompt=e.prompt,
                    position=k,
                    exit_layer=int(ex.exit_layers[r, k]),
                    full_depth=tok.decode([want]),
                    exited=tok.decode([int(ex.tokens[r, k])]),
                    replayed=tok.decode([replayed]),
                    lens_p=float(conf[r, k]),
                    earlier_exits=int((ex.exit_layers[r, :k] < L).sum()),
                    cause="exit" if replayed == want else "context",
                )
            )
    return Divergence(out, len(examples), np.concatenate(confidence))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exit_model")
    ap.add_argument("--task", default="addition")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--split", choices=["test", "validation"], default="test")
    ap.add_argument("--threshold", type=float, required=True)
    ap.add_argument("--patience", type=int, default=0)
    ap.add_argument("--min-confidence", type=float, default=0.0)
    ap.add_argument("--max-entropy", type=float, default=None)
    a = ap.parse_args(argv)
    import eetools

    rule = ExitRule(
        mode="threshold",
        threshold=a.threshold,
        patience=a.patience,
        min_confidence=a.min_confidence,
        max_entropy=a.max_entropy,
    )
    ee_model = eetools.load_exit_model(a.exit_model)
    d = partings(ee_model, a.task, rule=rule, n=a.n, split=a.split)
    print(
        f"{d.n} prompts; {len(d.partings)} answers right at full depth and wrong with exits "
        f"(threshold {a.threshold}, patience {a.patience}, min_confidence {a.min_confidence}"
        + (f", max_entropy {a.max_entropy}" if a.max_entropy is not None else "")
        + ")"
    )
    c = d.exit_confidence
    print(
        f"{len(c)} exited tokens; share whose lens probability at the exit layer is below q: "
        + ", ".join(f"{q}: {float((c < q).mean()):.2%}" for q in (0.6, 0.8, 0.9, 0.95, 0.99))
    )
    if not d.partings:
        return
    df = pd.DataFrame([vars(p) for p in d.partings])
    print(df.groupby("cause").size().rename("answers").to_string())
    print(df.drop(columns="prompt").to_string(index=False))


if __name__ == "__main__":
    main()
