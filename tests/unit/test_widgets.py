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
    assert "full-depth prediction" in html
    w = ex.widget()
    assert w.children and len(w.children) == 6


def test_widget_callbacks_update_without_a_browser(tiny_ee):
    ex = Explorer(tiny_ee, "addition", n_examples=3, max_new_tokens=6)
    w = ex.widget()
    pick, prompt, controls, _out_text, token, _out_tok = w.children
    pick.value = 2  # observer copies the example's prompt
    assert prompt.value == ex.examples[2].prompt
    controls.children[3].value = 7  # seed
    controls.children[4].click()  # Generate
    assert ex.rollout.prompts == [ex.examples[2].prompt]
    assert token.max == int(ex.rollout.mask[0].sum()) - 1
    if token.max > 0:
        token.value = token.max  # shows that token's details


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
    monkeypatch.setattr(ex, "details", lambda t: _hostile_details(evil))
    ex.widget()
    htmls = [o.data for o in shown if isinstance(o, IPython.display.HTML)]
    summary = [h for h in htmls if "full depth would say" in h]
    assert summary, htmls
    assert all(evil not in h for h in htmls)
    assert "&lt;img src=x onerror=alert(1)&gt;" in summary[0]
