"""The same prompt's exits under two models, token by token: `exit_diff`.

One column per generated position: model A's token coloured by its exit layer, model B's below
it coloured by its own, and the difference of exit layers (B - A; negative: B stopped earlier).
Where the two models wrote different tokens the column is flagged, since their exits are then
not about the same prediction. Self-contained HTML like `eetools.views.tokens` (escaped, no
script, deterministic).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from eetools.core.heads import stick_breaking
from eetools.core.rollout import Rollout
from eetools.views.tokens import (
    _TIP_CSS,
    Readout,
    TokenView,
    _color,
    _legend,
    _tip,
    _token_lines,
    _wrap,
    token_span,
    visible,
)

__all__ = ["exit_diff"]

_EARLIER, _LATER = "#2166ac", "#b2182b"


def exit_diff(
    a: Rollout,
    b: Rollout,
    index: int = 0,
    *,
    names: Sequence[str] = ("A", "B"),
    readouts: Sequence[Sequence[Readout] | None] | None = None,
    selected: int | None = None,
) -> TokenView:
    """Side by side, token by token, the exits of sequence `index` of rollouts `a` and `b`.

    Args:
        a, b: rollouts of the same prompt by two models (e.g. calibrated and RL) with the same
            number of blocks and exitable layers' colours (the legend is `a`'s).
        index: the sequence, in both.
        names: the two models' names.
        readouts: optional top-k readouts at the exit layers for each model (as `color_tokens`).
        selected: a position to outline.

    Returns:
        A `TokenView`: a summary line (positions where the tokens agree, where B exits earlier
        or later, mean exit layers) and the aligned columns.
    """
    names = [str(x) for x in names]
    if len(names) != 2:
        raise ValueError(f"exit_diff: give two names, got {len(names)}")
    if a.n_layers != b.n_layers:
        raise ValueError(f"exit_diff: the models have {a.n_layers} and {b.n_layers} blocks; compare the same depth")
    for r, nm in ((a, names[0]), (b, names[1])):
        if not 0 <= index < len(r):
            raise IndexError(f"sequence {index} out of range: {nm}'s rollout has {len(r)} sequences")
    if a.prompts[index] != b.prompts[index]:
        raise ValueError(f"exit_diff: the two rollouts' sequence {index} have different prompts; compare one prompt")
    readouts = [None, None] if readouts is None else list(readouts)
    L = a.n_layers
    ns = [int(r.mask[index].sum()) for r in (a, b)]
    exits = [r.exit_layers[index, :n].tolist() for r, n in zip((a, b), ns)]
    dists = [stick_breaking(r.allowed_exit_probs[index, :n].double()).numpy() for r, n in zip((a, b), ns)]
    cols = [{l: k for k, l in enumerate(r.layers)} for r in (a, b)]
    same = earlier = later = 0
    parts = []
    for t in range(max(ns)):
        cells = []
        for s, (r, n) in enumerate(zip((a, b), ns)):
            if t >= n:
                cells.append('<span style="color:#bbb">–</span>')
                continue
            e = int(exits[s][t])
            rd = None if readouts[s] is None else readouts[s][t]
            tip = _tip([names[s], *_token_lines(r, index, t, dists[s][t], cols[s])], rd, e, L)
            text = visible(r.str_tokens[index][t], newline="")
            cells.append(token_span(text, *_color(e, list(r.layers), L), tip))
        agree = t < min(ns) and a.str_tokens[index][t] == b.str_tokens[index][t]
        if t < min(ns):
            d = int(exits[1][t]) - int(exits[0][t])
            same += agree
            earlier += agree and d < 0
            later += agree and d > 0
            colour = _EARLIER if d < 0 else _LATER if d > 0 else "#999"
            delta = f'<span style="color:{colour}">{d:+d}</span>' if d else '<span style="color:#999">0</span>'
        else:
            delta = ""
        flag = "" if agree else ";border-bottom:2px solid #e08214"
        ring = ";outline:2px solid #1f4e9a" if t == selected else ""
        parts.append(
            f'<span class="ee-col" data-t="{t}" style="display:inline-flex;flex-direction:column;align-items:center;'
            f'min-width:1.1em;margin:0 2px 6px 0;vertical-align:top{flag}{ring}">{cells[0]}{cells[1]}'
            f'<span style="font-size:11px">{delta}</span></span>'
        )
    means = [sum(e) / n if n else float("nan") for e, n in zip(exits, ns)]
    a_name, b_name = (html.escape(x) for x in names)
    summary = (
        f"{same} of {max(ns)} positions have the same token under both; at those {b_name} exits earlier at "
        f"{earlier}, later at {later}; mean exit layer {means[0]:.2f} ({a_name}) vs {means[1]:.2f} ({b_name}) / {L}"
    )
    rows = f"rows: {html.escape(names[0])}, {html.escape(names[1])}, exit layer difference ({html.escape(names[1])} − {html.escape(names[0])}; "
    key = (
        f'<div style="color:#666">{rows}<span style="color:{_EARLIER}">earlier</span>, '
        f'<span style="color:{_LATER}">later</span>; underlined: different tokens)</div>'
    )
    prompt = html.escape(visible(a.prompts[index], newline=""))
    body = (
        _TIP_CSS
        + _legend(a)
        + f'<div style="font-weight:bold;margin-top:6px">{html.escape(names[0])} vs {html.escape(names[1])}</div>'
        + f'<div style="color:#666">{summary}</div>{key}'
        + f'<div style="color:#999;margin:4px 0">prompt: {prompt}</div>'
        + f'<div style="line-height:1.6">{"".join(parts)}</div>'
    )
    return TokenView(_wrap(body), f"eetools: {names[0]} vs {names[1]}")
