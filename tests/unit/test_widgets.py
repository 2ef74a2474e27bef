"""Explorer: token details are right; the widget and static views build."""

import torch

from eetools.views.widgets import Explorer, token_details


def test_token_details_match_the_model(tiny_ee):
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(0.0)
    r = tiny_ee.generate(["Q: 1+2\n"], 8, seed=0)
    d = token_details(tiny_ee, r, 0, 2)
    assert list(d.lens["layer"]) == [1, 2, 3, 4]
    assert abs(d.exit_distribution.sum() - 1) < 1e-5
    assert len(d.full_depth) == 3
    # the full-depth top-1 equals the lens at layer L
    assert d.lens.iloc[-1]["top1"] == d.full_depth[0][0]
    d.figure()


def test_explorer_static_and_widget(tiny_ee):
    ex = Explorer(tiny_ee, "addition", n_examples=3, max_new_tokens=6)
    html = ex.to_html()
    assert "full-depth prediction" in html and "lens top-5 at" in html  # top-k readouts in the tooltips
    w = ex.widget()
    assert w.children and len(w.children) == 7


def test_widget_callbacks_update_without_a_browser(tiny_ee):
    ex = Explorer(tiny_ee, "addition", n_examples=3, max_new_tokens=6)
    w = ex.widget()
    pick, prompt, controls, tokens, _diff, token, _out_tok = w.children
    pick.value = 2  # observer copies the example's prompt
    assert prompt.value == ex.examples[2].prompt
    controls.children[3].value = 7  # seed
    controls.children[4].click()  # Generate
    assert ex.rollout.prompts == [ex.examples[2].prompt]
    assert token.max == int(ex.rollout.mask[0].sum()) - 1
    buttons = [b for b in tokens.children[1].children if hasattr(b, "on_click")]
    assert len(buttons) == int(ex.rollout.mask[0].sum())
    assert buttons[0].layout.border  # the picked token (0) is outlined
    buttons[-1].click()  # clicking a token picks it
    assert token.value == len(buttons) - 1
    assert buttons[-1].layout.border and (len(buttons) == 1 or not buttons[0].layout.border)


def test_controls_keep_their_labels_whole(tiny_ee):
    ex = Explorer(tiny_ee, "addition", n_examples=1, max_new_tokens=3)
    controls = ex.widget().children[2]
    for c in controls.children:
        if getattr(c, "description", "") in ("temperature", "threshold", "seed", "mode"):
            assert c.style.description_width == "initial", c.description
    sliders = [c for c in controls.children if c.description in ("temperature", "threshold")]
    assert all(c.layout.width == "300px" for c in sliders)
    assert controls.layout.flex_flow == "row wrap"  # they wrap rather than squash


def test_two_models_are_labelled_and_compared(tiny_bridge, tmp_path):
    import eetools as ee

    torch.manual_seed(1)
    a = ee.attach_exit_heads(tiny_bridge, layers=[1, 2, 3])
    with torch.no_grad():
        for h in a.heads:
            h.net[-1].bias.fill_(2.0)  # "rl": exits early
    ex = Explorer({"calibrated": a, "rl": a}, "addition", n_examples=2, max_new_tokens=5)
    assert ex.names == ["calibrated", "rl"] and set(ex.rollouts) == {"calibrated", "rl"}
    html = ex.to_html(t=1)
    assert "calibrated" in html and "rl" in html and "calibrated vs rl" in html
    assert "sequence 0" not in html
    w = ex.widget()
    labels = [c.value for c in w.children[3].children if hasattr(c, "value")]
    assert any("calibrated" in v for v in labels) and any("rl" in v for v in labels)
    assert "calibrated vs rl" in w.children[4].value
    import pytest

    with pytest.raises(ValueError, match="one or two models"):
        Explorer({"a": a, "b": a, "c": a}, "addition", n_examples=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="no model named"):
        ex.details(0, "nope")


def test_no_exit_line_for_a_token_that_ran_to_full_depth():
    d = _hostile_details("a")
    assert not d.figure().layout.shapes  # exit layer 1 is not < 1, the last lens layer
    import pandas as pd

    from eetools.views.widgets import TokenDetails

    lens = pd.DataFrame([{"layer": l, "top1": "a", "p_top1": 0.5, "p_token": 0.5} for l in (1, 2, 3, 4)])
    full = TokenDetails("a", 4, pd.Series([0.0, 1.0], index=["1", "none"]), lens, [("a", 0.9)])
    assert not full.figure().layout.shapes
    early = TokenDetails("a", 2, pd.Series([1.0, 0.0], index=["2", "none"]), lens, [("a", 0.9)])
    assert len(early.figure().layout.shapes) == 1


def test_probabilities_share_one_format():
    from eetools.views.widgets import exit_distribution_html, token_summary_html

    d = _hostile_details("a")
    assert "0.900" in token_summary_html(d) and "0.100" in token_summary_html(d)
    assert "1.000" in exit_distribution_html(d) and "0.000" in exit_distribution_html(d)


def _hostile_details(evil: str):
    import pandas as pd

    from eetools.views.widgets import TokenDetails

    lens = pd.DataFrame([{"layer": 1, "top1": evil, "p_top1": 0.5, "p_token": 0.5}])
    return TokenDetails(evil, 1, pd.Series([1.0, 0.0], index=["1", "none"]), lens, [(evil, 0.9), ("b", 0.1)])


def test_widget_escapes_model_text_in_the_token_summary(tiny_ee, monkeypatch):
    # a hub model's token (or its full-depth prediction) can be HTML; the widget must show it as text
    import IPython.display

    from eetools.views.widgets import TokenDetails

    evil = "<img src=x onerror=alert(1)>"
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    monkeypatch.setattr(TokenDetails, "figure", lambda self: type("F", (), {"show": lambda self: None})())
    ex = Explorer(tiny_ee, "addition", n_examples=1, max_new_tokens=4)
    monkeypatch.setattr(ex, "details", lambda t, model=None: _hostile_details(evil))
    ex.widget()
    htmls = [o.data for o in shown if isinstance(o, IPython.display.HTML)]
    summary = [h for h in htmls if "full depth would say" in h]
    assert summary, htmls
    assert all(evil not in h for h in htmls)
    assert "&lt;img src=x onerror=alert(1)&gt;" in summary[0]
