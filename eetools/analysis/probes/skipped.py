"""What the blocks skipped by exited tokens would have done: `skipped_computation`, `linearised_final_norm`."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from eetools.analysis.probes.tokens import _task_of, _text_pieces, annotate_tokens
from eetools.core.lens import capturing


def _final_norm_scale(ee_model, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
    """The final norm's divisor at `x`: RMS for RMSNorm, standard deviation for LayerNorm."""
    cfg = ee_model.model.cfg
    eps = float(getattr(cfg, "eps", 1e-5))
    if str(getattr(cfg, "normalization_type", "LN")).upper().startswith("RMS"):
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    xc = x - x.mean(-1, keepdim=True)
    return (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def linearised_final_norm(
    ee_model, x: Float[Tensor, "... d_model"], final_resid: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_model"]:
    """The final norm as a linear map frozen at `final_resid`: ``w * center(x) / scale(final_resid)``.

    The norm's scale (RMS, or standard deviation for LayerNorm) is taken from the final
    residual and held fixed, and its bias dropped, so that contributions to the residual
    add up: applied to the whole final residual it gives ``ln_final(final_resid) - bias``.
    This is the usual direct-logit-attribution approximation: it ignores how removing a
    contribution would change the scale.
    """
    cfg = ee_model.model.cfg
    if not str(getattr(cfg, "normalization_type", "LN")).upper().startswith("RMS"):
        x = x - x.mean(-1, keepdim=True)
    w = getattr(ee_model.model.ln_final, "weight", None)
    y = x / _final_norm_scale(ee_model, final_resid)
    return y * w if isinstance(w, Tensor) and w.shape[-1:] == x.shape[-1:] else y


@dataclass
class SkippedResult:
    """What the blocks skipped by exited tokens would have done.

    Attributes:
        df: one row per exited generated token: ``seq``, ``t`` (generated index),
            ``position`` (the position that predicted it), ``token``, ``token_class``,
            ``exit_layer``, ``kl`` = KL(full || early), ``top1_agree`` (full and early
            argmax equal), ``chosen_logprob_full``, ``chosen_logprob_early``,
            ``skipped_norm`` and ``skipped_dla`` (sums over skipped blocks).
        blocks: one row per (exited token, skipped block ``j >= exit_layer``): ``seq``,
            ``t``, ``token_class``, ``block``, ``norm`` (||resid_post_j - resid_pre_j||) and
            ``dla`` (that contribution's direct logit attribution to the chosen token).
    """

    df: pd.DataFrame
    blocks: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Per token class: count, mean KL, top-1 agreement, mean exit layer, skipped norm and DLA."""
        if self.df.empty:
            return pd.DataFrame(
                columns=["token_class", "n", "kl", "top1_agree", "exit_layer", "skipped_norm", "skipped_dla"]
            )
        g = self.df.groupby("token_class")
        return g.agg(
            n=("kl", "size"),
            kl=("kl", "mean"),
            top1_agree=("top1_agree", "mean"),
            exit_layer=("exit_layer", "mean"),
            skipped_norm=("skipped_norm", "mean"),
            skipped_dla=("skipped_dla", "mean"),
        ).reset_index()

    def figure(self):
        """Bars of mean KL(full || early) and top-1 agreement by token class."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        s = self.summary()
        fig = make_subplots(rows=1, cols=2, subplot_titles=("mean KL(full || early)", "top-1 agreement"))
        fig.add_trace(go.Bar(x=s["token_class"], y=s["kl"], name="KL", text=s["n"]), row=1, col=1)
        fig.add_trace(go.Bar(x=s["token_class"], y=s["top1_agree"], name="top-1 agreement"), row=1, col=2)
        fig.update_yaxes(range=[0, 1], row=1, col=2)
        fig.update_layout(title="Computation skipped by exited tokens", showlegend=False, template="plotly_white")
        return fig


def _rollout_classes(rollout, i: int, task: str | None, example, tokenizer) -> pd.DataFrame:
    n = int(rollout.mask[i].sum())
    ids = rollout.tokens[i, :n].tolist()
    eos_id = tokenizer.eos_token_id
    is_eos = [eos_id is not None and t == eos_id for t in ids]
    ann = annotate_tokens(_text_pieces(tokenizer, ids, is_eos), task, example)
    ann["token"] = [tokenizer.decode([t]) for t in ids]
    ann.loc[is_eos, "token_class"] = "eos"
    return ann


def _batch_measures(ee_model, rollout, sl: slice) -> dict[str, Tensor] | None:
    """For the exited tokens of rows `sl` of `rollout` (None if none exited): their rows, steps, positions and
    exits, the early and full-depth log-probs, their KL and top-1 agreement, the chosen tokens, and per block
    the norm and direct logit attribution of what it added in the no-exit run."""
    L, model, device = ee_model.n_layers, ee_model.model, ee_model.device
    seqs = rollout.sequences[sl].to(device)
    attn = rollout.attention_mask[sl].to(device)
    exits = rollout.exit_layers[sl].cpu()
    ri, ti = ((exits < L) & rollout.mask[sl].cpu()).nonzero(as_tuple=True)
    if len(ri) == 0:
        return None
    pos = rollout.prompt_tokens.shape[1] + ti - 1
    ri_d, pos_d = ri.to(device), pos.to(device)
    early = ee_model.prescribed_forward(seqs, rollout.prescribed_exit_layers()[sl].to(device), attn)
    early_lp = early.logprobs[ri_d, pos_d].float()
    # the model as it is (adapters on) and, as before the shared helper, no norm shortcut
    with (
        capturing(ee_model, range(L), where="pre", rows=(ri_d, pos_d), norm_shortcut=False) as pre,
        capturing(ee_model, range(L), where="post", rows=(ri_d, pos_d), norm_shortcut=False) as post,
    ):
        full_logits = model(seqs, attention_mask=attn, return_type="logits")
    added = [post[j].detach().float() - pre[j].detach().float() for j in range(L)]
    full_lp = full_logits[ri_d, pos_d].float().log_softmax(-1)
    chosen = rollout.tokens[sl].to(device)[ri_d, ti.to(device)]
    final = post[L - 1].detach().float()
    w_col = model.W_U.detach()[:, chosen].T.float()  # [n, d]
    return {
        "ri": ri,
        "ti": ti,
        "pos": pos,
        "exit": exits[ri, ti],
        "early_lp": early_lp,
        "full_lp": full_lp,
        "chosen": chosen,
        "kl": (full_lp.exp() * (full_lp - early_lp)).sum(-1).clamp(min=0),
        "agree": full_lp.argmax(-1) == early_lp.argmax(-1),
        "norms": torch.stack([a.norm(dim=-1) for a in added], 1),
        "dla": torch.stack([(linearised_final_norm(ee_model, a, final) * w_col).sum(-1) for a in added], 1),
    }


@torch.no_grad()
def skipped_computation(
    ee_model, rollout, *, examples=None, task: str | None = None, batch_size: int = 8
) -> SkippedResult:
    """Compare each exited token's early readout with what full depth would have given.

    For generated token ``t`` predicted at layer ``l < L`` (``rollout.exit_layers``):

    - early: the model's distribution under the rollout's exits
      (`prescribed_forward` with ``rollout.prescribed_exit_layers()``), i.e. the logit lens
      at ``l`` of the frozen residual;
    - full: the same model (adapters as in `ee_model`) run with no exits at all. This is a
      simpler counterfactual than "same exits everywhere else, none here": earlier exited
      positions are not frozen in it either;
    - per skipped block ``j in l .. L-1``: its contribution ``resid_post_j - resid_pre_j``
      at that position in the no-exit run, its norm, and its direct logit attribution to
      the chosen token: ``linearised_final_norm(contribution) @ W_U[:, token]``, the final
      norm's scale frozen at the no-exit final residual (see `linearised_final_norm`).

    Args:
        ee_model: the `EarlyExitModel` that produced `rollout`.
        rollout: a `Rollout`.
        examples: optional `Example`s aligned with the rollout's prompts (for the task).
        task: "addition" or "tom" for token classes; default guessed from each prompt.
        batch_size: sequences per forward pass.

    Returns:
        A `SkippedResult`: ``.df`` per exited token, ``.blocks`` per skipped block.
    """
    tok_rows, block_rows = [], []
    classes: dict[int, pd.DataFrame] = {}
    for b0 in range(0, len(rollout), batch_size):
        m = _batch_measures(ee_model, rollout, slice(b0, b0 + batch_size))
        if m is None:
            continue
        for k in range(len(m["ri"])):
            i = b0 + int(m["ri"][k])
            if i not in classes:
                ex = examples[i] if examples is not None else None
                tk = task or _task_of(rollout.prompts[i], ex)
                classes[i] = _rollout_classes(rollout, i, tk, ex, ee_model.model.tokenizer)
            t, l = int(m["ti"][k]), int(m["exit"][k])
            ann = classes[i].iloc[t]
            c = int(m["chosen"][k])
            tok_rows.append(
                {
                    "seq": i,
                    "t": t,
                    "position": int(m["pos"][k]),
                    "token": ann["token"],
                    "token_class": ann["token_class"],
                    "exit_layer": l,
                    "kl": float(m["kl"][k]),
                    "top1_agree": bool(m["agree"][k]),
                    "chosen_logprob_full": float(m["full_lp"][k, c]),
                    "chosen_logprob_early": float(m["early_lp"][k, c]),
                    "skipped_norm": float(m["norms"][k, l:].sum()),
                    "skipped_dla": float(m["dla"][k, l:].sum()),
                }
            )
            block_rows += [
                {
                    "seq": i,
                    "t": t,
                    "token_class": ann["token_class"],
                    "exit_layer": l,
                    "block": j,
                    "norm": float(m["norms"][k, j]),
                    "dla": float(m["dla"][k, j]),
                }
                for j in range(l, ee_model.n_layers)
            ]
    cols = [
        "seq",
        "t",
        "position",
        "token",
        "token_class",
        "exit_layer",
        "kl",
        "top1_agree",
        "chosen_logprob_full",
        "chosen_logprob_early",
        "skipped_norm",
        "skipped_dla",
    ]
    bcols = ["seq", "t", "token_class", "exit_layer", "block", "norm", "dla"]
    return SkippedResult(df=pd.DataFrame(tok_rows, columns=cols), blocks=pd.DataFrame(block_rows, columns=bcols))
