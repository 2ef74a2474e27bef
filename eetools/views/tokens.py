"""Rendering rollouts: tokens coloured by exit layer (HTML) and exit heatmaps/histograms (plotly).

Pure rendering of a `Rollout`'s tensors: no model, no TransformerLens, no network. The HTML is
self-contained (inline styles, no external CSS/JS/fonts), every string from the model goes
through `html.escape`, and output is deterministic (the only element id is a hash of the
content), so renders can be diffed, cached and embedded in reports.

Public API:

- `visible(token)`: whitespace made visible ("·" space, "→" tab, "↵" + line break newline).
- `color_tokens(rollout, index)`: one sequence, tokens coloured by exit layer, hover details.
- `color_tokens_many(rollout, indices)`: several sequences stacked under one legend.
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

__all__ = ["TokenView", "visible", "color_tokens", "color_tokens_many", "exit_heatmap", "exit_histogram_figure"]

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


def color_tokens(rollout: Rollout, index: int = 0, *, title: str | None = None) -> TokenView:
    """Render sequence `index`: greyed prompt, generated tokens coloured by exit layer.

    Hovering a token shows its exit layer, blocks used / L, the stick-breaking probability
    of that exit under the heads and the token log-prob.
    """
    body = _legend(rollout) + _sequence_html(rollout, index, title)
    return TokenView(_wrap(body), title or f"eetools sequence {index}")


def color_tokens_many(rollout: Rollout, indices: Sequence[int] | None = None, *, max_sequences: int = 16) -> TokenView:
    """Render several sequences of `rollout` stacked under one legend (at most `max_sequences`)."""
    indices = list(range(len(rollout))) if indices is None else list(indices)
    shown = indices[:max_sequences]
    parts = [_legend(rollout)]
    parts += [_sequence_html(rollout, i, f"sequence {i}") for i in shown]
    if len(indices) > len(shown):
        parts.append(f'<div style="color:#888">showing {len(shown)} of {len(indices)} sequences</div>')
    return TokenView(_wrap("".join(parts)), f"eetools: {len(shown)} sequences")


def exit_heatmap(
    rollouts_or_rollout: Rollout | Sequence[Rollout], index: int | Sequence[int] = 0, *, value: str = "exit_prob"
) -> go.Figure:
    """Heatmap of exit probabilities, generated tokens (x) x exitable layers (y), one subplot per sequence.

    Args:
        rollouts_or_rollout: a rollout, or a list of rollouts (one subplot each).
        index: the sequence of each rollout; a list of indices gives several sequences
            (of one rollout, or paired with a list of rollouts).
        value: "exit_prob" for the heads' conditional probability `c_l` of exiting at `l`
            given the token got there; "exit_dist" for the stick-breaking probability of
            exiting at `l`.

    Returns:
        A figure with one heatmap trace per sequence (z ``[n_exit_layers, n_tokens]``) and
        "x" markers at each token's chosen exit (a top "full" row for no exit).
    """
    if value not in ("exit_prob", "exit_dist"):
        raise ValueError(f"value must be 'exit_prob' or 'exit_dist', got {value!r}")
    pairs = _pairs(rollouts_or_rollout, index)
    fig = make_subplots(
        rows=1, cols=len(pairs), horizontal_spacing=0.04, subplot_titles=[f"sequence {i}" for _, i in pairs]
    )
    for col, (r, i) in enumerate(pairs, start=1):
        _add_heatmap(fig, r, i, value, col)
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
        fig.add_trace(go.Bar(name=str(name), x=labels, y=y.tolist()))
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


def _sequence_html(rollout: Rollout, index: int, title: str | None) -> str:
    """Header, summary line and token spans of one sequence."""
    L, layers = rollout.n_layers, list(rollout.layers)
    n = int(rollout.mask[index].sum())
    toks = rollout.str_tokens[index]
    if len(toks) < n:
        raise ValueError(f"sequence {index}: {len(toks)} str_tokens for {n} generated tokens")
    exits = rollout.exit_layers[index, :n].tolist()
    logps = rollout.token_logprobs[index, :n].tolist()
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
    parts += [
        f'<span style="color:#999" title="prompt">{html.escape(visible(s))}</span>'
        for s in rollout.prompt_str_tokens[index]
    ]
    for t in range(n):
        e = int(exits[t])
        p = float(dist[t, col[e]]) if e in col else float(dist[t, -1]) if e >= L else float("nan")
        where = f"exit layer {e}" if e < L else f"no exit: full depth ({L})"
        hover = [
            f"token {t}: {visible(toks[t], newline='')!r}",
            where,
            f"blocks used: {e}/{L}",
            f"exit probability: {p:.3f}",
            f"token log-prob: {logps[t]:.3f}",
        ]
        bg, fg = _color(e, layers, L)
        parts.append(
            f'<span style="background:{bg};color:{fg};border-radius:2px" '
            f'title="{html.escape(chr(10).join(hover))}">{html.escape(visible(toks[t]))}</span>'
        )
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


def _add_heatmap(fig: go.Figure, rollout: Rollout, index: int, value: str, col: int) -> None:
    """Add one sequence's heatmap (z ``[n_exit_layers, n_tokens]``) and its exit markers."""
    L, layers = rollout.n_layers, list(rollout.layers)
    n = int(rollout.mask[index].sum())
    c: Float[np.ndarray, "n m"] = _as_numpy(rollout.exit_probs[index, :n]).astype(np.float64)
    allowed = _as_numpy(rollout.allowed_exit_probs[index, :n]).astype(np.float64)  # patience vetoes at 0
    z = (c if value == "exit_prob" else stick_breaking(torch.from_numpy(allowed)).numpy()[:, :-1]).T
    labels = [visible(s, newline="") for s in rollout.str_tokens[index][:n]]
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
            name=f"sequence {index}",
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
