"""Multi-process training: shards, and 2 gloo processes on CPU against 1 process with the same shards.

A step's global batch is cut into processes x micro_batches shards, each with its own seed,
so two processes with one micro-batch each must end where one process with two
micro-batches ends (same examples, same exit draws, same rollouts), up to float summation
order. The optimizer's moment estimates are compared too: Adam's update is invariant to a
constant scale of the gradient, its first moment is not, so a wrong loss normalisation
(the x world factor) cannot hide.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eetools.train import distributed
from eetools.train.calibration import calibrate
from eetools.train.rl import train_rl

# 2 processes vs 1: the same float ops but for the order of a sum over shards; Adam can
# turn a rounding difference of a gradient near zero into one of its step (lr=1e-2)
DDP_ATOL = 1e-5
WORKER_TIMEOUT_S = 300

CAL = dict(batch_size=4, exit_samples=2, lr=1e-2, seed=1, lora_r=2, progress=False)
RL = dict(prompts_per_step=4, k=2, max_new_tokens=6, eval_every=2, eval_prompts=2, lr=1e-2, progress=False)


def _reward(example, completion):
    return float(len(completion) % 3)


def _fresh(folder, bias=None):
    import eetools

    b = eetools.load_model(folder)
    b.cfg.default_prepend_bos = True
    torch.manual_seed(0)
    ee = eetools.attach_exit_heads(b, layers=[1, 2, 3])
    # the bridge's eager attention: its result for a row does not depend on how far the batch is padded, so
    # shards and micro-batches leave only summation order to differ (fused attention's rounding does depend on it)
    ee.fast_forwards = False
    if bias is not None:
        with torch.no_grad():
            for h in ee.heads:
                h.net[-1].bias.fill_(bias)
    return ee


def _moments(ckpt) -> list[torch.Tensor]:
    """Adam's first moments (scale-sensitive, unlike its update) from a run's checkpoint."""
    from eetools.io.checkpoints import load_state

    state = load_state(ckpt)["optimizer"]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


def _scenario(folder, out: Path, **shards) -> dict:
    """Calibration and RL, straight (3 steps) and resumed (2 steps, then on to 3); final parameters and histories."""
    res = {}
    res["cal"] = calibrate(_fresh(folder), "addition", steps=3, checkpoint_dir=out / "cal", **CAL, **shards)
    calibrate(_fresh(folder), "addition", steps=2, checkpoint_dir=out / "cal_resume", **CAL, **shards)
    res["cal_resume"] = calibrate(
        _fresh(folder), "addition", steps=3, checkpoint_dir=out / "cal_resume", **CAL, **shards
    )
    rl = dict(**RL, **shards, reward_fn=_reward)
    res["rl"] = train_rl(_fresh(folder, -0.5), "addition", steps=3, checkpoint_dir=out / "rl", **rl)
    train_rl(_fresh(folder, -0.5), "addition", steps=2, checkpoint_dir=out / "rl_resume", **rl)
    res["rl_resume"] = train_rl(_fresh(folder, -0.5), "addition", steps=3, checkpoint_dir=out / "rl_resume", **rl)
    return res


def _worker(folder: str, out: str) -> None:
    """One rank of the 2-process run (started by `test_two_processes_...` with torchrun's env variables)."""
    from safetensors.torch import save_file

    from eetools.io import checkpoints

    torch.set_num_threads(1)
    written = []
    atomic_write = checkpoints._atomic_write

    def spy(path, write):  # every checkpoint file goes through here
        written.append(str(path))
        return atomic_write(path, write)

    checkpoints._atomic_write = spy
    assert distributed.setup("cpu") and distributed.world_size() == 2
    r, out = distributed.rank(), Path(out)
    res = _scenario(folder, out / "ckpt")
    tensors = {
        f"{name}.{i}": p.detach().clone()
        for name, x in res.items()
        for i, p in enumerate(x.ee_model.trainable_parameters())
    }
    save_file(tensors, str(out / f"rank{r}.safetensors"))
    for name, x in res.items():
        x.history.to_pickle(out / f"rank{r}_{name}.pkl")
        if name.startswith("rl"):
            x.evals.to_pickle(out / f"rank{r}_{name}_evals.pkl")
    (out / f"rank{r}_written.json").write_text(json.dumps(written))
    distributed.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shards_are_contiguous_and_must_divide_evenly():
    assert distributed.shard(list("abcdef"), 1, 3) == ["c", "d"]
    assert distributed.local_shards(list("abcd"), 2) == [(0, ["a", "b"]), (1, ["c", "d"])]  # one process
    assert distributed.shard_seed(7, 0) == 7 and distributed.shard_seed(7, 1) != distributed.shard_seed(8, 0)
    with pytest.raises(ValueError, match=r"batch_size=6 does not split into 4 process\(es\) x 1 .*multiple of 4"):
        distributed.check_divisible(6, 1, name="batch_size", world=4)
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        distributed.check_divisible(4, 0)
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1


def test_indivisible_batches_are_refused_before_training(tiny_folders):
    ee = _fresh(tiny_folders["qwen3"])
    with pytest.raises(ValueError, match="batch_size=3 .* multiple of 2"):
        calibrate(ee, "addition", steps=1, batch_size=3, micro_batches=2, progress=False)
    with pytest.raises(ValueError, match="prompts_per_step=3 .* multiple of 2"):
        train_rl(ee, "addition", steps=1, prompts_per_step=3, micro_batches=2, k=2, progress=False)


def _rounding_excess(ck_one, ck_two, params_one, params_two, n_terms: int, steps: int, lr: float) -> tuple:
    """How far two runs that should differ only by float summation order differ, in units of what that order
    can change: (worst Adam first moment difference, worst parameter difference); above 1 is more than rounding.

    Reordering a float32 sum of `n_terms` addends changes it by up to about ``n_terms * eps * max|g|`` (eps =
    float32's machine epsilon, max|g| the tensor's largest gradient): that is the moments' tolerance. Adam
    divides each element by its own ``sqrt(v)``, so that gradient difference moves a parameter by up to
    ``2 * lr * tol_g / (sqrt(v_hat) + 1e-8)`` per step (a first-order bound: the numerator and the
    denominator both change), summed over the steps. Near-zero gradients are where rounding turns into a
    visible parameter difference; a fixed atol there (1e-5) held on one CPU's kernels and not another's
    (``ATEN_CPU_CAPABILITY=default``: 1.7e-5 in one LoRA element; the moments' median ratio 1.0000).
    """
    from eetools.io.checkpoints import load_state

    eps, b1, b2 = torch.finfo(torch.float32).eps, 0.9, 0.999  # AdamW's defaults, as calibrate uses them
    sa, sb = load_state(ck_one)["optimizer"]["state"], load_state(ck_two)["optimizer"]["state"]
    worst_m = worst_p = 0.0
    for k, pa, pb in zip(sorted(sa), params_one, params_two):
        ma, mb, va = sa[k]["exp_avg"], sb[k]["exp_avg"], sa[k]["exp_avg_sq"]
        tol_m = n_terms * eps * ma.abs().max().clamp_min(1e-30)
        worst_m = max(worst_m, float((ma - mb).abs().max() / tol_m))
        tol_g = tol_m / (1 - b1**steps)  # the moment is a bias-shrunk average of gradients
        tol_p = steps * 2 * lr * tol_g / ((va / (1 - b2**steps)).sqrt() + 1e-8)
        worst_p = max(worst_p, float(((pa - pb).abs() / tol_p).max()))
    return worst_m, worst_p


def _two_calibrations(folder, tmp_path, monkeypatch, steps=3, world_factor_of_the_second=1):
    """One shard and two micro-batches of a deterministic calibration; the largest number of addends that a
    step's loss sums (positions x exit samples: the split regroups that sum). `world_factor_of_the_second`
    multiplies the world size that the second run's steps normalise their shards by (a bug, for the guard)."""
    import sys

    from eetools.train import calibration

    counts = []
    inner = calibration._counts
    monkeypatch.setattr(calibration, "_counts", lambda *a: counts.append(inner(*a)) or counts[-1])
    kw = {**CAL, "kl_factor": 1e9}
    one = calibrate(_fresh(folder), "addition", steps=steps, checkpoint_dir=tmp_path / "one", **kw)
    real = calibration.distributed.world_size

    def world_size():  # only the loss scale in calibration_step itself; sharding keeps the real size
        called_by_step = sys._getframe(1).f_code.co_name == "calibration_step"
        return real() * (world_factor_of_the_second if called_by_step else 1)

    monkeypatch.setattr(calibration.distributed, "world_size", world_size)
    two = calibrate(_fresh(folder), "addition", steps=steps, checkpoint_dir=tmp_path / "two", micro_batches=2, **kw)
    return one, two, int(max(float(c.max()) for c in counts))


def test_micro_batches_leave_a_deterministic_calibration_unchanged(tiny_folders, tmp_path, monkeypatch):
    """With kl_factor huge every target is "no exit", so no draw matters: micro-batching must not change the
    update beyond float summation order (`_rounding_excess`: tolerances from float32's eps and the number of
    summed addends, so they hold on any CPU's kernels); the moments catch a wrong loss normalisation, which
    Adam's update alone would hide (`test_the_micro_batch_check_catches_a_wrong_normalisation`)."""
    one, two, n_terms = _two_calibrations(tiny_folders["qwen3"], tmp_path, monkeypatch)
    assert (one.history["sampled_compute"] == 1.0).all(), "the test needs deterministic (no-exit) prescriptions"
    assert one.history["kl"].iloc[-1] > 0, "the KL term must take part"
    pa, pb = one.ee_model.trainable_parameters(), two.ee_model.trainable_parameters()
    worst_m, worst_p = _rounding_excess(tmp_path / "one", tmp_path / "two", pa, pb, n_terms, 3, CAL["lr"])
    assert worst_m <= 1, f"micro-batches changed the gradient {worst_m:.1f}x beyond rounding: loss normalisation"
    assert worst_p <= 1, f"micro-batches changed the update {worst_p:.1f}x beyond rounding: loss normalisation"
    torch.testing.assert_close(torch.tensor(one.history["loss"].values), torch.tensor(two.history["loss"].values))


def test_the_micro_batch_check_catches_a_wrong_normalisation(tiny_folders, tmp_path, monkeypatch):
    """The bug the check is for: shards normalised as if there were two processes (the x world factor
    applied once too often) double the gradients; Adam's update barely moves, its first moment doubles."""
    one, two, n_terms = _two_calibrations(
        tiny_folders["qwen3"], tmp_path, monkeypatch, steps=2, world_factor_of_the_second=2
    )
    pa, pb = one.ee_model.trainable_parameters(), two.ee_model.trainable_parameters()
    worst_m, _ = _rounding_excess(tmp_path / "one", tmp_path / "two", pa, pb, n_terms, 2, CAL["lr"])
    assert worst_m > 100, f"a doubled gradient reads as {worst_m:.1f}x rounding"


def test_resuming_with_another_number_of_shards_is_refused(tiny_folders, tmp_path):
    folder = tiny_folders["qwen3"]
    calibrate(_fresh(folder), "addition", steps=1, checkpoint_dir=tmp_path / "ck", **{**CAL, "lora": False})
    with pytest.raises(ValueError, match="split into 1 shard.*this run splits them into 2"):
        calibrate(
            _fresh(folder),
            "addition",
            steps=2,
            checkpoint_dir=tmp_path / "ck",
            micro_batches=2,
            **{**CAL, "lora": False},
        )


def test_two_processes_equal_one_process_with_the_same_shards(tiny_folders, tmp_path):
    import pandas as pd
    from safetensors.torch import load_file

    folder = tiny_folders["qwen3"]
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_distributed as t; t._worker(*sys.argv[1:])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(folder), str(tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        ref = _scenario(folder, tmp_path / "ref", micro_batches=2)  # meanwhile: one process, the same 2 shards
        logs = [p.communicate(timeout=WORKER_TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks disagree on {key}: gradients not all-reduced?"
    for name, res in ref.items():
        for i, p in enumerate(res.ee_model.trainable_parameters()):
            torch.testing.assert_close(
                ranks[0][f"{name}.{i}"],
                p.detach(),
                rtol=0,
                atol=DDP_ATOL,
                msg=f"{name}: 2 processes != 1 process with 2 micro-batches (parameter {i})",
            )
        for r in range(2):
            hist = pd.read_pickle(tmp_path / f"rank{r}_{name}.pkl")
            pd.testing.assert_frame_equal(
                hist,
                res.history,
                check_exact=False,
                rtol=1e-4,
                atol=1e-6,
                check_dtype=False,
                obj=f"{name} history of rank {r}",
            )
            if name.startswith("rl"):
                evals = pd.read_pickle(tmp_path / f"rank{r}_{name}_evals.pkl")
                pd.testing.assert_frame_equal(evals, res.evals, check_exact=False, check_dtype=False)
    for name in ("cal", "rl"):
        for a, b in zip(_moments(tmp_path / "ckpt" / name), _moments(tmp_path / "ref" / name)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=f"{name}: gradient scale differs")

    # a 2-process checkpoint resumes in 1 process with 2 micro-batches (the same shards)
    on = calibrate(
        _fresh(folder), "addition", steps=4, checkpoint_dir=tmp_path / "ckpt" / "cal", micro_batches=2, **CAL
    )
    ref_on = calibrate(
        _fresh(folder), "addition", steps=4, checkpoint_dir=tmp_path / "ref" / "cal", micro_batches=2, **CAL
    )
    for a, b in zip(on.ee_model.trainable_parameters(), ref_on.ee_model.trainable_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=DDP_ATOL, msg="resuming a 2-process run in 1 process")

    written = [json.loads((tmp_path / f"rank{r}_written.json").read_text()) for r in range(2)]
    assert written[1] == [], f"rank 1 wrote checkpoint files: {written[1]}"
    assert any(w.endswith("trainer.json") for w in written[0]) and any("safetensors" in w for w in written[0])


def _torchrun(argv: list[str], cwd) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "eetools.cli",
        *argv,
        "--no-progress",
    ]
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)


def test_cli_calibrate_and_rl_under_torchrun(tiny_folders, tmp_path):
    cal = _torchrun(
        [
            "calibrate",
            "--model",
            str(tiny_folders["qwen3"]),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--lora-r",
            "2",
            "--out",
            str(tmp_path / "cal"),
        ],
        tmp_path,
    )
    assert cal.returncode == 0, cal.stderr[-3000:]
    assert cal.stdout.split() == [str(tmp_path / "cal" / "model")], "only rank 0 prints"
    assert (tmp_path / "cal" / "calibration_history.csv").exists() and (tmp_path / "cal" / "fig4.json").exists()
    rl = _torchrun(
        [
            "rl",
            "--from",
            str(tmp_path / "cal" / "model"),
            "--steps",
            "1",
            "--k",
            "2",
            "--prompts-per-step",
            "2",
            "--max-new-tokens",
            "4",
            "--eval-every",
            "1",
            "--eval-prompts",
            "2",
            "--out",
            str(tmp_path / "rl"),
        ],
        tmp_path,
    )
    assert rl.returncode == 0, rl.stderr[-3000:]
    assert rl.stdout.split() == [str(tmp_path / "rl" / "model")]
    import pandas as pd

    assert len(pd.read_csv(tmp_path / "rl" / "rl_history.csv")) == 1
    assert len(pd.read_csv(tmp_path / "rl" / "rl_evals.csv")) == 2


def _spawned_sum(out: str) -> None:
    """A `distributed.spawn` worker: each rank adds rank + 1; rank 0 writes the sum, the group and its threads."""
    total = distributed.all_reduce_sum(torch.tensor(float(distributed.rank() + 1)))
    if distributed.is_main():
        Path(out).write_text(json.dumps([float(total), distributed.world_size(), torch.get_num_threads()]))


class _WorkerOwnError(Exception):
    pass


def _spawned_failure(own: bool = False) -> None:
    if distributed.rank() == 1:
        raise (_WorkerOwnError if own else ValueError)("rank 1 was told to fail")
    distributed.barrier()  # rank 0 would wait here for ever if the failure did not stop it


def test_spawn_runs_a_gloo_group_of_workers_without_torchrun(tmp_path):
    out = tmp_path / "sum.json"
    distributed.spawn(_spawned_sum, (str(out),), workers=2, threads=1)
    assert json.loads(out.read_text()) == [3.0, 2, 1]
    assert not distributed.is_distributed()  # the caller's process never joined a group


def test_a_failing_spawned_worker_stops_the_group_and_raises_its_error():
    with pytest.raises(ValueError, match="rank 1 was told to fail") as raised:
        distributed.spawn(_spawned_failure, workers=2, threads=1)
    assert "_spawned_failure" in "".join(raised.value.__notes__)  # the worker's own traceback comes with it
    # an exception class of the caller's own is not rebuilt from the worker's record: it is named instead
    with pytest.raises(RuntimeError, match="_WorkerOwnError: rank 1 was told to fail"):
        distributed.spawn(_spawned_failure, (True,), workers=2, threads=1)


def test_reproduce_training_in_two_workers_equals_one_process(tmp_path):
    """`reproduce`'s training stages give the same models with ``workers=2`` (a spawned group) and
    ``workers=1`` (the two shards one after the other), up to float rounding: the main calibration,
    a Fig. 3 calibration and an RL run."""
    import pandas as pd
    from safetensors.torch import load_file

    from eetools.pipeline import SHARDS, ReproduceConfig, _train_stages

    cfg = ReproduceConfig(
        calib_steps=2, fig3_steps=1, rl_steps=1, n_seeds=1, kl_factors=[16.0], task="addition", calib_task="addition"
    )
    distributed.spawn(_train_stages, (cfg, tmp_path / "two", "cpu", None, False, SHARDS // 2), workers=2)
    _train_stages(cfg, tmp_path / "one", "cpu", None, False, SHARDS)
    for model in ("calibrated/model", "fig3/kl16/model", "rl/lam1.5_beta0.25_seed0/model"):
        for name in ("heads.safetensors", "adapters.safetensors"):
            two, one = (load_file(str(tmp_path / w / model / name)) for w in ("two", "one"))
            assert two.keys() == one.keys() and two
            # float rounding, except a few elements where Adam's first step (+-lr) took a gradient near 0 the other way
            off = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
            assert float(off.max()) < 5e-3 and float((off > 1e-4).float().mean()) < 1e-3, (model, name)
    for w in ("two", "one"):  # both trained every step and wrote the RL history
        assert len(pd.read_csv(tmp_path / w / "calibrated" / "calibration_history.csv")) == 2
        assert len(pd.read_csv(tmp_path / w / "rl_history.csv")) == 1
