"""``head="lens"``: the authors' MLP head, also reading the logit lens at its layer."""

import pytest
import torch

import eetools
from eetools.core.heads import LENS_FLOOR, LENS_SCALE, ExitHead
from eetools.io.exit_checkpoint import save_exit_model
from eetools.io.models import load_exit_model
from eetools.train.calibration import calibrate


@pytest.fixture()
def lens_ee(tiny_bridge):
    torch.manual_seed(0)
    return eetools.attach_exit_heads(tiny_bridge, layers=[1, 2, 3], head="lens")


def test_a_lens_head_reads_the_residual_and_the_early_readout(lens_ee):
    head = lens_ee.heads[1]
    resid = torch.randn(2, 5, lens_ee.model.cfg.d_model)
    lens = lens_ee.readout(resid).log_softmax(-1).clamp(min=LENS_FLOOR) / LENS_SCALE
    x = torch.cat([torch.nn.functional.layer_norm(resid, (resid.shape[-1],)), lens], -1)
    torch.testing.assert_close(head(resid), head.net(x).squeeze(-1))
    assert head.net[0].in_features == lens_ee.model.cfg.d_model + lens_ee.model.cfg.d_vocab
    with torch.no_grad():  # weights on the lens inputs only: the head follows what the readout says
        head.net[0].weight[:, : resid.shape[-1]] = 0
        other = resid.clone()
        other[0, 0] = torch.randn_like(other[0, 0])
    z, z_other = head(resid), head(other)
    assert z[0, 0] != z_other[0, 0] and torch.equal(z[1], z_other[1])


def test_lens_heads_calibrate_save_and_load(lens_ee, tmp_path):
    res = calibrate(lens_ee, "addition", steps=3, batch_size=2, lr=1e-2, seed=0, progress=False, lora_r=2)
    assert res.history["loss"].map(float).notna().all()
    assert all(torch.isfinite(p).all() for p in lens_ee.heads.parameters())
    save_exit_model(lens_ee, tmp_path / "ck")
    fresh = eetools.load_model(lens_ee.model.cfg.model_name)
    fresh.cfg.default_prepend_bos = True
    again = load_exit_model(tmp_path / "ck", model=fresh)
    assert again.head_kind == "lens"
    toks = torch.randint(4, lens_ee.model.cfg.d_vocab, (1, 9))
    full = torch.full_like(toks, lens_ee.n_layers)
    torch.testing.assert_close(
        again.prescribed_forward(toks, full).exit_logits, lens_ee.prescribed_forward(toks, full).exit_logits
    )


def test_a_lens_head_needs_the_readout():
    with pytest.raises(ValueError, match="needs the model's readout"):
        ExitHead(16, "lens")
