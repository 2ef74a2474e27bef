"""Which exited tokens break an answer: the token-level view of an exit model's threshold curve.

Teacher-forced on the model's own full-depth greedy completions of a task's prompts, every
completion token gets the heads' ``c_l`` at each exitable layer, the logit lens's argmax at every
layer and the full-depth argmax. Thresholded exits are then simulated token by token (a token exits
at the first exitable layer whose ``c_l`` reaches the threshold, and its prediction is the lens
argmax there): a sequence counts as kept when no exited token changes its prediction. This ignores
what a frozen residual does to later tokens, so it is a proxy of ``eetools tradeoff`` (on the
shipped-style models it tracks it within about a point), but it costs one forward per sequence and
shows where the wrong exits are: at which layer, and which token became which.

``--patience p`` adds the patience rule of early-exit classifiers (Zhou et al., 2020): a token may
exit at an exitable layer only if the lens argmax there equals those of the ``p`` exitable layers
before it (so the first ``p`` exitable layers cannot exit).

    python scripts/exit_token_errors.py EXIT_MODEL [--task addition] [--n 500] [--split test]
        [--threshold 0.7] [--patience 0 1 2]
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


@dataclass
class TokenExits:
    """Per sequence: ``c`` [tokens, exitable layers], ``lens`` argmax [tokens, n_layers], ``final`` argmax [tokens]."""

    c: list[np.ndarray]
    lens: list[np.ndarray]
    final: list[np.ndarray]
    exit_layers: list[int]
    n_layers: int


def token_exits(ee_model, task="addition", n: int = 500, split: str = "test", batch: int = 50) -> TokenExits:
    """Heads' exit probabilities and the lens at every layer for each completion token (teacher-forced)."""
    from eetools import tasks
    from eetools.core.encoding import encode_sequences
    from eetools.core.lens import capturing

    task = tasks.get(task) if isinstance(task, str) else task
    examples = task.test_split()[:n] if split == "test" else task.validation_split(n)
    L = ee_model.n_layers
    out = TokenExits([], [], [], list(ee_model.exit_layers), L)
    for i in range(0, len(examples), batch):
        prompts = [e.prompt for e in examples[i : i + batch]]
        with torch.no_grad():
            rollout = ee_model.generate(prompts, task.max_new_tokens, mode="off", temperature=0.0, seed=0)
            completions = [tasks.cut_at_answer(t) for t in rollout.text]
            ids, attn, predict = encode_sequences(ee_model, prompts, completions)
            # the model as it is (adapters on); the forward takes the norm shortcut itself
            with capturing(ee_model, range(L), norm_shortcut=False) as resid:
                res = ee_model(ids, attention_mask=attn)
            lens = torch.stack([ee_model.readout(resid[l]).argmax(-1) for l in range(L)], dim=-1)
            final = res.logprobs.argmax(-1)
            c = torch.sigmoid(res.exit_logits)
        for r in range(len(prompts)):
            m = predict[r]
            out.c.append(c[r][m].float().cpu().numpy())
            out.lens.append(lens[r][m].cpu().numpy())
            out.final.append(final[r][m].cpu().numpy())
    return out


def simulated_exits(te: TokenExits, threshold: float, patience: int = 0) -> list[np.ndarray]:
    """Exit layer of every token (n_layers = none) under the threshold and patience rules (the
    patience rule is `eetools.core.rule.lens_held`, the one `ExitRule` applies in generation)."""
    from eetools.core.rule import lens_held

    exits = []
    for c, lens in zip(te.c, te.lens):
        ex = np.full(len(c), te.n_layers)
        top = [torch.from_numpy(lens[:, layer]) for layer in te.exit_layers]  # the lens at each exitable layer
        for j, layer in enumerate(te.exit_layers):
            ok = (c[:, j] >= threshold) & (ex == te.n_layers)
            if patience:
                ok &= lens_held(top, j, patience).numpy()
            ex[ok] = layer
        exits.append(ex)
    return exits


def frontier(te: TokenExits, thresholds=THRESHOLDS, patience: int = 0) -> pd.DataFrame:
    """Per threshold: the share of sequences with no token changed by its exit, and the layers saved."""
    rows = []
    for t in thresholds:
        kept, used, tokens = 0, 0, 0
        for ex, lens, final in zip(simulated_exits(te, t, patience), te.lens, te.final):
            pred = np.where(ex < te.n_layers, lens[np.arange(len(ex)), np.minimum(ex, te.n_layers - 1)], final)
            kept += int((pred == final).all())
            used, tokens = used + int(ex.sum()), tokens + len(ex)
        rows.append(
            {
                "threshold": t,
                "patience": patience,
                "kept": kept / len(te.c),
                "layers_saved": 1 - used / (tokens * te.n_layers),
            }
        )
    return pd.DataFrame(rows)


def wrong_exits(te: TokenExits, threshold: float, patience: int = 0, decode=str) -> pd.DataFrame:
    """Exited tokens whose prediction changed, counted by (exit layer, full-depth token, exited token)."""
    count = collections.Counter()
    for ex, lens, final in zip(simulated_exits(te, threshold, patience), te.lens, te.final):
        for k in np.flatnonzero(ex < te.n_layers):
            got = lens[k, ex[k]]
            if got != final[k]:
                count[(int(ex[k]), decode(int(final[k])), decode(int(got)))] += 1
    return pd.DataFrame(
        [{"layer": l, "full_depth": a, "exited": b, "count": n} for (l, a, b), n in count.most_common()],
        columns=["layer", "full_depth", "exited", "count"],
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exit_model")
    ap.add_argument("--task", default="addition")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--split", choices=["test", "validation"], default="test")
    ap.add_argument("--threshold", type=float, default=0.7, help="where to list the wrong exits")
    ap.add_argument("--patience", type=int, nargs="+", default=[0, 1])
    a = ap.parse_args(argv)
    import eetools

    ee_model = eetools.load_exit_model(a.exit_model)
    te = token_exits(ee_model, a.task, a.n, a.split)
    print(f"{len(te.c)} sequences, {sum(len(f) for f in te.final)} completion tokens")
    curves = pd.concat([frontier(te, patience=p) for p in a.patience])
    print(
        curves.pivot(index="threshold", columns="patience", values=["kept", "layers_saved"])
        .sort_index(ascending=False)
        .round(3)
        .to_string()
    )
    tok = ee_model.model.tokenizer
    wrong = wrong_exits(te, a.threshold, decode=lambda i: tok.decode([i]))
    print(f"\nwrong exits at threshold {a.threshold} (patience 0): {int(wrong['count'].sum())}")
    print(wrong.to_string(index=False))


if __name__ == "__main__":
    main()
