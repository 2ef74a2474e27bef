"""An interactive explorer of exits (ipywidgets), with a static fallback.

`explore(ee_model)` shows: a task example picker or a free prompt, the exit mode,
temperature, threshold and seed, a Generate button, the rollout coloured by exit layer,
and a token picker; for the picked token, its exit distribution, its logit-lens
trajectory across layers and the counterfactual full-depth prediction. Without a widget
frontend (plain HTML export, a terminal), `Explorer.to_html()` renders the same content
statically.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from eetools import tasks as task_lib
from eetools.core.heads import stick_breaking


@dataclass
class TokenDetails:
    """Everything the explorer shows about generated token `t` of sequence `index`.

    Attributes:
        token: the token (string).
        exit_layer: layer it was predicted at (L = full depth).
        exit_distribution: stick-breaking P(exit at each exitable layer, then none) at its position.
        lens: one row per layer 1..L: top-1 readout token, its probability, and the probability
            of the generated token (logit lens with the final norm, no exits).
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
                text=self.lens["top1"],
                name="P(generated token)",
            )
        )
        fig.add_vline(x=self.exit_layer, line_dash="dash", annotation_text="exit")
        fig.update_layout(
            title=f"Logit lens of {self.token!r}",
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
            p = ee_model.readout(store[l]).float().softmax(-1)
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


def token_summary_html(d: TokenDetails) -> str:
    """One line of HTML on a picked token: the token, its exit layer and the full-depth top 3, model text escaped."""
    import html

    full = ", ".join(f"{html.escape(repr(s))} {p:.2f}" for s, p in d.full_depth)
    return f"<b>{html.escape(repr(d.token))}</b>: exit layer {d.exit_layer}; full depth would say {full}"


class Explorer:
    """The interactive explorer. Build with `explore(ee_model)`; display it in Jupyter."""

    def __init__(self, ee_model, task: str = "addition", n_examples: int = 20, max_new_tokens: int | None = None):
        self.ee_model, self.task = ee_model, task_lib.get(task, tokenizer=ee_model)
        self.examples = self.task.test_split()[:n_examples]
        self.max_new_tokens = max_new_tokens or self.task.max_new_tokens
        self.rollout = None
        self.generate(self.examples[0].prompt, mode="sample", temperature=0.0, threshold=0.5, seed=0)

    def generate(self, prompt: str, *, mode="sample", temperature=0.0, threshold=0.5, seed=0):
        self.rollout = self.ee_model.generate(
            prompt, self.max_new_tokens, mode=mode, temperature=temperature, threshold=threshold, seed=seed
        )
        return self.rollout

    def details(self, t: int) -> TokenDetails:
        return token_details(self.ee_model, self.rollout, 0, t)

    def to_html(self, t: int | None = None) -> str:
        """Static rendering: the coloured rollout and one token's details (default: the first exited one)."""
        import html

        from eetools.views.tokens import color_tokens

        parts = [str(color_tokens(self.rollout))]
        n = int(self.rollout.mask[0].sum())
        if n:
            if t is None:
                exited = (self.rollout.exit_layers[0, :n] < self.ee_model.n_layers).nonzero()
                t = int(exited[0]) if len(exited) else 0
            d = self.details(t)
            parts.append(f"<h4>token {t}: {html.escape(repr(d.token))}, exit layer {d.exit_layer}</h4>")
            parts.append(d.lens.to_html(index=False, float_format=lambda v: f"{v:.3f}"))
            full = ", ".join(f"{html.escape(repr(s))} {p:.2f}" for s, p in d.full_depth)
            parts.append(f"<p>full-depth prediction: {full}</p>")
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        return self.to_html()

    def widget(self):
        """The ipywidgets UI (needs a widget frontend, e.g. JupyterLab)."""
        import ipywidgets as W
        from IPython.display import HTML, display

        from eetools.views.tokens import color_tokens

        pick = W.Dropdown(
            options=[(e.prompt.strip()[:60], i) for i, e in enumerate(self.examples)], description="example"
        )
        prompt = W.Textarea(value=self.examples[0].prompt, description="prompt", layout=W.Layout(width="600px"))
        mode = W.Dropdown(options=["sample", "threshold", "off"], value="sample", description="mode")
        temp = W.FloatSlider(value=0.0, min=0.0, max=1.5, step=0.1, description="temperature")
        thr = W.FloatSlider(value=0.5, min=0.05, max=0.95, step=0.05, description="threshold")
        seed = W.IntText(value=0, description="seed")
        go_btn = W.Button(description="Generate", button_style="primary")
        token = W.IntSlider(value=0, min=0, max=0, description="token")
        out_text, out_tok = W.Output(), W.Output()

        def show_token(*_):
            out_tok.clear_output()
            with out_tok:
                if self.rollout is None or int(self.rollout.mask[0].sum()) == 0:
                    return
                d = self.details(token.value)
                display(HTML(token_summary_html(d)))
                display(d.exit_distribution.to_frame("P(exit)").T)
                d.figure().show()

        def run(*_):
            self.generate(prompt.value, mode=mode.value, temperature=temp.value, threshold=thr.value, seed=seed.value)
            out_text.clear_output()
            with out_text:
                display(color_tokens(self.rollout))
            token.max = max(int(self.rollout.mask[0].sum()) - 1, 0)
            token.value = 0
            show_token()

        pick.observe(lambda ch: setattr(prompt, "value", self.examples[ch["new"]].prompt), names="value")
        go_btn.on_click(run)
        token.observe(show_token, names="value")
        run()
        return W.VBox([pick, prompt, W.HBox([mode, temp, thr, seed, go_btn]), out_text, token, out_tok])


def explore(ee_model, task: str = "addition", *, static: bool = False, **kwargs):
    """Open the explorer: an ipywidgets UI, or its static HTML with ``static=True``."""
    ex = Explorer(ee_model, task, **kwargs)
    if static:
        return ex
    try:
        return ex.widget()
    except ImportError:
        return ex
