"""Logit-lens oracle exits and depth necessity: `oracle_exits`, `oracle_from_logprobs`, `depth_necessity`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from eetools.analysis.probes._common import _as_pairs
from eetools.analysis.probes.tokens import _task_of, _text_pieces, annotate_tokens
from eetools.core.lens import capturing
from eetools.core.lenses import resolve_readout


def oracle_from_logprobs(
    final_logprobs: Float[Tensor, "*rows vocab"],
    early_logprobs: Float[Tensor, "*rows n_exit vocab"],
    layers: Sequence[int],
    n_layers: int,
) -> Int[Tensor, "*rows"]:
    """Earliest exitable layer whose argmax equals the final argmax, else `n_layers`.

    Args:
        final_logprobs: full-depth log-probs (or logits) per row.
        early_logprobs: logit-lens log-probs (or logits) at each exitable layer per row.
        layers: the exitable layers, aligned with `early_logprobs`' second-to-last axis.
        n_layers: L, returned where no exitable layer agrees.
    """
    if early_logprobs.shape[-2] != len(layers):
        raise ValueError(f"early_logprobs has {early_logprobs.shape[-2]} layers, expected {len(layers)}")
    agree = early_logprobs.argmax(-1) == final_logprobs.argmax(-1).unsqueeze(-1)  # [*rows, n_exit]
    lay = torch.tensor([*layers, n_layers], device=agree.device)
    first = torch.cat([agree, torch.ones_like(agree[..., :1])], -1).float().argmax(-1)
    return lay[first]


@torch.no_grad()
def _lens_rows(ee_model, examples, batch_size: int, base: bool, readout=None):
    """Flattened continuation predictions: (df, final logprobs [n,V], early logprobs [n,m,V], next ids [n]).

    The early log-probs are `readout`'s (`resolve_readout`: the logit lens by default).
    """
    from eetools.core.encoding import encode_sequences

    reader = resolve_readout(ee_model, readout)

    pairs = _as_pairs(examples)
    model = ee_model.model
    tok = model.tokenizer
    eos_id = tok.eos_token_id
    frames, finals, earlies, nexts = [], [], [], []
    for b0 in range(0, len(pairs), batch_size):
        chunk = pairs[b0 : b0 + batch_size]
        ids, attn, predict = encode_sequences(ee_model, [p for p, _, _ in chunk], [c for _, c, _ in chunk])
        ri, pi = predict.nonzero(as_tuple=True)
        # as before the shared helper: adapters off only if `base`, the norm shortcut on
        with capturing(ee_model, ee_model.exit_layers, rows=(ri, pi), base=base, norm_shortcut=True) as store:
            logits = model(ids, attention_mask=attn, return_type="logits")
            early = torch.stack([reader.logits(model, store[l], l) for l in ee_model.exit_layers], 1)
        finals.append(logits[ri, pi].float().log_softmax(-1).cpu())
        earlies.append(early.float().log_softmax(-1).cpu())
        nxt = ids[ri, pi + 1]
        nexts.append(nxt.cpu())
        for i, (prompt, _cont, ex) in enumerate(chunk):
            s = int(predict[i].float().argmax()) + 1
            n_pred = int(predict[i].sum())
            next_ids = ids[i, s : s + n_pred].tolist()
            is_eos = [eos_id is not None and t == eos_id for t in next_ids]
            ann = annotate_tokens(_text_pieces(tok, next_ids, is_eos), _task_of(prompt, ex), ex)
            ann["token"] = [tok.decode([t]) for t in next_ids]
            ann.loc[is_eos, "token_class"] = "eos"
            ann.insert(0, "position", range(s - 1, s - 1 + n_pred))
            ann.insert(0, "seq", b0 + i)
            ann["exitable"] = ann["position"] >= s  # the prompt's last position never exits
            frames.append(ann)
    return pd.concat(frames, ignore_index=True), torch.cat(finals), torch.cat(earlies), torch.cat(nexts)


@dataclass
class OracleResult:
    """Oracle exits: per predicted continuation token, the earliest layer that keeps the greedy token.

    Attributes:
        df: one row per prediction: ``seq``, ``position`` (of the predicting token),
            ``token`` (predicted), ``token_class``, ``exitable`` (False at the prompt's last
            position, which never exits), ``final_argmax``, ``lens_oracle`` (earliest
            agreeing exitable layer, L if none) and ``oracle_layer`` (the same, L where
            not exitable).
        n_layers: L.
        exit_layers: the exitable layers.
    """

    df: pd.DataFrame
    n_layers: int
    exit_layers: list[int]

    @property
    def layers_saved(self) -> float:
        """Mean of ``1 - oracle_layer / L`` over predictions (comparable to `Rollout.layers_saved`)."""
        return float((1 - self.df["oracle_layer"] / self.n_layers).mean()) if len(self.df) else float("nan")

    def summary(self) -> pd.DataFrame:
        """Per token class: count, mean oracle layer and layers saved."""
        d = self.df.assign(saved=1 - self.df["oracle_layer"] / self.n_layers)
        return (
            d.groupby("token_class")
            .agg(n=("saved", "size"), oracle_layer=("oracle_layer", "mean"), layers_saved=("saved", "mean"))
            .reset_index()
        )

    def figure(self):
        """Stacked bars: fraction of predictions whose oracle exit is each layer, by token class."""
        import plotly.graph_objects as go

        layers = [*self.exit_layers, self.n_layers]
        fig = go.Figure()
        total = max(len(self.df), 1)
        for cls, g in self.df.groupby("token_class"):
            counts = g["oracle_layer"].value_counts()
            fig.add_trace(go.Bar(x=[str(l) for l in layers], y=[counts.get(l, 0) / total for l in layers], name=cls))
        fig.update_layout(
            barmode="stack",
            title=f"Oracle exit layers (layers saved {self.layers_saved:.3f})",
            xaxis_title="oracle exit layer (L = no exit)",
            yaxis_title="fraction of tokens",
            template="plotly_white",
        )
        return fig


def oracle_exits(ee_model, examples, *, base: bool = False, batch_size: int = 16, readout=None) -> OracleResult:
    """Oracle exits (docs/method.md section 8) on teacher-forced prompt + reasoning.

    Runs the model with no exits (adapters as in `ee_model`, or off with ``base=True``)
    and, per prediction of a continuation token (and EOS), finds the earliest exitable
    layer whose early readout's argmax (the logit lens, or `readout`) equals the final
    argmax: an upper bound on exits that leave greedy output unchanged, under that readout.

    Args:
        ee_model: an `EarlyExitModel`.
        examples: `Example`s or ``(prompt, continuation)`` pairs.
        base: use the base model (adapters off), the teacher of calibration.
        batch_size: sequences per forward pass.
        readout: the early readout (`eetools.core.lenses.resolve_readout`): None/"logit" the
            logit lens, "exit" the model's exit readout, or a `Readout` such as a `TunedLens`.

    Returns:
        An `OracleResult`; ``.layers_saved`` is the mean ``1 - oracle/L``.
    """
    df, final, early, _ = _lens_rows(ee_model, examples, batch_size, base, readout)
    L = ee_model.n_layers
    lens = oracle_from_logprobs(final, early, ee_model.exit_layers, L)
    df["final_argmax"] = final.argmax(-1).numpy()
    df["lens_oracle"] = lens.numpy()
    df["oracle_layer"] = np.where(df["exitable"].to_numpy(), lens.numpy(), L)
    return OracleResult(df=df, n_layers=L, exit_layers=list(ee_model.exit_layers))


@dataclass
class DepthResult:
    """Readout quality when every continuation token is read out at one exitable layer.

    Attributes:
        df: one row per exitable layer: ``layer``, ``agreement`` (top-1 agreement with the
            final argmax), ``nll`` (mean NLL of the true next token at that readout),
            ``final_nll`` (the same at full depth), ``kl`` (mean ``KL(final || readout)``), ``n_tokens``.
        by_class: the same per (layer, token class of the predicted token).
    """

    df: pd.DataFrame
    by_class: pd.DataFrame

    def figure(self):
        """Agreement and NLL vs layer; the full-depth NLL dashed."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        d = self.df
        fig = make_subplots(rows=1, cols=2, subplot_titles=("top-1 agreement with final", "NLL of the true token"))
        fig.add_trace(go.Scatter(x=d["layer"], y=d["agreement"], mode="lines+markers", name="agreement"), row=1, col=1)
        fig.add_trace(go.Scatter(x=d["layer"], y=d["nll"], mode="lines+markers", name="NLL at layer"), row=1, col=2)
        if len(d):
            fig.add_trace(
                go.Scatter(
                    x=d["layer"],
                    y=d["final_nll"],
                    mode="lines",
                    name="full depth",
                    line=dict(dash="dash", color="grey"),
                ),
                row=1,
                col=2,
            )
        fig.update_yaxes(range=[0, 1.05], row=1, col=1)
        fig.update_xaxes(title_text="readout layer")
        fig.update_layout(title="Depth necessity", template="plotly_white")
        return fig


def depth_necessity(ee_model, examples, *, base: bool = False, batch_size: int = 16, readout=None) -> DepthResult:
    """Agreement and loss when every continuation prediction is read out at one exitable layer.

    The model runs at full depth with no exits (adapters as in `ee_model`, or off with
    ``base=True``); at each exitable layer ``l`` the logit lens ``unembed(ln_final(resid_pre_l))``
    (or `readout`, as in `oracle_exits`) predicts every continuation token (and EOS). A curve of
    how much depth the task needs.

    Args:
        ee_model: an `EarlyExitModel`.
        examples: `Example`s or ``(prompt, continuation)`` pairs.
        base: use the base model (adapters off).
        batch_size: sequences per forward pass.
        readout: the early readout, as in `oracle_exits`.

    Returns:
        A `DepthResult` with one row per exitable layer.
    """
    df, final, early, nxt = _lens_rows(ee_model, examples, batch_size, base, readout)
    agree = early.argmax(-1) == final.argmax(-1).unsqueeze(-1)  # [n, m]
    nll = -early.gather(-1, nxt[:, None, None].expand(-1, early.shape[1], 1)).squeeze(-1)  # [n, m]
    final_nll = -final.gather(-1, nxt[:, None]).squeeze(-1)
    kl = (final.exp().unsqueeze(1) * (final.unsqueeze(1) - early)).sum(-1)  # KL(final || early) [n, m]
    rows, crow = [], []
    for k, l in enumerate(ee_model.exit_layers):
        rows.append(
            {
                "layer": l,
                "agreement": float(agree[:, k].float().mean()),
                "nll": float(nll[:, k].mean()),
                "final_nll": float(final_nll.mean()),
                "kl": float(kl[:, k].mean()),
                "n_tokens": len(df),
            }
        )
        for cls in sorted(df["token_class"].unique()):
            m = torch.tensor((df["token_class"] == cls).to_numpy())
            crow.append(
                {
                    "layer": l,
                    "token_class": cls,
                    "agreement": float(agree[m, k].float().mean()),
                    "nll": float(nll[m, k].mean()),
                    "final_nll": float(final_nll[m].mean()),
                    "n_tokens": int(m.sum()),
                }
            )
    return DepthResult(df=pd.DataFrame(rows), by_class=pd.DataFrame(crow))
