"""An interactive explorer of exits (ipywidgets), with a static fallback.

`explore(ee_model)` shows: a task example picker or a free prompt, the exit mode,
temperature, threshold and seed, a Generate button, and the rollout as clickable tokens
coloured by exit layer (the picked one outlined); for the picked token, its exit
distribution, its logit-lens trajectory across layers and the counterfactual full-depth
prediction. Given two models (``explore({"calibrated": a, "rl": b})``) it generates from the
same prompt with both, labels each by name and adds their token-by-token exit difference.
Without a widget frontend (plain HTML export, a terminal), `Explorer.to_html()` renders the
same content statically.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from eetools import tasks as task_lib
from eetools.core.heads import stick_breaking
from eetools.views.tokens import _color, fmt_prob, visible


@dataclass
class TokenDetails:
    """Everything the explorer shows about generated token `t` of sequence `index`.

    Attributes:
        token: the token (string).
        exit_layer: layer it was predicted at (L = full depth).
        exit_distribution: stick-breaking P(exit at each exitable layer, then none) at its position.
        lens: one row per layer 1..L: top-1 readout token, its probability, and the probability
            of the generated token (no exits; each exitable layer read out through the model's exit
            readout, what an exit there would emit, the other layers through the logit lens).
        full_depth: the top-3 full-depth predictions (the counterfactual had it not exited).
    """

    token: str
    exit_layer: int
    exit_distribution: pd.Series
    lens: pd.DataFrame
    full_depth: list[tuple[str, float]]

    def figure(self) -> go.Figure:
        fig = go.Figure(
            go.Scatter(
                x=self.lens["layer"],
                y=self.lens["p_token"],
                mode="lines+markers",
                text=[html.escape(str(s), quote=False) for s in self.lens["top1"]],  # model text, inert in hover
                name="P(generated token)",
                hovertemplate="layer %{x}: P(token) %{y:.3f}, lens top-1 %{text}<extra></extra>",
            )
        )
        if self.exit_layer < int(self.lens["layer"].max()):  # a token that ran to full depth did not exit
            fig.add_vline(x=self.exit_layer, line_dash="dash", annotation_text="exit")
        fig.update_layout(
            title=html.escape(f"Logit lens of {self.token!r}", quote=False),
            xaxis_title="layer",
            yaxis_title="probability",
            template="plotly_white",
            height=300,
            yaxis_range=[0, 1],
        )
        return fig


@torch.no_grad()
def token_details(ee_model, rollout, index: int, t: int) -> TokenDetails:
    """Details of generated token `t` of sequence `index` of `rollout` (see `TokenDetails`)."""
    from eetools.core.lens import capture_residuals

    n = int(rollout.mask[index].sum())
    if not 0 <= t < n:
        raise IndexError(f"token {t} out of range: sequence {index} has {n} generated tokens")
    seq = rollout.sequences[index : index + 1].to(ee_model.device)
    attn = rollout.attention_mask[index : index + 1].to(ee_model.device)
    pos = rollout.prompt_tokens.shape[1] - 1 + t  # the position that predicts token t
    L = ee_model.n_layers
    # the model as it is (adapters on), no norm shortcut: as before the shared helper
    store, logits = capture_residuals(
        ee_model, seq, range(1, L), attention_mask=attn, rows=(0, pos), norm_shortcut=False, return_logits=True
    )
    final = logits[0, pos].float().softmax(-1)
    tok_id = int(rollout.tokens[index, t])
    tok = ee_model.model.tokenizer
    rows = []
    for l in range(1, L + 1):
        if l < L:
            # the exit readout where a token can exit (a tuned lens translates there), the logit lens elsewhere
            p = ee_model.readout(store[l], l if l in ee_model.exit_layers else None).float().softmax(-1)
        else:
            p = final
        top = int(p.argmax())
        rows.append({"layer": l, "top1": tok.decode([top]), "p_top1": float(p[top]), "p_token": float(p[tok_id])})
    dist = stick_breaking(rollout.allowed_exit_probs[index, t].float())  # where patience let it exit
    labels = [str(l) for l in rollout.layers] + ["none"]
    top3 = torch.topk(final, 3)
    return TokenDetails(
        token=rollout.str_tokens[index][t],
        exit_layer=int(rollout.exit_layers[index, t]),
        exit_distribution=pd.Series(dist.numpy(), index=labels),
        lens=pd.DataFrame(rows),
        full_depth=[(tok.decode([int(i)]), float(v)) for v, i in zip(top3.values, top3.indices)],
    )


def token_summary_html(d: TokenDetails, name: str | None = None) -> str:
    """One line of HTML on a picked token: the token, its exit layer and the full-depth top 3, model text escaped."""
    full = ", ".join(f"{html.escape(repr(s))} {fmt_prob(p)}" for s, p in d.full_depth)
    who = f"{html.escape(name)}: " if name else ""
    return f"{who}<b>{html.escape(repr(d.token))}</b>: exit layer {d.exit_layer}; full depth would say {full}"


def exit_distribution_html(d: TokenDetails) -> str:
    """The picked token's exit distribution as a one-row table, probabilities in the views' one format."""
    return d.exit_distribution.to_frame("P(exit)").T.to_html(float_format=fmt_prob)


class Explorer:
    """The interactive explorer. Build with `explore(ee_model)` (or two models); display it in Jupyter.

    Args:
        models: an `EarlyExitModel`, or a mapping ``{name: EarlyExitModel}`` of one or two models
            to compare on the same prompts (e.g. ``{"calibrated": a, "rl": b}``).
        task: the task whose test split gives the example prompts.
        n_examples: how many examples to offer.
        max_new_tokens: tokens to generate (default: the task's).
        k: top-k lens readouts shown per token in the static view.
    """

    def __init__(
        self, models, task: str = "addition", n_examples: int = 20, max_new_tokens: int | None = None, k: int = 5
    ):
        if isinstance(models, Mapping):
            self.models = {str(name): m for name, m in models.items()}
        else:
            self.models = {"model": models}
        if not 1 <= len(self.models) <= 2:
            raise ValueError(f"the explorer takes one or two models, got {len(self.models)}")
        depths = {m.n_layers for m in self.models.values()}
        if len(depths) > 1:
            raise ValueError(
                f"the models to compare have different depths {sorted(depths)}; compare models of one depth"
            )
        self.task = task_lib.get(task, tokenizer=next(iter(self.models.values())))
        self.examples = self.task.test_split()[:n_examples]
        self.max_new_tokens = max_new_tokens or self.task.max_new_tokens
        self.k = k
        self.rollouts: dict = {}
        self.generate(self.examples[0].prompt, mode="sample", temperature=0.0, threshold=0.5, seed=0)

    @property
    def names(self) -> list[str]:
        return list(self.models)

    @property
    def ee_model(self):
        """The first model."""
        return next(iter(self.models.values()))

    @property
    def rollout(self):
        """The first model's rollout."""
        return self.rollouts.get(self.names[0])

    def generate(self, prompt: str, *, mode="sample", temperature=0.0, threshold=0.5, seed=0):
        """Generate from `prompt` with every model (the same seed); returns the first model's rollout."""
        self.rollouts = {
            name: m.generate(
                prompt, self.max_new_tokens, mode=mode, temperature=temperature, threshold=threshold, seed=seed
            )
            for name, m in self.models.items()
        }
        return self.rollout

    def details(self, t: int, model: str | None = None) -> TokenDetails:
        """`TokenDetails` of generated token `t` under `model` (a name; default the first)."""
        name = self.names[0] if model is None else model
        if name not in self.models:
            raise ValueError(f"no model named {name!r}: the explorer has {self.names}")
        return token_details(self.models[name], self.rollouts[name], 0, t)

    def n_tokens(self, name: str) -> int:
        return int(self.rollouts[name].mask[0].sum())

    def _label(self, name: str) -> str | None:
        return name if len(self.models) > 1 or name != "model" else None

    def to_html(self, t: int | None = None) -> str:
        """Static rendering: each model's coloured rollout (top-k lens readouts on hover), their exit
        difference, and one token's details under each (default: the first model's first exited token)."""
        from eetools.views.compare import exit_diff
        from eetools.views.lens_grid import exit_readouts
        from eetools.views.tokens import color_tokens

        if t is None:
            n = self.n_tokens(self.names[0])
            exited = (self.rollout.exit_layers[0, :n] < self.ee_model.n_layers).nonzero()
            t = int(exited[0]) if len(exited) else 0
        parts = []
        for name, m in self.models.items():
            r = self.rollouts[name]
            tops = exit_readouts(m, r, 0, k=self.k)
            parts.append(str(color_tokens(r, title=self._label(name), readouts=tops, selected=t)))
        if len(self.models) == 2:
            a, b = (self.rollouts[n] for n in self.names)
            parts.append(str(exit_diff(a, b, names=self.names, selected=t)))
        for name in self.names:
            if not 0 <= t < self.n_tokens(name):
                continue
            d = self.details(t, name)
            who = f"{html.escape(name)}, " if self._label(name) else ""
            parts.append(f"<h4>{who}token {t}: {html.escape(repr(d.token))}, exit layer {d.exit_layer}</h4>")
            parts.append(d.lens.to_html(index=False, float_format=fmt_prob))
            full = ", ".join(f"{html.escape(repr(s))} {fmt_prob(p)}" for s, p in d.full_depth)
            parts.append(f"<p>full-depth prediction: {full}</p>")
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        return self.to_html()

    def widget(self):
        """The ipywidgets UI (needs a widget frontend, e.g. JupyterLab)."""
        import ipywidgets as W

        return _ExplorerUI(self, W).box


class _ExplorerUI:
    """The widgets of one `Explorer.widget()` call and their callbacks."""

    def __init__(self, ex: Explorer, W):
        from IPython.display import HTML, display

        self.ex, self.W, self.HTML, self.display = ex, W, HTML, display
        wide = {"description_width": "initial"}  # labels never truncated ("temperat...")
        self.pick = W.Dropdown(
            options=[(e.prompt.strip()[:60], i) for i, e in enumerate(ex.examples)],
            description="example",
            style=wide,
            layout=W.Layout(width="480px"),
        )
        self.prompt = W.Textarea(
            value=ex.examples[0].prompt, description="prompt", style=wide, layout=W.Layout(width="95%", height="64px")
        )
        self.mode = W.Dropdown(
            options=["sample", "threshold", "off"],
            value="sample",
            description="mode",
            style=wide,
            layout=W.Layout(width="170px"),
        )
        slider = W.Layout(width="300px")
        self.temp = W.FloatSlider(
            value=0.0, min=0.0, max=1.5, step=0.1, description="temperature", style=wide, layout=slider
        )
        self.thr = W.FloatSlider(
            value=0.5, min=0.05, max=0.95, step=0.05, description="threshold", style=wide, layout=slider
        )
        self.seed = W.IntText(value=0, description="seed", style=wide, layout=W.Layout(width="130px"))
        self.go = W.Button(description="Generate", button_style="primary", layout=W.Layout(width="110px"))
        self.controls = W.HBox(
            [self.mode, self.temp, self.thr, self.seed, self.go],
            layout=W.Layout(flex_flow="row wrap", grid_gap="4px 12px"),
        )
        self.tokens = W.VBox()  # per model: a label and its clickable tokens
        self.diff = W.HTML()
        self.token = W.BoundedIntText(
            value=0, min=0, max=0, description="token", style=wide, layout=W.Layout(width="150px")
        )
        self.out_tok = W.Output()
        self.buttons: dict[str, list] = {}
        self.pick.observe(lambda ch: setattr(self.prompt, "value", ex.examples[ch["new"]].prompt), names="value")
        self.go.on_click(self.run)
        self.token.observe(self.show_token, names="value")
        self.box = W.VBox([self.pick, self.prompt, self.controls, self.tokens, self.diff, self.token, self.out_tok])
        self.run()

    def run(self, *_):
        ex = self.ex
        ex.generate(
            self.prompt.value,
            mode=self.mode.value,
            temperature=self.temp.value,
            threshold=self.thr.value,
            seed=self.seed.value,
        )
        rows = []
        for name in ex.names:
            r = ex.rollouts[name]
            n = ex.n_tokens(name)
            head = f"{html.escape(name)} · " if ex._label(name) else ""
            saved = float(r.layers_saved[0])
            rows.append(self.W.HTML(f"<b>{head}</b>tokens: {n} · layers saved: {saved:.1%} · click a token"))
            rows.append(self._token_box(name))
        self.tokens.children = rows
        if len(ex.models) == 2:
            from eetools.views.compare import exit_diff

            self.diff.value = str(exit_diff(*(ex.rollouts[n] for n in ex.names), names=ex.names))
        self.token.max = max(max(ex.n_tokens(n) for n in ex.names) - 1, 0)
        if self.token.value == 0:
            self.show_token()
        else:
            self.token.value = 0  # observer shows it

    def _token_box(self, name: str):
        """The rollout's tokens as buttons coloured by exit layer; a newline token breaks the line."""
        W, r = self.W, self.ex.rollouts[name]
        L, layers = r.n_layers, list(r.layers)
        items, buttons = [], []
        for t in range(self.ex.n_tokens(name)):
            s, e = r.str_tokens[0][t], int(r.exit_layers[0, t])
            bg, fg = _color(e, layers, L)
            where = f"exit layer {e}" if e < L else f"no exit: full depth ({L})"
            b = W.Button(
                description=visible(s, newline=""),
                tooltip=f"token {t}: {where}",
                layout=W.Layout(width="auto", min_width="16px", height="24px", padding="0 3px", margin="1px"),
                style=W.ButtonStyle(button_color=bg, text_color=fg, font_family="monospace"),
            )
            b.on_click(lambda _b, t=t: setattr(self.token, "value", t))
            items.append(b)
            buttons.append(b)
            if "\n" in s:
                items.append(W.Box(layout=W.Layout(width="100%", height="0px")))
        self.buttons[name] = buttons
        return W.Box(items, layout=W.Layout(flex_flow="row wrap", align_items="center"))

    def show_token(self, *_):
        t = self.token.value
        for bs in self.buttons.values():  # the picked token outlined in every model's row
            for i, b in enumerate(bs):
                b.layout.border = "2px solid #1f4e9a" if i == t else ""
                b.style.font_weight = "bold" if i == t else ""
        self.out_tok.clear_output()
        with self.out_tok:
            for name in self.ex.names:
                if not 0 <= t < self.ex.n_tokens(name):
                    continue
                d = self.ex.details(t, name)
                self.display(self.HTML(token_summary_html(d, self.ex._label(name))))
                self.display(self.HTML(exit_distribution_html(d)))
                d.figure().show()


def explore(ee_model, task: str = "addition", *, static: bool = False, **kwargs):
    """Open the explorer: an ipywidgets UI, or its static HTML with ``static=True``.

    `ee_model` is one `EarlyExitModel` or ``{name: model}`` for one or two models; with two, both
    generate from the same prompt and the views are labelled by name and compared.
    """
    ex = Explorer(ee_model, task, **kwargs)
    if static:
        return ex
    try:
        return ex.widget()
    except ImportError:
        return ex
