"""Rendering rollouts: tokens coloured by exit layer (HTML) and exit heatmaps/histograms (plotly).

Pure rendering of a `Rollout`'s tensors: no model, no TransformerLens, no network. The HTML is
self-contained (inline styles and one scoped ``<style>``, no external CSS/JS/fonts, no script), every string from the model goes
through `html.escape`, and output is deterministic (the only element id is a hash of the
content), so renders can be diffed, cached and embedded in reports.

Public API:

- `visible(token)`: whitespace made visible ("·" space, "→" tab, "↵" + line break newline).
- `color_tokens(rollout, index)`: one sequence, tokens coloured by exit layer, hover details in a
  rich tooltip (with `readouts`, the logit lens's top-k at each token's exit layer).
- `color_tokens_many(rollout, indices)`: several sequences stacked under one legend.
- `fmt_prob(p)`: the one format of a probability in every view.
- `exit_heatmap(rollout_or_rollouts, index)`: tokens x exitable layers of the heads' exit
  probabilities, chosen exits marked.
- `exit_histogram_figure(hist, layers, n_layers)`: grouped bars of exit-layer distributions.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots

from eetools.core.heads import stick_breaking
from eetools.core.rollout import Rollout

__all__ = [
    "TokenView",
    "color_tokens",
    "color_tokens_many",
    "exit_heatmap",
    "exit_histogram_figure",
    "fmt_prob",
    "visible",
]

# Top-k readouts of one token: ``[(token string, probability), ...]``, most probable first.
Readout = Sequence[tuple[str, float]]

_MONO = "ui-monospace,SFMono-Regular,Menlo,Consolas,'DejaVu Sans Mono',monospace"
# Colour stops from the shallowest exitable layer (red) through the hues to the deepest (purple);
# full depth is a neutral grey off the scale. Every other exitable layer is darkened by _BAND so that
# adjacent layers stay distinguishable even with dozens of them (CIE76 distance >= 10, tested).
_STOPS = (
    (0.0, (215, 48, 39)),
    (0.2, (244, 109, 67)),
    (0.4, (240, 200, 60)),
    (0.6, (102, 189, 99)),
    (0.8, (67, 147, 195)),
    (1.0, (118, 42, 131)),
)
_FULL = (224, 224, 224)
_BAND = 0.2
_HEAT_SCALE = "OrRd"
# Rich tooltips: hidden by an inline style and shown on hover or keyboard focus by this scoped sheet
# (``!important`` beats the inline style). Where a sanitizer strips ``<style>`` (GitHub, an untrusted
# notebook in JupyterLab) the token's native ``title`` is the fallback; where the sheet is live, a
# transparent mask with an empty ``title`` covers the token, so the native tooltip does not show too.
_TIP_CSS = (
    "<style>.eetools-tokens .ee-tok{position:relative;cursor:default}"
    ".eetools-tokens .ee-tok:hover>.ee-tip,.eetools-tokens .ee-tok:focus>.ee-tip{display:block!important}"
    ".eetools-tokens .ee-mask{display:block!important;position:absolute;left:0;top:0;right:0;bottom:0}"
    ".eetools-tokens .ee-tip{position:absolute;left:0;top:100%;z-index:1000;min-width:14em;background:#fff;"
    "color:#111;border:1px solid #888;border-radius:4px;padding:4px 7px;box-shadow:0 2px 6px rgba(0,0,0,.25);"
    "white-space:pre;font-size:12px;line-height:1.35;font-weight:normal;text-align:left;pointer-events:none;"
    "user-select:none}.eetools-tokens .ee-tip table{border-collapse:collapse;margin-top:2px}"
    ".eetools-tokens .ee-tip td{padding:0 6px 0 0}</style>"
)


# ----------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class TokenView:
    """Rendered HTML of one or more sequences; displays itself in Jupyter.

    Attributes:
        fragment: the HTML fragment (a single ``<div>``), safe to embed in a page.
        title: title of the standalone document made by `to_html`.
    """

    fragment: str
    title: str = "eetools tokens"

    def _repr_html_(self) -> str:
        return self.fragment

    def __str__(self) -> str:
        return self.fragment

    def to_html(self) -> str:
        """A full standalone HTML document (UTF-8, no external resources)."""
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title></head>\n<body>\n{self.fragment}\n</body></html>\n"
        )


def visible(token: str, *, newline: str = "\n") -> str:
    """Make whitespace visible: "·" for a space, "→" for a tab, "↵" for a newline.

    Args:
        token: a token string.
        newline: what follows "↵" (a real line break by default; "" for one-line labels).

    Returns:
        The visible form; "∅" for the empty string, so every token can be seen and hovered.
    """
    if not token:
        return "∅"
    return token.replace(" ", "·").replace("\t", "→").replace("\r", "␍").replace("\n", "↵" + newline)


def fmt_prob(p: float) -> str:
    """A probability as every view writes it: three decimals (``0.125``)."""
    return f"{float(p):.3f}"


def color_tokens(
    rollout: Rollout,
    index: int = 0,
    *,
    title: str | None = None,
    readouts: Sequence[Readout] | None = None,
    selected: int | None = None,
) -> TokenView:
    """Render sequence `index`: greyed prompt, generated tokens coloured by exit layer.

    Hovering (or focusing) a token shows a tooltip with its exit layer, blocks used / L, the
    stick-breaking probability of that exit under the heads and the token log-prob.

    Args:
        rollout: the rollout.
        index: the sequence.
        title: a heading (e.g. the model's name).
        readouts: per generated token, the logit lens's top-k ``[(token, probability), ...]`` at its
            exit layer (what it was predicted from), shown in the tooltip; make them with
            `eetools.views.exit_readouts(model, rollout, index)`.
        selected: a generated token to outline (the explorer's pick).
    """
    body = _TIP_CSS + _legend(rollout) + _sequence_html(rollout, index, title, readouts, selected)
    return TokenView(_wrap(body), title or f"eetools sequence {index}")


def color_tokens_many(
    rollout: Rollout,
    indices: Sequence[int] | None = None,
    *,
    max_sequences: int = 16,
    names: Sequence[str] | None = None,
    readouts: Sequence[Sequence[Readout] | None] | None = None,
) -> TokenView:
    """Render several sequences of `rollout` stacked under one legend (at most `max_sequences`).

    `names` labels each sequence (default "sequence i"); `readouts` gives each shown sequence's
    top-k readouts as in `color_tokens`.
    """
    indices = list(range(len(rollout))) if indices is None else list(indices)
    shown = indices[:max_sequences]
    names = _names(names, len(indices), [f"sequence {i}" for i in indices], "color_tokens_many")
    if readouts is not None and len(readouts) != len(indices):
        raise ValueError(f"color_tokens_many: {len(readouts)} readouts for {len(indices)} sequences (one per sequence)")
    parts = [_TIP_CSS, _legend(rollout)]
    parts += [
        _sequence_html(rollout, i, names[k], None if readouts is None else readouts[k]) for k, i in enumerate(shown)
    ]
    if len(indices) > len(shown):
        parts.append(f'<div style="color:#888">showing {len(shown)} of {len(indices)} sequences</div>')
    return TokenView(_wrap("".join(parts)), f"eetools: {len(shown)} sequences")


def exit_heatmap(
    rollouts_or_rollout: Rollout | Sequence[Rollout],
    index: int | Sequence[int] = 0,
    *,
    value: str = "exit_prob",
    names: Sequence[str] | None = None,
) -> go.Figure:
    """Heatmap of exit probabilities, generated tokens (x) x exitable layers (y), one subplot per sequence.

    Args:
        rollouts_or_rollout: a rollout, or a list of rollouts (one subplot each).
        index: the sequence of each rollout; a list of indices gives several sequences
            (of one rollout, or paired with a list of rollouts).
        value: "exit_prob" for the heads' conditional probability `c_l` of exiting at `l`
            given the token got there; "exit_dist" for the stick-breaking probability of
            exiting at `l`.
        names: a title per subplot, e.g. the models' names when comparing two models' rollouts
            (default: "sequence i").

    Returns:
        A figure with one heatmap trace per sequence (z ``[n_exit_layers, n_tokens]``) and
        "x" markers at each token's chosen exit (a top "full" row for no exit).
    """
    if value not in ("exit_prob", "exit_dist"):
        raise ValueError(f"value must be 'exit_prob' or 'exit_dist', got {value!r}")
    pairs = _pairs(rollouts_or_rollout, index)
    titles = _names(names, len(pairs), [f"sequence {i}" for _, i in pairs], "exit_heatmap")
    titles = [html.escape(t, quote=False) for t in titles]  # names made inert for plotly's pseudo-HTML titles
    fig = make_subplots(rows=1, cols=len(pairs), horizontal_spacing=0.04, subplot_titles=titles)
    for col, (r, i) in enumerate(pairs, start=1):
        _add_heatmap(fig, r, i, value, col, titles[col - 1])
    fig.update_layout(
        coloraxis=dict(colorscale=_HEAT_SCALE, cmin=0, cmax=1, colorbar_title=value),
        height=160 + 28 * max(len(r.layers) for r, _ in pairs),
        margin=dict(t=40, b=40),
    )
    return fig


def exit_histogram_figure(
    hist: Mapping[str, Sequence[float] | np.ndarray | torch.Tensor],
    layers: Sequence[int],
    n_layers: int,
    title: str = "Exit-layer distribution",
) -> go.Figure:
    """Grouped bars comparing exit-layer distributions, e.g. ``{"student": ..., "target": ...}``.

    Each value has one entry per exitable layer then one for full depth (as produced by
    `Rollout.exit_histogram`); the values are plotted as given (fractions or counts).
    """
    labels = [str(l) for l in layers] + [f"full ({n_layers})"]
    fig = go.Figure()
    for name, values in hist.items():
        y = _as_numpy(values).astype(float).ravel()
        if y.shape[0] != len(labels):
            raise ValueError(f"hist[{name!r}] has {y.shape[0]} entries, expected {len(labels)} (layers + full)")
        fig.add_trace(go.Bar(name=html.escape(str(name), quote=False), x=labels, y=y.tolist()))
    fig.update_layout(
        barmode="group",
        title=title,
        xaxis=dict(type="category", title="exit layer"),
        yaxis_title="fraction of tokens",
        margin=dict(t=50, b=40),
    )
    return fig


# ----------------------------------------------------------------------------- helpers


def _as_numpy(x) -> np.ndarray:
    """A CPU numpy copy of a tensor, array or list."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _color(layer: int, layers: Sequence[int], n_layers: int) -> tuple[str, str]:
    """Background and text colour of a token predicted at `layer` (shallow = red ... deep = purple, full = grey)."""
    layers = sorted(layers)
    if layer >= n_layers or not layers:
        rgb = list(_FULL)
    else:
        rank = float(np.interp(layer, layers, np.arange(len(layers))))
        t = rank / (len(layers) - 1) if len(layers) > 1 else 0.0
        for (t0, c0), (t1, c1) in zip(_STOPS, _STOPS[1:]):
            if t <= t1:
                w = (t - t0) / (t1 - t0)
                rgb = [a + w * (b - a) for a, b in zip(c0, c1)]
                break
        dark = _BAND if round(rank) % 2 else 0.0
        rgb = [round(v * (1 - dark)) for v in rgb]
    luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    return "#{:02x}{:02x}{:02x}".format(*rgb), ("#fff" if luminance < 0.55 else "#111")


def _legend(rollout: Rollout) -> str:
    """Colour bar: one swatch per exitable layer, then full depth, then the prompt."""
    L = rollout.n_layers
    items = [(f"layer {l}", *_color(l, rollout.layers, L)) for l in rollout.layers]
    items += [(f"full depth ({L})", *_color(L, rollout.layers, L)), ("prompt", "transparent", "#999")]
    swatches = "".join(
        f'<span style="background:{bg};color:{fg};padding:1px 6px;margin-right:3px;'
        f'border-radius:3px">{html.escape(name)}</span>'
        for name, bg, fg in items
    )
    return f'<div style="margin-bottom:6px">exit layer: {swatches}</div>'


def _names(names: Sequence[str] | None, n: int, default: list[str], where: str) -> list[str]:
    """`names` checked to hold one label per panel, or `default`."""
    if names is None:
        return default
    names = [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"{where}: {len(names)} names for {n} panels (give one name per panel)")
    return names


def _token_lines(rollout: Rollout, index: int, t: int, dist_row, col: dict[int, int]) -> list[str]:
    """The hover lines of generated token `t`: the token, its exit, blocks used, exit probability, log-prob."""
    L = rollout.n_layers
    e = int(rollout.exit_layers[index, t])
    p = float(dist_row[col[e]]) if e in col else float(dist_row[-1]) if e >= L else float("nan")
    return [
        f"token {t}: {visible(rollout.str_tokens[index][t], newline='')!r}",
        f"exit layer {e}" if e < L else f"no exit: full depth ({L})",
        f"blocks used: {e}/{L}",
        f"exit probability: {fmt_prob(p)}",
        f"token log-prob: {float(rollout.token_logprobs[index, t]):.3f}",
    ]


def _tip(lines: Sequence[str], readout: Readout | None, exit_layer: int, n_layers: int) -> tuple[str, str]:
    """``(rich tooltip HTML, plain fallback text)``: the lines, then the lens's top-k at the exit layer; all escaped."""
    body = "<br>".join(html.escape(x) for x in lines)
    plain = list(lines)
    if readout:
        where = f"layer {exit_layer}" if exit_layer < n_layers else f"full depth ({n_layers})"
        head = f"lens top-{len(readout)} at {where}"
        cells = [(repr(visible(s, newline="")), fmt_prob(p)) for s, p in readout]
        rows = "".join(f"<tr><td>{html.escape(s)}</td><td>{p}</td></tr>" for s, p in cells)
        body += f"<br><b>{head}</b><table>{rows}</table>"
        plain += [head + ":", *(f"  {s} {p}" for s, p in cells)]
    return f'<span class="ee-tip" style="display:none">{body}</span>', "\n".join(plain)


def token_span(
    text: str, bg: str, fg: str, tip: tuple[str, str], *, selected: bool = False, t: int | None = None
) -> str:
    """One coloured token with its tooltip (`text` escaped here; `tip` from `_tip`)."""
    rich, plain = tip
    ring = ";outline:2px solid #1f4e9a;outline-offset:1px" if selected else ""
    data = "" if t is None else f' data-t="{t}"'
    return (
        f'<span class="ee-tok" tabindex="0"{data} title="{html.escape(plain)}" '
        f'style="background:{bg};color:{fg};border-radius:2px{ring}">{html.escape(text)}'
        f'<span class="ee-mask" title="" style="display:none"></span>{rich}</span>'
    )


def _sequence_html(
    rollout: Rollout,
    index: int,
    title: str | None,
    readouts: Sequence[Readout] | None = None,
    selected: int | None = None,
) -> str:
    """Header, summary line and token spans of one sequence."""
    L, layers = rollout.n_layers, list(rollout.layers)
    n = int(rollout.mask[index].sum())
    toks = rollout.str_tokens[index]
    if len(toks) < n:
        raise ValueError(f"sequence {index}: {len(toks)} str_tokens for {n} generated tokens")
    if readouts is not None and len(readouts) != n:
        raise ValueError(f"sequence {index}: {len(readouts)} readouts for {n} generated tokens (one per token)")
    exits = rollout.exit_layers[index, :n].tolist()
    dist = stick_breaking(rollout.allowed_exit_probs[index, :n].double()).numpy()
    col = {l: k for k, l in enumerate(layers)}
    parts = [f'<div style="font-weight:bold;margin-top:6px">{html.escape(title)}</div>' if title else ""]
    if n:
        mean = sum(exits) / n
        parts.append(
            f'<div style="color:#666">tokens: {n} · compute: {mean / L:.3f} '
            f"(mean exit layer {mean:.2f} / {L}) · layers saved: {1 - mean / L:.1%}</div>"
        )
    else:
        parts.append('<div style="color:#666">tokens: 0 · no generated tokens</div>')
    parts.append('<div style="white-space:pre-wrap;word-break:break-all;line-height:1.8">')
    parts += [f'<span style="color:#999">{html.escape(visible(s))}</span>' for s in rollout.prompt_str_tokens[index]]
    for t in range(n):
        e = int(exits[t])
        tip = _tip(_token_lines(rollout, index, t, dist[t], col), None if readouts is None else readouts[t], e, L)
        parts.append(token_span(visible(toks[t]), *_color(e, layers, L), tip, selected=t == selected, t=t))
    parts.append("</div>")
    return "".join(parts)


def _wrap(body: str) -> str:
    """The root ``<div>``, its id a stable hash of the content (deterministic output)."""
    digest = hashlib.sha1(body.encode("utf-8")).hexdigest()[:12]
    return f'<div id="eetools-{digest}" class="eetools-tokens" style="font-family:{_MONO};font-size:13px">{body}</div>'


def _pairs(rollouts: Rollout | Sequence[Rollout], index: int | Sequence[int]) -> list[tuple[Rollout, int]]:
    """(rollout, sequence index) for each subplot of `exit_heatmap`."""
    rs = [rollouts] if isinstance(rollouts, Rollout) else list(rollouts)
    idx = [index] if isinstance(index, int) else list(index)
    if len(rs) == 1:
        rs = rs * len(idx)
    elif len(idx) == 1:
        idx = idx * len(rs)
    if len(rs) != len(idx) or not rs:
        raise ValueError(f"exit_heatmap: {len(rs)} rollouts for {len(idx)} indices")
    return list(zip(rs, idx))


def _add_heatmap(fig: go.Figure, rollout: Rollout, index: int, value: str, col: int, name: str) -> None:
    """Add one sequence's heatmap (z ``[n_exit_layers, n_tokens]``) and its exit markers."""
    L, layers = rollout.n_layers, list(rollout.layers)
    n = int(rollout.mask[index].sum())
    c: Float[np.ndarray, "n m"] = _as_numpy(rollout.exit_probs[index, :n]).astype(np.float64)
    allowed = _as_numpy(rollout.allowed_exit_probs[index, :n]).astype(np.float64)  # patience vetoes at 0
    z = (c if value == "exit_prob" else stick_breaking(torch.from_numpy(allowed)).numpy()[:, :-1]).T
    # model text made inert for plotly's pseudo-HTML labels
    labels = [html.escape(visible(s, newline=""), quote=False) for s in rollout.str_tokens[index][:n]]
    exits: Int[np.ndarray, " n"] = _as_numpy(rollout.exit_layers[index, :n])
    row = {l: k for k, l in enumerate(layers)}
    x = list(range(n))
    text = [[f"{t}: {labels[t]!r} · layer {l}" for t in x] for l in layers]
    fig.add_trace(
        go.Heatmap(
            z=z.tolist(),
            x=x,
            y=list(range(len(layers))),
            text=text,
            coloraxis="coloraxis",
            hovertemplate="%{text}<br>" + value + "=%{z:.3f}<extra></extra>",
            name=name,
        ),
        row=1,
        col=col,
    )
    ys = [row.get(int(e), len(layers)) for e in exits]
    fig.add_trace(
        go.Scatter(
            x=x,
            y=ys,
            mode="markers",
            marker=dict(symbol="x", color="#222", size=7),
            text=[f"{t}: {labels[t]!r} · exit {int(exits[t])}" for t in x],
            hovertemplate="%{text}<extra></extra>",
            showlegend=False,
        ),
        row=1,
        col=col,
    )
    fig.update_xaxes(tickvals=x, ticktext=labels, tickangle=-60, row=1, col=col)
    fig.update_yaxes(
        tickvals=list(range(len(layers) + 1)),
        ticktext=[f"L{l}" for l in layers] + [f"full ({L})"],
        range=[-0.5, len(layers) + 0.5],
        row=1,
        col=col,
    )
