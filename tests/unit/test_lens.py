"""The shared residual-capture and logit-lens helper (eetools.core.lens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eetools.core.hooks import count_hooks
from eetools.core.lens import capture_residuals, capturing, lens_logits, lens_logprobs

ROOT = Path(__file__).resolve().parents[2]
# the norm shortcut calls the HF norm directly instead of the bridge's own path: the same
# function, so equal up to float rounding (the module doc says bit-identical; allow rounding)
NORM_SHORTCUT_ATOL = 1e-5
# modules allowed to spell the hook names: their home, this helper, and the exit hooks themselves
ALLOWED = {"eetools/core/hooks.py", "eetools/core/lens.py", "eetools/core/state.py"}


def _tokens(ee):
    return ee.model.to_tokens(["Q: 12+34\n", "Q: 5+6\nA"], prepend_bos=True, padding_side="left")


def _mask(toks, ee):
    return (toks != ee.model.tokenizer.pad_token_id).long()


def _add_lora(ee):
    from eetools.core.adapters import add_lora

    torch.manual_seed(1)
    params = add_lora(ee, r=2, alpha=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn_like(p))


@torch.no_grad()
def test_readout_at_exit_layers_equals_teacher_forward(tiny_ee):
    toks = _tokens(tiny_ee)
    attn = _mask(toks, tiny_ee)
    teacher = tiny_ee.teacher_forward(toks, attn)
    resid, logits = capture_residuals(
        tiny_ee, toks, tiny_ee.exit_layers, attention_mask=attn, base=True, return_logits=True
    )
    early = torch.stack([lens_logprobs(tiny_ee, resid[l], base=True) for l in tiny_ee.exit_layers], 1)
    torch.testing.assert_close(early, teacher.early_logprobs, rtol=0, atol=0)
    torch.testing.assert_close(logits.float().log_softmax(-1), teacher.logprobs, rtol=0, atol=0)
    assert count_hooks(tiny_ee.model) == 0


@torch.no_grad()
def test_base_equals_adapters_disabled(tiny_ee):
    _add_lora(tiny_ee)
    toks = _tokens(tiny_ee)
    layers = [0, *tiny_ee.exit_layers, tiny_ee.n_layers]
    base = capture_residuals(tiny_ee, toks, layers, base=True)
    with tiny_ee.adapters_disabled():
        off = capture_residuals(tiny_ee, toks, layers)
    adapted = capture_residuals(tiny_ee, toks, layers)
    for l in layers:
        torch.testing.assert_close(base[l], off[l], rtol=0, atol=0)
    assert not torch.allclose(base[tiny_ee.n_layers], adapted[tiny_ee.n_layers]), "the adapters changed nothing"
    # the adapters are back on after the call
    again = capture_residuals(tiny_ee, toks, layers)
    torch.testing.assert_close(again[tiny_ee.n_layers], adapted[tiny_ee.n_layers], rtol=0, atol=0)


@torch.no_grad()
def test_norm_shortcut_on_and_off_agree(tiny_ee):
    toks = _tokens(tiny_ee)
    layers = list(range(tiny_ee.n_layers + 1))
    on, lo_on = capture_residuals(tiny_ee, toks, layers, norm_shortcut=True, return_logits=True)
    off, lo_off = capture_residuals(tiny_ee, toks, layers, norm_shortcut=False, return_logits=True)
    for l in layers:
        torch.testing.assert_close(on[l], off[l], rtol=0, atol=NORM_SHORTCUT_ATOL)
    torch.testing.assert_close(lo_on, lo_off, rtol=0, atol=NORM_SHORTCUT_ATOL)
    r = on[2]
    torch.testing.assert_close(
        lens_logits(tiny_ee, r, norm_shortcut=True), lens_logits(tiny_ee, r), rtol=0, atol=NORM_SHORTCUT_ATOL
    )


@torch.no_grad()
def test_final_layer_is_the_stream_the_unembedding_reads(tiny_ee):
    toks = _tokens(tiny_ee)
    L = tiny_ee.n_layers
    resid, logits = capture_residuals(tiny_ee, toks, [L], return_logits=True)
    post = capture_residuals(tiny_ee, toks, [L - 1], where="post")
    torch.testing.assert_close(resid[L], post[L - 1], rtol=0, atol=0)
    torch.testing.assert_close(lens_logits(tiny_ee, resid[L]), logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_rows_keep_a_subset(tiny_ee):
    toks = _tokens(tiny_ee)
    full = capture_residuals(tiny_ee, toks, [1, 2])
    ri, pi = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3])
    some = capture_residuals(tiny_ee, toks, [1, 2], rows=(ri, pi))
    for l in (1, 2):
        assert some[l].shape == (3, tiny_ee.model.cfg.d_model)
        torch.testing.assert_close(some[l], full[l][ri, pi], rtol=0, atol=0)


def test_no_hook_survives_even_an_exception(tiny_ee):
    toks = _tokens(tiny_ee)
    with torch.no_grad():
        capture_residuals(tiny_ee, toks, [1, 2], base=True)
    assert count_hooks(tiny_ee.model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), capturing(tiny_ee, [0, 1, tiny_ee.n_layers]) as store:
            tiny_ee.model(toks)
            assert store and count_hooks(tiny_ee.model) > 0
            raise RuntimeError("boom")
    assert count_hooks(tiny_ee.model) == 0
    with pytest.raises(ValueError):
        capture_residuals(tiny_ee, toks, [1, 99])
    assert count_hooks(tiny_ee.model) == 0


@pytest.mark.parametrize(
    "layers,where", [([-1], "pre"), ([99], "pre"), ([4], "post"), ([1.5], "pre"), (["final"], "pre"), ([1], "mid")]
)
def test_bad_layers_give_a_one_line_value_error(tiny_ee, layers, where):
    with pytest.raises(ValueError) as err:
        with capturing(tiny_ee, layers, where=where):
            pass
    assert "\n" not in str(err.value)
    assert count_hooks(tiny_ee.model) == 0


def test_base_needs_an_early_exit_model(tiny_ee):
    with pytest.raises(ValueError, match="needs an EarlyExitModel"):
        with capturing(tiny_ee.model, [1], base=True):
            pass
    assert count_hooks(tiny_ee.model) == 0


def test_nobody_else_spells_hook_names():
    offenders = []
    for folder in ("eetools", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED or rel.startswith("eetools/core/fast/"):
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "hook_resid" in line:
                    offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "spell hook names through eetools.core.hooks / eetools.core.lens, not by hand:\n" + "\n".join(
        offenders
    )
