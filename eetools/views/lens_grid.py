"""The logit-lens grid: layer x token, each cell the lens's top-1 token and its probability.

In the style of tuned-lens's prediction trajectory: a column per predicted token, a row per
layer, each cell the top-1 token of ``softmax(unembed(ln_final(resid)))`` at that layer with
its probability (the cell's colour), the top-k on hover, and each token's exit layer outlined.
`LensGrid` is the data (arrays with checked shapes, no model); `.figure()` draws it. Built by:

- `lens_grid(model, rollout, index)`: a rollout replayed with its own exits (each token sees the
  context it was generated with; cells above a token's exit are its frozen stream, left blank),
  or without exits (``exits=False``: what every layer would have said).
- `lens_grid_text(model, text)`: teacher-forced text, no exits.
- `compare_lens_grids(grids)`: grids stacked, labelled by model (calibrated vs RL).
- `exit_readouts(model, rollout, index)`: each generated token's top-k at its exit layer, for the
  token colouring's tooltips (`color_tokens(..., readouts=...)`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float, Int
from plotly.subplots import make_subplots

from eetools.core.lens import _split
from eetools.core.lenses import resolve_readout
from eetools.core.readouts import lens_topk
from eetools.core.rollout import Rollout
from eetools.views.tokens import fmt_prob, visible

__all__ = ["LensGrid", "compare_lens_grids", "exit_readouts", "lens_grid", "lens_grid_text"]

_SCALE = "Blues"


@dataclass
class LensGrid:
    """Top-k logit-lens readouts of one sequence's predictions at several layers.

    Attributes:
        layers: the layers, one per row, ascending (``n_layers`` = the final residual).
        tokens: per column, the token actually there (generated or in the text) that the column predicts.
        top_tokens: the lens's top-k token strings ``[n_layer, n_tok, k]``.
        top_probs: their probabilities ``[n_layer, n_tok, k]``.
        p_token: the probability of the column's token at each layer ``[n_layer, n_tok]``.
        n_layers: blocks `L` of the model.
        exit_layers: each token's exit layer (``L`` = none) ``[n_tok]``, or None (teacher-forced text).
        frozen: True where a cell lies above its token's exit in a replay with exits (the stream was
            frozen there; its readout is the exit layer's) ``[n_layer, n_tok]``.
        name: a label, e.g. the model's name ("calibrated", "rl").
    """

    layers: list[int]
    tokens: list[str]
    top_tokens: np.ndarray
    top_probs: Float[np.ndarray, "n_layer n_tok k"]
    p_token: Float[np.ndarray, "n_layer n_tok"]
    n_layers: int
    exit_layers: Int[np.ndarray, " n_tok"] | None = None
    frozen: np.ndarray | None = None
    name: str = ""

    def __post_init__(self):
        self.top_probs = np.asarray(self.top_probs, dtype=np.float64)
        self.top_tokens = np.asarray(self.top_tokens, dtype=object).reshape(self.top_probs.shape)
        self.p_token = np.asarray(self.p_token, dtype=np.float64)
        m, n = len(self.layers), len(self.tokens)
        if self.top_probs.ndim != 3 or self.top_probs.shape[:2] != (m, n) or self.p_token.shape != (m, n):
            raise ValueError(
                f"LensGrid: top_probs {self.top_probs.shape} and p_token {self.p_token.shape} must be "
                f"[{m} layers, {n} tokens(, k)]"
            )
        if list(self.layers) != sorted(set(self.layers)) or any(not 0 <= l <= self.n_layers for l in self.layers):
            raise ValueError(f"LensGrid: layers must ascend within 0..{self.n_layers}, got {self.layers}")
        if self.exit_layers is not None:
            self.exit_layers = np.asarray(self.exit_layers, dtype=np.int64)
            if self.exit_layers.shape != (n,):
                raise ValueError(f"LensGrid: exit_layers has shape {self.exit_layers.shape}, expected ({n},)")
        self.frozen = np.zeros((m, n), dtype=bool) if self.frozen is None else np.asarray(self.frozen, dtype=bool)
        if self.frozen.shape != (m, n):
            raise ValueError(f"LensGrid: frozen has shape {self.frozen.shape}, expected {(m, n)}")

    @property
    def k(self) -> int:
        return int(self.top_probs.shape[2])

    def exit_topk(self) -> list[list[tuple[str, float]]]:
        """Per token, the top-k at its exit layer (the last row without exits), for `color_tokens(readouts=...)`."""
        rows = {l: i for i, l in enumerate(self.layers)}
        out = []
        for t in range(len(self.tokens)):
            e = self.n_layers if self.exit_layers is None else int(self.exit_layers[t])
            r = rows.get(e, len(self.layers) - 1)
            out.append([(str(s), float(p)) for s, p in zip(self.top_tokens[r, t], self.top_probs[r, t])])
        return out

    def figure(self, *, max_tokens: int = 120) -> go.Figure:
        """The grid as a plotly heatmap (the first `max_tokens` tokens); see the module doc."""
        fig = make_subplots(rows=1, cols=1, subplot_titles=[_esc(self.name)] if self.name else None)
        _add_grid(fig, self, 1, max_tokens)
        fig.update_layout(**_layout([self], max_tokens))
        return fig

    def _repr_mimebundle_(self, include=None, exclude=None):
        """Displays as its figure in Jupyter."""
        return self.figure()._repr_mimebundle_(include, exclude)


def lens_grid(
    model,
    rollout: Rollout,
    index: int = 0,
    *,
    k: int = 5,
    layers: Sequence[int] | None = None,
    exits: bool = True,
    name: str = "",
    readout=None,
) -> LensGrid:
    """The lens grid of sequence `index` of `rollout`, one column per generated token.

    Args:
        model: the `EarlyExitModel` that generated the rollout (a bare bridge with ``exits=False``).
        rollout: the rollout.
        index: the sequence.
        k: top-k kept per cell (shown on hover).
        layers: rows (default ``1..L``; ``L`` is the final residual).
        exits: replay the rollout with its exits (each column's cell at its exit layer is the
            distribution its token was drawn from; cells above are frozen); False: the model
            without exits on the same tokens.
        name: a label for the panel (e.g. "calibrated").
        readout: how cells are read out (`eetools.core.lenses.resolve_readout`): None/"logit" the
            logit lens, "exit" the model's exit readout (with exits, each token's cell at its exit
            layer is then what it was drawn from), or a `Readout` such as a `TunedLens` (default
            rows: its layers and ``L``).
    """
    _, bridge = _split(model)
    L = int(bridge.cfg.n_layers)
    if L != rollout.n_layers:
        raise ValueError(f"the model has {L} blocks but the rollout was made by a {rollout.n_layers}-block model")
    if not 0 <= index < len(rollout):
        raise IndexError(f"sequence {index} out of range: the rollout has {len(rollout)} sequences")
    reader = resolve_readout(model, readout)
    layers = _layers(layers, L, reader)
    n = int(rollout.mask[index].sum())
    p0 = rollout.prompt_tokens.shape[1]
    seq = rollout.sequences[index : index + 1]
    exit_at = rollout.prescribed_exit_layers()[index : index + 1] if exits else None
    top = lens_topk(
        model,
        seq,
        range(p0 - 1, p0 - 1 + n),
        layers,
        k=k,
        targets=rollout.tokens[index, :n].tolist(),
        exit_at=exit_at,
        attention_mask=rollout.attention_mask[index : index + 1],
        readout=reader,
    )
    exit_layers = rollout.exit_layers[index, :n].numpy()
    grid = _from_topk(bridge, top, layers, rollout.str_tokens[index][:n], L, exit_layers, name)
    if exits:
        _freeze(grid)
    return grid


def lens_grid_text(
    model,
    text: str,
    *,
    k: int = 5,
    layers: Sequence[int] | None = None,
    base: bool = False,
    name: str = "",
    readout=None,
) -> LensGrid:
    """The lens grid of teacher-forced `text` (no exits): one column per token after the first.

    `base` turns the LoRA adapters off (an `EarlyExitModel`'s base model); `readout` as in `lens_grid`.
    """
    _, bridge = _split(model)
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    L = int(bridge.cfg.n_layers)
    reader = resolve_readout(model, readout)
    layers = _layers(layers, L, reader)
    ids = bridge.to_tokens(text)
    if ids.shape[1] < 2:
        raise ValueError(f"text {text!r} is one token: the grid needs a token to predict after it")
    targets = ids[0, 1:].tolist()
    top = lens_topk(model, ids, range(ids.shape[1] - 1), layers, k=k, targets=targets, base=base, readout=reader)
    return _from_topk(bridge, top, layers, [_decode(bridge, i) for i in targets], L, None, name)


def compare_lens_grids(grids: Sequence[LensGrid], *, max_tokens: int = 120) -> go.Figure:
    """Lens grids stacked one above the other with a shared colour scale, each titled by its `name`.

    The same prompt under two models (e.g. ``lens_grid(calibrated, r1, name="calibrated")`` and
    ``lens_grid(rl, r2, name="rl")``) lines their tokens up column by column.
    """
    grids = list(grids)
    if not grids:
        raise ValueError("compare_lens_grids needs at least one LensGrid")
    titles = [_esc(g.name) or f"grid {i}" for i, g in enumerate(grids)]
    heights = [len(g.layers) for g in grids]
    layout = _layout(grids, max_tokens)
    plot_height = layout["height"] - layout["margin"]["t"] - layout["margin"]["b"]
    fig = make_subplots(
        rows=len(grids),
        cols=1,
        subplot_titles=titles,
        row_heights=heights,
        vertical_spacing=min(70 / plot_height, 0.3) if len(grids) > 1 else 0,  # room for ticks and the next title
    )
    for row, g in enumerate(grids, start=1):
        _add_grid(fig, g, row, max_tokens)
    fig.update_layout(**layout)
    return fig


def exit_readouts(
    model, rollout: Rollout, index: int = 0, *, k: int = 5, readout="exit"
) -> list[list[tuple[str, float]]]:
    """Per generated token of sequence `index`, the readout's top-k at its exit layer (full depth if none).

    Replays the rollout with its exits, reading only the exitable layers and ``L``: through the
    model's exit readout (the default), the readout at a token's exit layer is the distribution it
    was drawn from. For `color_tokens(readouts=...)`.
    """
    layers = sorted({*rollout.layers, rollout.n_layers})
    return lens_grid(model, rollout, index, k=k, layers=layers, readout=readout).exit_topk()


# ----------------------------------------------------------------------------- helpers


def _layers(layers: Sequence[int] | None, L: int, reader=None) -> list[int]:
    """The rows: ``1..L`` by default (a readout with translators at some layers only: those and ``L``); given ones checked and sorted."""
    if layers is None:
        own = getattr(reader, "layers", None)
        return sorted({*own, L}) if own is not None else list(range(1, L + 1))
    out = sorted({int(l) for l in layers})
    if not out or out[0] < 0 or out[-1] > L or any(isinstance(l, bool) for l in layers):
        raise ValueError(f"layers must be a non-empty list within 0..{L} ({L} = the final residual), got {layers!r}")
    return out


def _decode(bridge, i: int) -> str:
    return bridge.tokenizer.decode([int(i)])


def _from_topk(bridge, top, layers, tokens, L, exit_layers, name) -> LensGrid:
    """A `LensGrid` from `lens_topk`'s tensors, ids decoded once each."""
    ids = top.ids.numpy()
    names = {int(i): _decode(bridge, int(i)) for i in np.unique(ids)}
    strs = np.vectorize(names.__getitem__, otypes=[object])(ids) if ids.size else np.empty(ids.shape, dtype=object)
    return LensGrid(
        layers=list(layers),
        tokens=list(tokens),
        top_tokens=strs,
        top_probs=top.probs.numpy(),
        p_token=top.p_target.numpy(),
        n_layers=L,
        exit_layers=exit_layers,
        name=name,
    )


def _freeze(grid: LensGrid) -> None:
    """Mark cells above each token's exit as frozen, holding the exit layer's readout (what the model used)."""
    rows = {l: i for i, l in enumerate(grid.layers)}
    for t, e in enumerate(grid.exit_layers):
        if e >= grid.n_layers:
            continue
        above = np.array([l > e for l in grid.layers])
        grid.frozen[above, t] = True
        if int(e) in rows:
            r = rows[int(e)]
            grid.top_tokens[above, t] = grid.top_tokens[r, t]
            grid.top_probs[above, t] = grid.top_probs[r, t]
            grid.p_token[above, t] = grid.p_token[r, t]


def _esc(text: str) -> str:
    """Model text made inert for plotly's pseudo-HTML labels (``<``, ``>``, ``&``; quotes kept readable)."""
    return html.escape(text, quote=False)


def _label(layer: int, L: int) -> str:
    return f"final ({L})" if layer == L else f"L{layer}"


def _add_grid(fig: go.Figure, g: LensGrid, row: int, max_tokens: int) -> None:
    """One grid's heatmap (z = top-1 probability, blank where frozen) and its exit outlines."""
    n = min(len(g.tokens), max_tokens)
    L, m = g.n_layers, len(g.layers)
    z = np.where(g.frozen[:, :n], np.nan, g.top_probs[:, :n, 0])
    cols = [f"{t}: {visible(s, newline='')!r}" for t, s in enumerate(g.tokens[:n])]  # plain text
    text, hover = [], []
    for r, l in enumerate(g.layers):
        text.append(["" if g.frozen[r, t] else _esc(visible(str(g.top_tokens[r, t, 0]), newline="")) for t in range(n)])
        hover.append([_hover(g, r, t, l, cols[t]) for t in range(n)])
    fig.add_trace(
        go.Heatmap(
            z=z.tolist(),
            x=list(range(n)),
            y=list(range(m)),
            text=text,
            customdata=hover,
            texttemplate="%{text}",
            textfont=dict(size=11, family="monospace"),
            hovertemplate="%{customdata}<extra></extra>",
            hoverongaps=False,
            coloraxis="coloraxis",
            name=_esc(g.name) or "lens",
            xgap=1,
            ygap=1,
        ),
        row=row,
        col=1,
    )
    if g.exit_layers is not None and n:
        rows = {l: i for i, l in enumerate(g.layers)}
        pts = [(t, rows[int(e)]) for t, e in enumerate(g.exit_layers[:n]) if int(e) in rows]
        fig.add_trace(
            go.Scatter(
                x=[t for t, _ in pts],
                y=[r for _, r in pts],
                mode="markers",
                marker=dict(symbol="square-open", size=22, color="#d7301f", line=dict(width=2.5)),
                text=[_esc(f"{cols[t]} · exit {int(g.exit_layers[t])}") for t, _ in pts],
                hovertemplate="%{text}<extra></extra>",
                name="exit layer",
                showlegend=row == 1,
            ),
            row=row,
            col=1,
        )
    fig.update_xaxes(
        tickvals=list(range(n)),
        ticktext=[_esc(visible(s, newline="")) for s in g.tokens[:n]],
        tickangle=0,
        tickfont=dict(family="monospace"),
        range=[-0.5, n - 0.5],
        row=row,
        col=1,
    )
    fig.update_yaxes(
        tickvals=list(range(m)), ticktext=[_label(l, L) for l in g.layers], range=[-0.5, m - 0.5], row=row, col=1
    )


def _hover(g: LensGrid, r: int, t: int, layer: int, col: str) -> str:
    """Hover text of a cell: the token, the layer, the top-k and the token's probability (escaped for plotly)."""
    head = f"{col} · {_label(layer, g.n_layers)}"
    if g.frozen[r, t]:
        head += f" · frozen (exited at layer {int(g.exit_layers[t])})"
    top = "<br>".join(
        f"{_esc(repr(visible(str(s), newline='')))} {fmt_prob(p)}"
        for s, p in zip(g.top_tokens[r, t], g.top_probs[r, t])
    )
    p = g.p_token[r, t]
    tail = "" if np.isnan(p) else f"<br>P(actual token) {fmt_prob(p)}"
    return f"{_esc(head)}<br>top-{g.k}:<br>{top}{tail}"


def _layout(grids: Sequence[LensGrid], max_tokens: int) -> dict:
    """Size and colour axis: a cell about 46 x 26 px, so the top-1 tokens stay readable."""
    n = max(min(len(g.tokens), max_tokens) for g in grids)
    rows = sum(len(g.layers) for g in grids)
    return dict(
        template="plotly_white",
        coloraxis=dict(colorscale=_SCALE, cmin=0, cmax=1, colorbar=dict(title="top-1 p", thickness=12)),
        width=max(520, 110 + 46 * n),
        height=120 + 30 * rows + 70 * len(grids),
        margin=dict(l=70, r=20, t=60, b=40),
        plot_bgcolor="#f3f3f3",
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=1, xanchor="right"),
    )
