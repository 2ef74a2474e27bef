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


def _run(tmp_path, w, cfg=Cfg(), bad_step=None, bad="loss", meta=None):
    opt = torch.optim.SGD([w], lr=cfg.lr)
    files = RunFiles(
        tmp_path / "ck",
        cfg,
        save_model=lambda d: save_tensors({"w": w.detach()}, d / "w.safetensors"),
        load_model=lambda d: w.data.copy_(load_tensors(d / "w.safetensors")["w"]),
        meta=meta or {},
    )
    loop = TrainLoop([w], opt, cfg, files, name="toy", progress=False)
    loop.resume()

    def step_fn(step):
        loss = (w**2).sum()
        loss.backward()
        if step == bad_step and bad == "grad":
            w.grad[0] = float("inf")
        value = float("nan") if step == bad_step and bad == "loss" else loss.item()
        return {"step": step + 1, "zeta": 0.0, "loss": value}, True  # columns not in alphabetical order

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


def _param():
    return torch.nn.Parameter(torch.tensor([1.0, -2.0]))


def test_a_resumed_history_keeps_its_column_order(tmp_path):
    """Issue 31 item 11: trainer.json was written with sorted keys, so resumed rows came back alphabetical."""
    _run(tmp_path, _param(), Cfg(steps=2))
    rows = _run(tmp_path, _param())
    assert [list(r) for r in rows] == [["step", "zeta", "loss"]] * 5


def test_resume_refuses_another_kind_another_start_or_fewer_steps(tmp_path):
    """Issue 31 item 3: an RL rerun with another --from, a lower --steps, or a calibration into an RL
    run's folder continued the old run."""
    rl = {"kind": "rl", "start": "/runs/a/model"}
    _run(tmp_path, _param(), Cfg(steps=4), meta=rl)
    with pytest.raises(ValueError, match=r"it is a run started from '/runs/a/model', this is a run started from '/b'"):
        _run(tmp_path, _param(), meta={**rl, "start": "/b"})
    with pytest.raises(ValueError, match=r"it is an `eetools rl` run, this is an `eetools calibrate` run"):
        _run(tmp_path, _param(), meta={"kind": "calibrate", "start": "/runs/a/model"})
    with pytest.raises(ValueError, match=r"already run 4 steps, more than the 3 requested; pass --steps 4 or more"):
        _run(tmp_path, _param(), Cfg(steps=3), meta=rl)
    assert len(_run(tmp_path, _param(), Cfg(steps=6), meta=rl)) == 6  # the same run, longer: resumed


def test_a_checkpoint_without_a_recorded_kind_still_resumes(tmp_path):
    """Checkpoints written before the kind and start were recorded (shipped runs) resume as before."""
    _run(tmp_path, _param(), Cfg(steps=2))
    assert "kind" not in load_json(tmp_path / "ck" / "trainer.json")
    rows = _run(tmp_path, _param(), meta={"kind": "rl", "start": "/runs/a/model"})
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
