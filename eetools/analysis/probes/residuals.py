"""Teacher-forced residual streams at every continuation token: `collect_residuals` -> `ResidualSet`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from eetools.analysis.probes._common import _as_pairs
from eetools.analysis.probes.tokens import _pieces, _task_of, annotate_tokens
from eetools.core.lens import capturing


@dataclass
class ResidualSet:
    """Residual streams at token positions, with one annotated row per token.

    Attributes:
        resid: ``[n_tokens, n_layers_captured, d_model]`` residuals (CPU, float32).
        layers: the captured layers, aligned with ``resid``'s second axis (``L`` = final).
        df: one row per token: ``seq``, ``position``, ``rel_position`` (0 = first
            continuation token, -1 = the prompt's last token), ``token``, ``next_token``,
            ``token_class``, ``line``, ``column``, ``task``, ``answer``, the task variables,
            and ``exit_layer`` when exits were given.
        n_layers: L, the model's number of blocks.
        exit_resid: ``[n_tokens, d_model]`` residual entering each position's exit layer
            (the frozen state its prediction reads), or None.
    """

    resid: Float[Tensor, "n n_captured d_model"]
    layers: list[int]
    df: pd.DataFrame
    n_layers: int | None = None
    exit_resid: Float[Tensor, "n d_model"] | None = None

    def __post_init__(self):
        if self.resid.ndim != 3 or self.resid.shape[1] != len(self.layers):
            raise ValueError(
                f"resid has shape {tuple(self.resid.shape)}; expected [n_tokens, {len(self.layers)}, d_model]"
            )
        if len(self.df) != self.resid.shape[0]:
            raise ValueError(f"df has {len(self.df)} rows but resid has {self.resid.shape[0]} tokens")
        if self.n_layers is None:
            self.n_layers = max(self.layers)

    def __len__(self) -> int:
        return self.resid.shape[0]

    def _index(self, layer: int | str) -> int:
        if layer == "final":
            layer = self.n_layers
        if layer not in self.layers:
            raise KeyError(
                f"layer {layer!r} was not captured; captured layers are {self.layers} "
                f"(and 'exit' when exit layers were given)"
            )
        return self.layers.index(layer)

    def acts(self, layer: int | str) -> Float[Tensor, "n d_model"]:
        """Residuals of every token at `layer` (an int, "final" = L, or "exit")."""
        if layer == "exit":
            if self.exit_resid is None:
                raise KeyError("no exit-point residuals: call collect_residuals(..., exit_layers=...)")
            return self.exit_resid
        return self.resid[:, self._index(layer)]

    def subset(self, mask) -> ResidualSet:
        """The tokens where boolean `mask` (array-like over rows) holds."""
        m = np.asarray(mask, dtype=bool)
        idx = torch.from_numpy(np.flatnonzero(m))
        return ResidualSet(
            self.resid[idx],
            list(self.layers),
            self.df[m].reset_index(drop=True),
            self.n_layers,
            None if self.exit_resid is None else self.exit_resid[idx],
        )

    def figure(self, layer: int | str | None = None, color: str = "token_class"):
        """2-D PCA of the residuals at `layer` (default: final), coloured by a df column."""
        import plotly.express as px
        from sklearn.decomposition import PCA

        layer = self.layers[-1] if layer is None else layer
        x = self.acts(layer).double().numpy()
        xy = PCA(n_components=2).fit_transform(x) if len(x) >= 2 else np.zeros((len(x), 2))
        d = self.df.assign(pc1=xy[:, 0], pc2=xy[:, 1])
        d[color] = d[color].astype(str)
        fig = px.scatter(
            d,
            x="pc1",
            y="pc2",
            color=color,
            hover_data=["seq", "position", "token"],
            title=f"Residuals at layer {layer} (PCA)",
            template="plotly_white",
        )
        return fig


def _resolve_layers(layers, ee_model) -> list[int]:
    L = ee_model.n_layers
    if layers is None:
        return [*ee_model.exit_layers, L]
    out = []
    for l in layers:
        l = L if l == "final" else int(l)
        if not 0 <= l <= L:
            raise ValueError(f"layer {l} is out of range 0..{L} (L = {L} is the final residual)")
        if l not in out:
            out.append(l)
    return sorted(out)


def _exit_matrix(exit_layers, shape, L: int) -> Tensor:
    b, t = shape
    ex = torch.full((b, t), L, dtype=torch.long)
    if isinstance(exit_layers, Tensor) and exit_layers.ndim == 2:
        exit_layers = list(exit_layers)
    if len(exit_layers) != b:
        raise ValueError(f"exit_layers has {len(exit_layers)} sequences, expected {b} (one per example)")
    for i, e in enumerate(exit_layers):
        e = torch.as_tensor(e, dtype=torch.long).flatten().cpu()
        m = min(len(e), t)
        ex[i, :m] = e[:m]
    return ex


def _sequence_frame(
    model, ids: Int[Tensor, " pos"], predict: Tensor, prompt: str, cont: str, ex, prompt_last: bool
) -> pd.DataFrame:
    """One row per continuation token of one encoded sequence (and its prompt's last token with `prompt_last`):
    position, token, next token, class, line, task and answer."""
    tok = model.tokenizer
    s = int(predict.float().argmax()) + 1  # first continuation position
    cont_ids = model.to_tokens(cont, prepend_bos=False, truncate=False)[0].tolist() if cont else []
    n = len(cont_ids)
    if ids[s : s + n].tolist() != cont_ids:
        raise RuntimeError("continuation tokens are not where encode_sequences put them")
    task = _task_of(prompt, ex)
    ann = annotate_tokens(_pieces(tok, cont_ids), task, ex)
    nxt = [tok.decode([t]) for t in ids[s + 1 : s + n + 1].tolist()]
    ann.insert(1, "next_token", nxt + [""] * (n - len(nxt)))
    ann.insert(0, "rel_position", range(n))
    ann.insert(0, "position", range(s, s + n))
    if prompt_last:
        first = pd.DataFrame(
            [
                {
                    "position": s - 1,
                    "rel_position": -1,
                    "token": tok.decode([int(ids[s - 1])]),
                    "next_token": tok.decode([int(ids[s])]) if n else "",
                    "token_class": "prompt",
                    "line": -1,
                }
            ]
        )
        if "believed_location" in ann:
            first["believed_location"] = getattr(ex, "answer", None)
        ann = pd.concat([first, ann], ignore_index=True) if n else first
    ann["task"] = task
    ann["answer"] = getattr(ex, "answer", None)
    return ann


@torch.no_grad()
def collect_residuals(
    ee_model,
    examples,
    *,
    layers: Sequence[int | str] | None = None,
    exit_layers: Sequence[Int[Tensor, " pos"]] | Int[Tensor, "batch pos"] | None = None,
    prompt_last: bool = False,
    batch_size: int = 16,
) -> ResidualSet:
    """Teacher-forced residual streams at every continuation token of prompt + reasoning.

    Sequences are encoded as in calibration (`eetools.core.encoding.encode_sequences`:
    BOS if the model uses one, prompt, continuation, EOS). The model runs as it is
    (adapters, if any, on). Without `exit_layers` nothing exits; with them the model runs
    with those exits (frozen residuals, docs/method.md section 4), so every captured residual
    is what the exited model computed, and the exit-point residual of each position is
    recorded too.

    Args:
        ee_model: an `EarlyExitModel`.
        examples: `Example`s (prompt + reasoning) or ``(prompt, continuation)`` pairs.
        layers: layers to capture, each in ``0 .. L`` (``l`` = the stream entering block
            ``l``, ``L`` or "final" = the stream leaving the last block; see
            `eetools.core.lens`); default the exitable layers plus the final residual.
        exit_layers: per sequence, the exit layer of each position of the unpadded
            encoding (BOS + prompt + continuation), an exitable layer or L; shorter tensors
            are padded with L. Prompt positions should hold L.
        prompt_last: also keep the prompt's last token (``rel_position`` -1,
            class "prompt"), the position that predicts the first continuation token.
        batch_size: sequences per forward pass.

    Returns:
        A `ResidualSet` with one row per continuation token (plus one per sequence with
        `prompt_last`); the final residual of an exited position is its frozen value.
    """
    from eetools.core.encoding import encode_sequences

    pairs = _as_pairs(examples)
    want = _resolve_layers(layers, ee_model)
    L, model = ee_model.n_layers, ee_model.model
    if exit_layers is not None and len(exit_layers) != len(pairs):
        raise ValueError(f"exit_layers has {len(exit_layers)} sequences, expected {len(pairs)} (one per example)")
    resids, exit_res, frames = [], [], []
    for b0 in range(0, len(pairs), batch_size):
        chunk = pairs[b0 : b0 + batch_size]
        ids, attn, predict = encode_sequences(ee_model, [p for p, _, _ in chunk], [c for _, c, _ in chunk])
        rows_i, rows_p = [], []
        for i, (prompt, cont, ex) in enumerate(chunk):
            ann = _sequence_frame(model, ids[i], predict[i], prompt, cont, ex, prompt_last)
            ann.insert(0, "seq", b0 + i)
            rows_i += [i] * len(ann)
            rows_p += ann["position"].tolist()
            frames.append(ann)
        ri, rp = torch.tensor(rows_i, dtype=torch.long), torch.tensor(rows_p, dtype=torch.long)
        ex_mat = None
        if exit_layers is not None:
            ex_mat = _exit_matrix(exit_layers[b0 : b0 + batch_size], ids.shape, L)
            ex_mat[attn.cpu() == 0] = L
        capture = sorted(set(want) | (set(ex_mat[ri, rp].tolist()) if ex_mat is not None else set()))
        # the model as it is: adapters on, and no norm shortcut of our own (prescribed_forward takes it)
        with capturing(ee_model, capture, rows=(ri.to(ids.device), rp.to(ids.device)), norm_shortcut=False) as got:
            if ex_mat is None:
                model(ids, attention_mask=attn, return_type="logits")
            else:
                ee_model.prescribed_forward(ids, ex_mat.to(ids.device), attention_mask=attn)
        store = {l: r.detach().float().cpu() for l, r in got.items()}
        if ex_mat is not None:
            e_rows = ex_mat[ri, rp]
            stacked = torch.stack([store[l] for l in capture], 1)
            point = stacked[torch.arange(len(e_rows)), torch.tensor([capture.index(int(l)) for l in e_rows])]
            if L in store:  # the readout of an exited position reads its frozen state
                store[L] = torch.where((e_rows < L).unsqueeze(-1), point, store[L])
            exit_res.append(point)
            frames[-len(chunk) :] = [
                f.assign(exit_layer=ex_mat[b_i, f["position"].tolist()].numpy())
                for b_i, f in enumerate(frames[-len(chunk) :])
            ]
        resids.append(torch.stack([store[l] for l in want], 1))
    df = pd.concat(frames, ignore_index=True)
    return ResidualSet(
        resid=torch.cat(resids), layers=want, df=df, n_layers=L, exit_resid=torch.cat(exit_res) if exit_res else None
    )
