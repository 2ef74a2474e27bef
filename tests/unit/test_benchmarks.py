"""The GPU benchmark a session runs when it is lent a GPU (minutes of device time, no retries to spare) runs end to end.

`benchmarks/bench_gpu_scale.py --shape test` is the same code path on a 4-block toy, on the CPU: every
measurement it will report on the 4B shape comes out (memory is NaN off CUDA).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_scale_benchmark_runs_on_its_test_shape(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "benchmarks/bench_gpu_scale.py", "--shape", "test", "--device", "cpu"]
    run = subprocess.run(
        [*cmd, "--dtype", "float32", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    for batch in (1, 32):
        for what in ("bridge", "hf", "off", *(f"skip{r}" for r in (0, 25, 50, 75))):
            assert res[f"decode_b{batch}_{what}_tps"] > 0
        assert res[f"decode_b{batch}_off_vs_bridge"] > 0 and res[f"decode_b{batch}_speedup_50"] > 0
    assert res["calib_2x48_s"] > 0 and res["rl_2x2x8_s"] > 0 and res["rl_2x2x8_tokens"] > 0
    assert math.isnan(res["calib_2x48_gib"]), "peak memory is measured on CUDA only"


def _bench_real():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_real

    return bench_real


def test_real_benchmark_is_skipped_with_a_reason_without_the_model(monkeypatch, capsys):
    from eetools.io import gguf

    bench_real = _bench_real()
    preset = gguf.PRESETS[bench_real.PRESET]
    monkeypatch.setitem(
        gguf.PRESETS, bench_real.PRESET, gguf.GGUFPreset(preset.name, "no_such_pkg_x", "f.gguf", "pip x")
    )
    res = bench_real.run(quick=True)
    assert set(res) == set(bench_real.KEYS) and all(v is None for v in res.values())
    assert "not installed" in capsys.readouterr().err


def test_real_benchmark_decode_measures_every_key_on_a_tiny_model(tiny_folders):
    """bench_real's decode part, on a tiny random Qwen3 and its HF model (the real one takes minutes)."""
    import torch
    from transformers import AutoModelForCausalLM

    import eetools

    bench_real = _bench_real()
    bridge = eetools.load_model(tiny_folders["qwen3"])
    bridge.cfg.default_prepend_bos = True
    hf = AutoModelForCausalLM.from_pretrained(tiny_folders["qwen3"], dtype=torch.float32).eval()
    res = bench_real.decode(bridge, hf, new=4, repeats=1)
    assert set(res) == {k for k in bench_real.KEYS if "step" not in k}
    assert all(v > 0 for v in res.values())
