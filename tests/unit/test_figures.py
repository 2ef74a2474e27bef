"""Paper figures from data: shapes, sums, determinism (no trained model needed)."""

import numpy as np
import pandas as pd
import torch

from eetools import tasks
from eetools.analysis.figures import exit_histogram_by_class
from eetools.core.rollout import Rollout
from eetools.views.figures import rl_dynamics_figure


def _rollout(text: str, exits: list[int], L: int = 4) -> Rollout:
    n = len(text)
    return Rollout(
        prompts=["Q: 12+34\n"],
        prompt_tokens=torch.ones(1, 2, dtype=torch.long),
        prompt_mask=torch.ones(1, 2, dtype=torch.long),
        tokens=torch.ones(1, n, dtype=torch.long),
        mask=torch.ones(1, n, dtype=torch.bool),
        exit_layers=torch.tensor([exits]),
        token_logprobs=torch.zeros(1, n),
        exit_logprobs=torch.zeros(1, n),
        exit_probs=torch.zeros(1, n, 3),
        text=[text],
        str_tokens=[list(text)],
        prompt_str_tokens=[["Q", ":"]],
        n_layers=L,
        layers=[1, 2, 3],
    )


def test_rl_dynamics_has_runs_light_mean_bold_and_base_dashed():
    h = pd.DataFrame(
        [
            {"run": r, "step": s, "accuracy": 0.5 + 0.1 * r, "compute": 1 - 0.1 * s, "coherence": 1.0}
            for r in range(3)
            for s in range(4)
        ]
    )
    fig = rl_dynamics_figure(h, base={"accuracy": 0.9, "compute": 1.0, "coherence": 1.0})
    means = [t for t in fig.data if t.name and t.name.startswith("mean")]
    assert len(means) == 3 and all(t.error_y.array is not None for t in means)
    assert np.allclose(means[0].y, [0.6] * 4)
    assert np.allclose(means[0].error_y.array, [0.1 / np.sqrt(3)] * 4)
    assert len(fig.data) == 3 * (3 + 1)
    assert any(s.line.dash == "dash" for s in fig.layout.shapes)


def test_exit_histogram_by_class_fractions_sum_to_one_per_class():
    ex = tasks.get("addition").make(12, 34)
    pieces = list(ex.reasoning)
    exits = [4] + [1, 1, 2, 1, 1, 3, 1, 4] * 10
    r = _rollout(ex.reasoning, exits[: len(pieces)])
    h = exit_histogram_by_class({"before": r, "after": r}, examples=[ex])
    sums = h.df.groupby(["system", "token_class"])["fraction"].sum()
    assert np.allclose(sums.to_numpy(), 1.0)
    assert {"format", "copied_digit", "computed_digit", "answer"} <= set(h.df.token_class)
    h.figure()
