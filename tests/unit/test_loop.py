"""The shared training loop on a toy parameter: cadence, resume, and the guards that save then stop."""

from dataclasses import dataclass

import pytest
import torch

from eetools.io.checkpoints import load_json, load_tensors, save_tensors
from eetools.train.loop import TrainLoop
from eetools.train.state import RunFiles


@dataclass
class Cfg:
    steps: int = 5
    checkpoint_every: int = 2
    lr: float = 0.1


def _run(tmp_path, w, cfg=Cfg(), bad_step=None, bad="loss"):
    opt = torch.optim.SGD([w], lr=cfg.lr)
    files = RunFiles(
        tmp_path / "ck",
        cfg,
        save_model=lambda d: save_tensors({"w": w.detach()}, d / "w.safetensors"),
        load_model=lambda d: w.data.copy_(load_tensors(d / "w.safetensors")["w"]),
    )
    loop = TrainLoop([w], opt, cfg, files, name="toy", progress=False)
    loop.resume()

    def step_fn(step):
        loss = (w**2).sum()
        loss.backward()
        if step == bad_step and bad == "grad":
            w.grad[0] = float("inf")
        value = float("nan") if step == bad_step and bad == "loss" else loss.item()
        return {"step": step + 1, "loss": value}, True

    return loop.run(step_fn)


def test_checkpoints_at_the_cadence_and_at_the_end_and_resume_exactly(tmp_path):
    full = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    rows = _run(tmp_path / "a", full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and load_json(tmp_path / "a" / "ck" / "trainer.json")[
        "step"
    ] == 5
    part = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    _run(tmp_path / "b", part, Cfg(steps=3))
    assert load_json(tmp_path / "b" / "ck" / "trainer.json")["step"] == 3
    again = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    resumed = _run(tmp_path / "b", again)
    assert torch.equal(again, full) and resumed == rows


@pytest.mark.parametrize(
    "bad,match",
    [
        ("loss", r"non-finite toy statistics at step 2 \(loss=nan\)"),
        ("grad", "non-finite gradient at toy step 2; not applied"),
    ],
)
def test_a_non_finite_step_saves_the_state_before_it_and_stops(tmp_path, bad, match):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    with pytest.raises(FloatingPointError, match=match + ".*state before step 2 is saved in"):
        _run(tmp_path, w, bad_step=2, bad=bad)
    assert load_json(tmp_path / "ck" / "trainer.json")["step"] == 2
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0]) * 0.8**2)  # two steps applied, not the third
    with pytest.raises(ValueError, match="configuration differs in lr"):
        _run(tmp_path, w, Cfg(lr=0.2))
