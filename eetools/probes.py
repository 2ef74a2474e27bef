"""Looking inside early-exit models: residual probes, skipped computation, oracle exits, hidden planning.

Every probe is a function that returns a dataclass holding a pandas DataFrame (``.df``,
the data) and a ``.figure()`` (a plotly view of it); data first, views second.

Public API:

- `collect_residuals(ee_model, examples)` -> `ResidualSet`: teacher-forced residual streams
  at every continuation token, with token classes and task variables per token.
- `fit_probe(residuals, layer, target)` -> `ProbeResult`: a linear probe (scikit-learn)
  with a shuffled-label baseline; `probe_sweep(residuals, target)` -> `ProbeSweep`, one
  row per layer.
- `skipped_computation(ee_model, rollout)` -> `SkippedResult`: for each exited token, what
  the skipped blocks would have changed (KL, top-1 agreement, per-block norms and direct
  logit attribution).
- `oracle_exits(ee_model, examples)` -> `OracleResult` (earliest exitable layer whose
  logit-lens argmax equals the final argmax) and its pure core `oracle_from_logprobs`;
  `depth_necessity(ee_model, examples)` -> `DepthResult` (agreement and loss when every
  token is read out at one layer).
- `hidden_planning(ee_model_before, ee_model_after, examples)` -> `HiddenPlanningResult`:
  how decodable the answer is before it is written, before vs after RL.
- `annotate_tokens(pieces, task, example)`: token classes and task variables of a text.

Conventions:

- Layer ``l`` in ``0 .. L-1`` means the residual stream entering block ``l``
  (``blocks.{l}.hook_resid_pre``); layer ``L`` ("final") means the stream leaving the last
  block (``blocks.{L-1}.hook_resid_post``), the one the final norm and unembedding read.
- Rows of `collect_residuals` are token *positions*: the residual at position ``p`` sits on
  the token at ``p`` and predicts the token at ``p + 1``. The exit of position ``p``
  (section 4 of DESIGN.md) decides the prediction of the next token.
- Rows of `oracle_exits`, `depth_necessity` and `skipped_computation` are *predictions*:
  one per predicted continuation token (and EOS), labelled by the predicted token, as in a
  `Rollout` (generated token ``t`` is predicted at position ``P + t - 1``).
- Token classes: addition -- "format" (``+ = : A``, spaces, newlines), "copied_digit"
  (the two operand digits and the carry-in of a column line), "computed_digit" (digits
  of a column sum), "answer" (digits after ``"A: "``); ToM -- "format", "copied_name"
  (agent names), "container", "answer". Also "prompt" (a prompt token), "eos", and
  "other" (letters or digits in a line that does not follow the task's format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from eetools.hooks import resid_post, resid_pre

__all__ = [
    "ResidualSet", "collect_residuals", "annotate_tokens", "TOKEN_CLASSES",
    "ProbeResult", "ProbeSweep", "fit_probe", "probe_sweep",
    "SkippedResult", "skipped_computation", "linearised_final_norm",
    "OracleResult", "oracle_exits", "oracle_from_logprobs", "DepthResult", "depth_necessity",
    "HiddenPlanningResult", "hidden_planning",
]

TOKEN_CLASSES = {
    "addition": ("format", "copied_digit", "computed_digit", "answer"),
    "tom": ("format", "copied_name", "container", "answer"),
}
# When a token spans characters of several classes, the most informative one wins.
_PRIORITY = ("answer", "computed_digit", "copied_digit", "copied_name", "container", "other", "format")
_RANK = {c: i for i, c in enumerate(_PRIORITY)}

_ADD_LINE = re.compile(r"^(\d)\+(\d)\+(\d)=(\d+)$")
_ADD_PROMPT = re.compile(r"Q: \d+\+\d+")
_NAME = r"[A-Z][a-z]+"
_TOM_PLACE = re.compile(rf"^([a-z]+): ({_NAME}(?: {_NAME})*)$")
_TOM_NOW = re.compile(r"^now ([a-z]+)$")
_TOM_SAW = re.compile(rf"^((?:{_NAME} )+)saw ([a-z]+)$")
_ANSWER = "A: "


# =============================================================================== token annotation


def guess_task(prompt: str) -> str | None:
    """"addition", "tom" or None, from a prompt's text."""
    if _ADD_PROMPT.search(prompt):
        return "addition"
    if "Where " in prompt and "Q:" in prompt:
        return "tom"
    return None


def _char_labels(text: str, task: str | None) -> tuple[list[str], list[int | None], list[int]]:
    """Per character: class, column (addition: units = 0) and line index of a continuation."""
    classes: list[str] = []
    columns: list[int | None] = []
    lines: list[int] = []
    n_col = 0
    for li, line in enumerate(text.split("\n")):
        cls = ["other" if ch.isalnum() else "format" for ch in line]
        col: list[int | None] = [None] * len(line)
        if line.startswith(_ANSWER):
            body = line[len(_ANSWER):]
            cls[: len(_ANSWER)] = ["format"] * len(_ANSWER)
            digits = [i for i, ch in enumerate(body) if ch.isdigit()]
            for i, ch in enumerate(body):
                j = len(_ANSWER) + i
                if task == "addition":
                    if ch.isdigit():
                        cls[j] = "answer"
                        col[j] = len(digits) - 1 - digits.index(i)
                    else:
                        cls[j] = "format" if not ch.isalnum() else "other"
                else:
                    cls[j] = "answer" if not ch.isspace() else "format"
        elif task == "addition" and (m := _ADD_LINE.match(line)):
            cls = ["copied_digit", "format", "copied_digit", "format", "copied_digit", "format"]
            cls += ["computed_digit"] * len(m.group(4))
            col = [n_col] * (len(line) + 1)  # the whole line and its newline
            n_col += 1
        elif task == "tom":
            if m := _TOM_PLACE.match(line):
                cls = ["container"] * len(m.group(1)) + ["format", "format"]
                cls += ["format" if ch == " " else "copied_name" for ch in m.group(2)]
            elif m := _TOM_NOW.match(line):
                cls = ["format"] * 4 + ["container"] * len(m.group(1))
            elif m := _TOM_SAW.match(line):
                cls = ["format" if ch == " " else "copied_name" for ch in m.group(1)]
                cls += ["format"] * 4 + ["container"] * len(m.group(2))
        classes += cls
        columns += col[: len(line)]
        lines += [li] * len(line)
        # the newline after the line (absent after the last piece of text)
        classes.append("format")
        columns.append(col[len(line)] if len(col) > len(line) else None)
        lines.append(li)
    n = len(text)
    return classes[:n], columns[:n], lines[:n]


def _example_meta(example) -> tuple[str | None, dict, str | None]:
    if example is None:
        return None, {}, None
    return getattr(example, "task", None), dict(getattr(example, "meta", {}) or {}), getattr(example, "answer", None)


def annotate_tokens(pieces: Sequence[str], task: str | None = None, example=None) -> pd.DataFrame:
    """Token classes and task variables of a continuation given as its token strings.

    The continuation is read line by line in the task's written format (addition column
    lines ``x+y+c=s``, ToM placement and deciding lines, the answer line ``A: ...``); a token
    takes the most informative class among its characters (answer > computed digit >
    copied digit > name > container > other > format). Malformed lines give "other" to
    their letters and digits.

    Args:
        pieces: the continuation's tokens as strings, in order (they concatenate to the text).
        task: "addition", "tom", or None (taken from `example`, else every token is
            "format"/"other").
        example: the `Example` the text answers; its truth gives the task variables.

    Returns:
        One row per token: ``token``, ``token_class``, ``line``, ``column`` (addition:
        column of a column line or answer digit, units = 0), and task variables --
        addition: ``carry`` (carry out of the column), ``sum_digit`` (column sum % 10),
        ``answer_digit`` (the true answer's digit in that column); ToM:
        ``believed_location`` (the answer). Missing values are NA.
    """
    ex_task, meta, answer = _example_meta(example)
    task = task or ex_task
    text = "".join(pieces)
    cls, cols, lines = _char_labels(text, task)
    rows = []
    start = 0
    steps = None
    if task == "addition" and "a" in meta and "b" in meta:
        from eetools.tasks.addition import column_steps

        steps = column_steps(int(meta["a"]), int(meta["b"]))
        answer = str(int(meta["a"]) + int(meta["b"]))
    for piece in pieces:
        span = range(start, start + len(piece))
        start += len(piece)
        c = min((cls[i] for i in span), key=_RANK.__getitem__, default="format")
        col = next((cols[i] for i in span if cols[i] is not None), None)
        row = {"token": piece, "token_class": c, "line": lines[span[0]] if len(span) else (lines[-1] if lines else 0),
               "column": col}
        if task == "addition":
            carry = sum_digit = answer_digit = None
            if col is not None and steps is not None and col < len(steps):
                carry, sum_digit = steps[col][3] // 10, steps[col][3] % 10
            if col is not None and answer is not None and col < len(answer):
                answer_digit = int(answer[::-1][col])
            row.update(carry=carry, sum_digit=sum_digit, answer_digit=answer_digit)
        elif task == "tom":
            row["believed_location"] = answer
        rows.append(row)
    df = pd.DataFrame(rows, columns=["token", "token_class", "line", "column"] if not rows else None)
    for name in ("column", "carry", "sum_digit", "answer_digit"):
        if name in df:
            df[name] = df[name].astype("Int64")
    return df


def _pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Token strings that concatenate to the decoded text (prefix differences)."""
    out, prev = [], ""
    for k in range(len(ids)):
        cur = tokenizer.decode(list(ids[: k + 1]))
        if cur.startswith(prev):
            out.append(cur[len(prev):])
        else:  # a multi-byte character split across tokens: fall back to the lone token
            out.append(tokenizer.decode([ids[k]]))
        prev = cur
    return out


def _as_pairs(examples) -> list[tuple[str, str, object]]:
    """(prompt, continuation, example-or-None) from Examples or (prompt, continuation) pairs."""
    out = []
    for e in examples:
        if hasattr(e, "prompt") and hasattr(e, "reasoning"):
            out.append((e.prompt, e.reasoning, e))
        else:
            p, c = e
            out.append((p, c, None))
    if not out:
        raise ValueError("no examples given")
    return out


def _task_of(prompt: str, example) -> str | None:
    t = getattr(example, "task", None)
    return t if t in TOKEN_CLASSES else guess_task(prompt)


# =============================================================================== residuals


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
            raise ValueError(f"resid has shape {tuple(self.resid.shape)}; expected [n_tokens, {len(self.layers)}, d_model]")
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
            raise KeyError(f"layer {layer!r} was not captured; captured layers are {self.layers} "
                           f"(and 'exit' when exit layers were given)")
        return self.layers.index(layer)

    def acts(self, layer: int | str) -> Float[Tensor, "n d_model"]:
        """Residuals of every token at `layer` (an int, "final" = L, or "exit")."""
        if layer == "exit":
            if self.exit_resid is None:
                raise KeyError("no exit-point residuals: call collect_residuals(..., exit_layers=...)")
            return self.exit_resid
        return self.resid[:, self._index(layer)]

    def subset(self, mask) -> "ResidualSet":
        """The tokens where boolean `mask` (array-like over rows) holds."""
        m = np.asarray(mask, dtype=bool)
        idx = torch.from_numpy(np.flatnonzero(m))
        return ResidualSet(self.resid[idx], list(self.layers), self.df[m].reset_index(drop=True), self.n_layers,
                           None if self.exit_resid is None else self.exit_resid[idx])

    def figure(self, layer: int | str | None = None, color: str = "token_class"):
        """2-D PCA of the residuals at `layer` (default: final), coloured by a df column."""
        import plotly.express as px
        from sklearn.decomposition import PCA

        layer = self.layers[-1] if layer is None else layer
        x = self.acts(layer).double().numpy()
        xy = PCA(n_components=2).fit_transform(x) if len(x) >= 2 else np.zeros((len(x), 2))
        d = self.df.assign(pc1=xy[:, 0], pc2=xy[:, 1])
        d[color] = d[color].astype(str)
        fig = px.scatter(d, x="pc1", y="pc2", color=color, hover_data=["seq", "position", "token"],
                         title=f"Residuals at layer {layer} (PCA)", template="plotly_white")
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


@torch.no_grad()
def collect_residuals(ee_model, examples, *, layers: Sequence[int | str] | None = None,
                      exit_layers: Sequence[Int[Tensor, "pos"]] | Int[Tensor, "batch pos"] | None = None,
                      prompt_last: bool = False, batch_size: int = 16) -> ResidualSet:
    """Teacher-forced residual streams at every continuation token of prompt + reasoning.

    Sequences are encoded as in calibration (`eetools.calibration.encode_sequences`:
    BOS if the model uses one, prompt, continuation, EOS). The model runs as it is
    (adapters, if any, on). Without `exit_layers` nothing exits; with them the model runs
    with those exits (frozen residuals, DESIGN.md section 4), so every captured residual
    is what the exited model computed, and the exit-point residual of each position is
    recorded too.

    Args:
        ee_model: an `EarlyExitModel`.
        examples: `Example`s (prompt + reasoning) or ``(prompt, continuation)`` pairs.
        layers: layers to capture, each in ``0 .. L`` (``l`` = ``blocks.{l}.hook_resid_pre``,
            ``L`` or "final" = ``blocks.{L-1}.hook_resid_post``); default the exitable
            layers plus the final residual.
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
    from eetools.calibration import encode_sequences

    pairs = _as_pairs(examples)
    want = _resolve_layers(layers, ee_model)
    L, model = ee_model.n_layers, ee_model.model
    tok = model.tokenizer
    if exit_layers is not None and len(exit_layers) != len(pairs):
        raise ValueError(f"exit_layers has {len(exit_layers)} sequences, expected {len(pairs)} (one per example)")
    resids, exit_res, frames = [], [], []
    for b0 in range(0, len(pairs), batch_size):
        chunk = pairs[b0 : b0 + batch_size]
        ids, attn, predict = encode_sequences(ee_model, [p for p, _, _ in chunk], [c for _, c, _ in chunk])
        rows_i, rows_p, metas = [], [], []
        for i, (prompt, cont, ex) in enumerate(chunk):
            s = int(predict[i].float().argmax()) + 1  # first continuation position
            cont_ids = model.to_tokens(cont, prepend_bos=False, truncate=False)[0].tolist() if cont else []
            n = len(cont_ids)
            if ids[i, s : s + n].tolist() != cont_ids:
                raise RuntimeError("continuation tokens are not where encode_sequences put them")
            task = _task_of(prompt, ex)
            ann = annotate_tokens(_pieces(tok, cont_ids), task, ex)
            nxt = [tok.decode([t]) for t in ids[i, s + 1 : s + n + 1].tolist()]
            ann.insert(1, "next_token", nxt + [""] * (n - len(nxt)))
            ann.insert(0, "rel_position", range(n))
            ann.insert(0, "position", range(s, s + n))
            if prompt_last:
                first = pd.DataFrame([{"position": s - 1, "rel_position": -1,
                                       "token": tok.decode([int(ids[i, s - 1])]),
                                       "next_token": tok.decode([int(ids[i, s])]) if n else "",
                                       "token_class": "prompt", "line": -1}])
                if "believed_location" in ann:
                    first["believed_location"] = getattr(ex, "answer", None)
                ann = pd.concat([first, ann], ignore_index=True) if n else first
            ann.insert(0, "seq", b0 + i)
            ann["task"] = task
            ann["answer"] = getattr(ex, "answer", None)
            rows_i += [i] * len(ann)
            rows_p += ann["position"].tolist()
            frames.append(ann)
        ri, rp = torch.tensor(rows_i, dtype=torch.long), torch.tensor(rows_p, dtype=torch.long)
        ex_mat = None
        if exit_layers is not None:
            ex_mat = _exit_matrix(exit_layers[b0 : b0 + batch_size], ids.shape, L)
            ex_mat[attn.cpu() == 0] = L
        capture = sorted(set(want) | (set(ex_mat[ri, rp].tolist()) if ex_mat is not None else set()))
        store: dict[int, Tensor] = {}

        def grab(layer, _ri=ri.to(ids.device), _rp=rp.to(ids.device)):
            def hook(resid, hook):
                store[layer] = resid[_ri, _rp].detach().float().cpu()
            return hook

        hooks = [(resid_pre(l) if l < L else resid_post(L - 1), grab(l)) for l in capture]
        with model.hooks(fwd_hooks=hooks):
            if ex_mat is None:
                model(ids, attention_mask=attn, return_type="logits")
            else:
                ee_model.prescribed_forward(ids, ex_mat.to(ids.device), attention_mask=attn)
        if ex_mat is not None:
            e_rows = ex_mat[ri, rp]
            stacked = torch.stack([store[l] for l in capture], 1)
            point = stacked[torch.arange(len(e_rows)), torch.tensor([capture.index(int(l)) for l in e_rows])]
            if L in store:  # the readout of an exited position reads its frozen state
                store[L] = torch.where((e_rows < L).unsqueeze(-1), point, store[L])
            exit_res.append(point)
            frames[-len(chunk):] = [f.assign(exit_layer=ex_mat[b_i, f["position"].tolist()].numpy())
                                    for b_i, f in enumerate(frames[-len(chunk):])]
        resids.append(torch.stack([store[l] for l in want], 1))
    df = pd.concat(frames, ignore_index=True)
    return ResidualSet(resid=torch.cat(resids), layers=want, df=df, n_layers=L,
                       exit_resid=torch.cat(exit_res) if exit_res else None)


# =============================================================================== linear probes


def _split(df: pd.DataFrame, y: np.ndarray, test_size: float, seed: int, split: str):
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    if split not in ("sequence", "token"):
        raise ValueError(f"split must be 'sequence' or 'token', got {split!r}")
    idx = np.arange(len(y))
    if split == "sequence" and "seq" in df and df["seq"].nunique() >= 4:
        gss = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        tr, te = next(gss.split(idx, y, groups=df["seq"].to_numpy()))
        return tr, te
    try:
        return train_test_split(idx, test_size=test_size, random_state=seed, stratify=y)
    except ValueError:  # a class too rare to stratify (or a continuous target)
        return train_test_split(idx, test_size=test_size, random_state=seed)


def _make_probe(kind: str, C: float, alpha: float):
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    if kind == "ridge":
        return make_pipeline(StandardScaler(), Ridge(alpha=alpha))
    raise ValueError(f"kind must be 'logistic' or 'ridge', got {kind!r}")


@dataclass
class ProbeResult:
    """A fitted linear probe and its test score against a shuffled-label baseline.

    Attributes:
        df: one row: ``layer``, ``target``, ``kind``, ``metric`` ("accuracy" or "r2"),
            ``score``, ``baseline`` (same probe trained on shuffled labels), ``chance``
            (majority-class accuracy on the test split, 0 for R^2), ``n_train``,
            ``n_test``, ``n_classes``.
        probe: the fitted scikit-learn pipeline (standardisation + linear model).
    """

    df: pd.DataFrame
    probe: object = None

    @property
    def score(self) -> float:
        return float(self.df["score"].iloc[0])

    @property
    def baseline(self) -> float:
        return float(self.df["baseline"].iloc[0])

    def figure(self):
        """Bars: probe score, shuffled-label baseline and chance."""
        import plotly.graph_objects as go

        r = self.df.iloc[0]
        fig = go.Figure(go.Bar(x=["probe", "shuffled labels", "chance"], y=[r["score"], r["baseline"], r["chance"]],
                               marker_color=["#1f77b4", "#999999", "#cccccc"]))
        fig.update_layout(title=f"{r['kind']} probe of {r['target']} at layer {r['layer']}",
                          yaxis_title=r["metric"], template="plotly_white")
        return fig


def fit_probe(residuals: ResidualSet, layer: int | str, target: str, *, kind: str = "logistic",
              test_size: float = 0.3, seed: int = 0, token_class: str | Sequence[str] | None = None,
              split: str = "sequence", C: float = 1.0, alpha: float = 1.0) -> ProbeResult:
    """Fit a linear probe of a df column from the residuals at one layer.

    Rows whose target is missing are dropped. The split keeps whole sequences on one
    side (``split="sequence"``, when there are at least 4 sequences) so a per-sequence
    variable cannot leak through sequence identity; ``split="token"`` splits tokens.
    The baseline is the same probe trained on a permutation of the training labels and
    scored on the true test labels (near chance when the probe cannot cheat).

    Args:
        residuals: a `ResidualSet`.
        layer: a captured layer, "final", or "exit".
        target: a column of ``residuals.df`` (e.g. "carry", "sum_digit", "answer_digit").
        kind: "logistic" (classification, accuracy) or "ridge" (regression, R^2).
        test_size: fraction held out.
        seed: seeds the split and the label shuffle.
        token_class: keep only tokens of this class (or classes).
        split: "sequence" or "token".
        C, alpha: regularisation of logistic regression / ridge.

    Returns:
        A `ProbeResult`.
    """
    df = residuals.df
    keep = df[target].notna().to_numpy().copy() if target in df else None
    if keep is None:
        raise KeyError(f"target {target!r} is not a column of the residual set; columns: {list(df.columns)}")
    if token_class is not None:
        classes = [token_class] if isinstance(token_class, str) else list(token_class)
        keep &= df["token_class"].isin(classes).to_numpy()
    sub = df[keep].reset_index(drop=True)
    x = residuals.acts(layer)[torch.from_numpy(np.flatnonzero(keep))].double().numpy()
    y_raw = sub[target]
    if kind == "logistic":
        y = y_raw.astype(str).to_numpy()
        n_classes = len(set(y))
        if n_classes < 2:
            raise ValueError(f"target {target!r} has {n_classes} distinct value(s) on the selected tokens; "
                             "a classifier needs at least 2")
    else:
        y = y_raw.astype(float).to_numpy()
        n_classes = 0
    if len(y) < 4:
        raise ValueError(f"only {len(y)} tokens have a {target!r} label; too few to probe")
    tr, te = _split(sub, y, test_size, seed, split)
    probe = _make_probe(kind, C, alpha)
    shuffled = _make_probe(kind, C, alpha)
    rng = np.random.default_rng(seed)
    y_shuf = y[tr][rng.permutation(len(tr))]
    if kind == "logistic" and len(set(y[tr])) < 2:
        raise ValueError(f"the training split of {target!r} has a single class; use more examples")
    probe.fit(x[tr], y[tr])
    shuffled.fit(x[tr], y_shuf)
    if kind == "logistic":
        score, base = float((probe.predict(x[te]) == y[te]).mean()), float((shuffled.predict(x[te]) == y[te]).mean())
        values, counts = np.unique(y[tr], return_counts=True)
        chance = float((y[te] == values[counts.argmax()]).mean())
        metric = "accuracy"
    else:
        from sklearn.metrics import r2_score

        score, base, chance, metric = (float(r2_score(y[te], probe.predict(x[te]))),
                                       float(r2_score(y[te], shuffled.predict(x[te]))), 0.0, "r2")
    row = {"layer": layer, "target": target, "kind": kind, "metric": metric, "score": score, "baseline": base,
           "chance": chance, "n_train": len(tr), "n_test": len(te), "n_classes": n_classes,
           "token_class": None if token_class is None else str(token_class)}
    return ProbeResult(df=pd.DataFrame([row]), probe=probe)


@dataclass
class ProbeSweep:
    """`fit_probe` at several layers: one row per layer (columns as `ProbeResult.df`)."""

    df: pd.DataFrame
    probes: dict = field(default_factory=dict)

    def figure(self):
        """Probe score vs layer, the shuffled-label baseline dashed, chance dotted."""
        import plotly.graph_objects as go

        d = self.df
        x = [str(l) for l in d["layer"]]
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=x, y=d["score"], mode="lines+markers", name="probe"))
        fig.add_trace(go.Scatter(x=x, y=d["baseline"], mode="lines+markers", name="shuffled labels",
                                 line=dict(dash="dash", color="grey")))
        if len(d) and d["metric"].iloc[0] == "accuracy":
            fig.add_trace(go.Scatter(x=x, y=d["chance"], mode="lines", name="chance",
                                     line=dict(dash="dot", color="lightgrey")))
        target = d["target"].iloc[0] if len(d) else ""
        fig.update_layout(title=f"Linear probe of {target} by layer", xaxis_title="layer",
                          yaxis_title=d["metric"].iloc[0] if len(d) else "", template="plotly_white")
        return fig


def probe_sweep(residuals: ResidualSet, target: str, layers: Sequence[int | str] | None = None,
                **kwargs) -> ProbeSweep:
    """`fit_probe` at each layer (default: every captured layer); kwargs go to `fit_probe`."""
    layers = list(residuals.layers) if layers is None else list(layers)
    results = {l: fit_probe(residuals, l, target, **kwargs) for l in layers}
    return ProbeSweep(df=pd.concat([r.df for r in results.values()], ignore_index=True),
                      probes={l: r.probe for l, r in results.items()})


# =============================================================================== skipped computation


def _final_norm_scale(ee_model, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
    """The final norm's divisor at `x`: RMS for RMSNorm, standard deviation for LayerNorm."""
    cfg = ee_model.model.cfg
    eps = float(getattr(cfg, "eps", 1e-5))
    if str(getattr(cfg, "normalization_type", "LN")).upper().startswith("RMS"):
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    xc = x - x.mean(-1, keepdim=True)
    return (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def linearised_final_norm(ee_model, x: Float[Tensor, "... d_model"],
                          final_resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
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
            return pd.DataFrame(columns=["token_class", "n", "kl", "top1_agree", "exit_layer", "skipped_norm",
                                         "skipped_dla"])
        g = self.df.groupby("token_class")
        return g.agg(n=("kl", "size"), kl=("kl", "mean"), top1_agree=("top1_agree", "mean"),
                     exit_layer=("exit_layer", "mean"), skipped_norm=("skipped_norm", "mean"),
                     skipped_dla=("skipped_dla", "mean")).reset_index()

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


def _text_pieces(tokenizer, ids: Sequence[int], is_eos: Sequence[bool]) -> list[str]:
    """Token strings of `ids`, EOS tokens as empty strings (they are not part of the text)."""
    text = iter(_pieces(tokenizer, [t for t, e in zip(ids, is_eos) if not e]))
    return ["" if e else next(text) for e in is_eos]


def _rollout_classes(rollout, i: int, task: str | None, example, tokenizer) -> pd.DataFrame:
    n = int(rollout.mask[i].sum())
    ids = rollout.tokens[i, :n].tolist()
    eos_id = tokenizer.eos_token_id
    is_eos = [eos_id is not None and t == eos_id for t in ids]
    ann = annotate_tokens(_text_pieces(tokenizer, ids, is_eos), task, example)
    ann["token"] = [tokenizer.decode([t]) for t in ids]
    ann.loc[is_eos, "token_class"] = "eos"
    return ann


@torch.no_grad()
def skipped_computation(ee_model, rollout, *, examples=None, task: str | None = None,
                        batch_size: int = 8) -> SkippedResult:
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
    L, model = ee_model.n_layers, ee_model.model
    device = ee_model.device
    P = rollout.prompt_tokens.shape[1]
    W_U = model.W_U.detach()
    tok_rows, block_rows = [], []
    for b0 in range(0, len(rollout), batch_size):
        sl = slice(b0, b0 + batch_size)
        seqs = rollout.sequences[sl].to(device)
        attn = rollout.attention_mask[sl].to(device)
        exits = rollout.exit_layers[sl].cpu()
        exited = (exits < L) & rollout.mask[sl].cpu()
        ri, ti = exited.nonzero(as_tuple=True)
        if len(ri) == 0:
            continue
        pos = P + ti - 1
        ri_d, pos_d = ri.to(device), pos.to(device)
        early = ee_model.prescribed_forward(seqs, rollout.prescribed_exit_layers()[sl].to(device), attn)
        early_lp = early.logprobs[ri_d, pos_d].float()
        store: dict[str, Tensor] = {}

        def grab(name):
            def hook(resid, hook):
                store[name] = resid[ri_d, pos_d].detach().float()
            return hook

        hooks = [(resid_pre(j), grab(f"pre{j}")) for j in range(L)] + [(resid_post(j), grab(f"post{j}")) for j in range(L)]
        with model.hooks(fwd_hooks=hooks):
            full_logits = model(seqs, attention_mask=attn, return_type="logits")
        full_lp = full_logits[ri_d, pos_d].float().log_softmax(-1)
        chosen = rollout.tokens[sl].to(device)[ri_d, ti.to(device)]
        kl = (full_lp.exp() * (full_lp - early_lp)).sum(-1).clamp(min=0)
        agree = full_lp.argmax(-1) == early_lp.argmax(-1)
        final = store[f"post{L - 1}"]
        w_col = W_U[:, chosen].T.float()  # [n, d]
        norms = torch.stack([(store[f"post{j}"] - store[f"pre{j}"]).norm(dim=-1) for j in range(L)], 1)
        dla = torch.stack([(linearised_final_norm(ee_model, store[f"post{j}"] - store[f"pre{j}"], final) * w_col).sum(-1)
                           for j in range(L)], 1)
        classes = {}
        for k in range(len(ri)):
            i = b0 + int(ri[k])
            if i not in classes:
                ex = examples[i] if examples is not None else None
                classes[i] = _rollout_classes(rollout, i, task or _task_of(rollout.prompts[i], ex), ex, model.tokenizer)
            t, l = int(ti[k]), int(exits[ri[k], ti[k]])
            ann = classes[i].iloc[t]
            skipped = range(l, L)
            tok_rows.append({"seq": i, "t": t, "position": int(pos[k]), "token": ann["token"],
                             "token_class": ann["token_class"], "exit_layer": l, "kl": float(kl[k]),
                             "top1_agree": bool(agree[k]),
                             "chosen_logprob_full": float(full_lp[k, chosen[k]]),
                             "chosen_logprob_early": float(early_lp[k, chosen[k]]),
                             "skipped_norm": float(norms[k, l:].sum()), "skipped_dla": float(dla[k, l:].sum())})
            block_rows += [{"seq": i, "t": t, "token_class": ann["token_class"], "exit_layer": l, "block": j,
                            "norm": float(norms[k, j]), "dla": float(dla[k, j])} for j in skipped]
    cols = ["seq", "t", "position", "token", "token_class", "exit_layer", "kl", "top1_agree", "chosen_logprob_full",
            "chosen_logprob_early", "skipped_norm", "skipped_dla"]
    bcols = ["seq", "t", "token_class", "exit_layer", "block", "norm", "dla"]
    return SkippedResult(df=pd.DataFrame(tok_rows, columns=cols), blocks=pd.DataFrame(block_rows, columns=bcols))


# =============================================================================== oracle exits and depth


def oracle_from_logprobs(final_logprobs: Float[Tensor, "*rows vocab"],
                         early_logprobs: Float[Tensor, "*rows n_exit vocab"],
                         layers: Sequence[int], n_layers: int) -> Int[Tensor, "*rows"]:
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
def _lens_rows(ee_model, examples, batch_size: int, base: bool):
    """Flattened continuation predictions: (df, final logprobs [n,V], early logprobs [n,m,V], next ids [n])."""
    import contextlib

    from eetools.calibration import encode_sequences

    pairs = _as_pairs(examples)
    model, L = ee_model.model, ee_model.n_layers
    tok = model.tokenizer
    eos_id = tok.eos_token_id
    frames, finals, earlies, nexts = [], [], [], []
    for b0 in range(0, len(pairs), batch_size):
        chunk = pairs[b0 : b0 + batch_size]
        ids, attn, predict = encode_sequences(ee_model, [p for p, _, _ in chunk], [c for _, c, _ in chunk])
        ri, pi = predict.nonzero(as_tuple=True)
        store: dict[int, Tensor] = {}

        def grab(layer):
            def hook(resid, hook):
                store[layer] = resid[ri, pi]
            return hook

        ctx = ee_model.adapters_disabled() if base else contextlib.nullcontext()
        with ctx, model.hooks(fwd_hooks=[(resid_pre(l), grab(l)) for l in ee_model.exit_layers]):
            logits = model(ids, attention_mask=attn, return_type="logits")
            early = torch.stack([ee_model.readout(store[l]) for l in ee_model.exit_layers], 1)
        finals.append(logits[ri, pi].float().log_softmax(-1).cpu())
        earlies.append(early.float().log_softmax(-1).cpu())
        nxt = ids[ri, pi + 1]
        nexts.append(nxt.cpu())
        for i, (prompt, cont, ex) in enumerate(chunk):
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
        return d.groupby("token_class").agg(n=("saved", "size"), oracle_layer=("oracle_layer", "mean"),
                                            layers_saved=("saved", "mean")).reset_index()

    def figure(self):
        """Stacked bars: fraction of predictions whose oracle exit is each layer, by token class."""
        import plotly.graph_objects as go

        layers = [*self.exit_layers, self.n_layers]
        fig = go.Figure()
        total = max(len(self.df), 1)
        for cls, g in self.df.groupby("token_class"):
            counts = g["oracle_layer"].value_counts()
            fig.add_trace(go.Bar(x=[str(l) for l in layers], y=[counts.get(l, 0) / total for l in layers], name=cls))
        fig.update_layout(barmode="stack", title=f"Oracle exit layers (layers saved {self.layers_saved:.3f})",
                          xaxis_title="oracle exit layer (L = no exit)", yaxis_title="fraction of tokens",
                          template="plotly_white")
        return fig


def oracle_exits(ee_model, examples, *, base: bool = False, batch_size: int = 16) -> OracleResult:
    """Oracle exits (DESIGN.md section 8) on teacher-forced prompt + reasoning.

    Runs the model with no exits (adapters as in `ee_model`, or off with ``base=True``)
    and, per prediction of a continuation token (and EOS), finds the earliest exitable
    layer whose logit-lens argmax equals the final argmax: an upper bound on exits that
    leave greedy output unchanged.

    Args:
        ee_model: an `EarlyExitModel`.
        examples: `Example`s or ``(prompt, continuation)`` pairs.
        base: use the base model (adapters off), the teacher of calibration.
        batch_size: sequences per forward pass.

    Returns:
        An `OracleResult`; ``.layers_saved`` is the mean ``1 - oracle/L``.
    """
    df, final, early, _ = _lens_rows(ee_model, examples, batch_size, base)
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
            ``final_nll`` (the same at full depth), ``n_tokens``.
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
            fig.add_trace(go.Scatter(x=d["layer"], y=d["final_nll"], mode="lines", name="full depth",
                                     line=dict(dash="dash", color="grey")), row=1, col=2)
        fig.update_yaxes(range=[0, 1.05], row=1, col=1)
        fig.update_xaxes(title_text="readout layer")
        fig.update_layout(title="Depth necessity", template="plotly_white")
        return fig


def depth_necessity(ee_model, examples, *, base: bool = False, batch_size: int = 16) -> DepthResult:
    """Agreement and loss when every continuation prediction is read out at one exitable layer.

    The model runs at full depth with no exits (adapters as in `ee_model`, or off with
    ``base=True``); at each exitable layer ``l`` the logit lens ``unembed(ln_final(resid_pre_l))``
    predicts every continuation token (and EOS). A curve of how much depth the task needs.

    Args:
        ee_model: an `EarlyExitModel`.
        examples: `Example`s or ``(prompt, continuation)`` pairs.
        base: use the base model (adapters off).
        batch_size: sequences per forward pass.

    Returns:
        A `DepthResult` with one row per exitable layer.
    """
    df, final, early, nxt = _lens_rows(ee_model, examples, batch_size, base)
    agree = early.argmax(-1) == final.argmax(-1).unsqueeze(-1)  # [n, m]
    nll = -early.gather(-1, nxt[:, None, None].expand(-1, early.shape[1], 1)).squeeze(-1)  # [n, m]
    final_nll = -final.gather(-1, nxt[:, None]).squeeze(-1)
    rows, crow = [], []
    for k, l in enumerate(ee_model.exit_layers):
        rows.append({"layer": l, "agreement": float(agree[:, k].float().mean()), "nll": float(nll[:, k].mean()),
                     "final_nll": float(final_nll.mean()), "n_tokens": len(df)})
        for cls in sorted(df["token_class"].unique()):
            m = torch.tensor((df["token_class"] == cls).to_numpy())
            crow.append({"layer": l, "token_class": cls, "agreement": float(agree[m, k].float().mean()),
                         "nll": float(nll[m, k].mean()), "final_nll": float(final_nll[m].mean()),
                         "n_tokens": int(m.sum())})
    return DepthResult(df=pd.DataFrame(rows), by_class=pd.DataFrame(crow))


# =============================================================================== hidden planning


def _sequence_label(df: pd.DataFrame, target: str, column: int) -> pd.Series:
    if target == "answer_digit":
        def digit(ans):
            s = str(ans) if ans is not None else ""
            if not s.isdigit():
                raise ValueError(f"answer {ans!r} is not a number; use target='answer' or 'believed_location' "
                                 "for non-numeric tasks")
            k = column if column >= 0 else len(s) + column
            return int(s[::-1][k]) if 0 <= k < len(s) else pd.NA
        return df["answer"].map(digit)
    if target not in df:
        raise KeyError(f"target {target!r} is not a column of the residual set; columns: {list(df.columns)}")
    return df[target]


@dataclass
class HiddenPlanningResult:
    """Decodability of the final answer before it is written, before vs after RL.

    Attributes:
        df: one row per (model, relative position, layer): ``model`` ("before"/"after"),
            ``rel_position`` (-1 = prompt's last token, 0.. = reasoning tokens),
            ``layer``, ``score`` (probe test accuracy), ``baseline`` (shuffled labels),
            ``chance``, ``n_train``, ``n_test``.
    """

    df: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        """Per (relative position, layer): accuracy before, after, and after - before."""
        p = self.df.pivot_table(index=["rel_position", "layer"], columns="model", values="score").reset_index()
        if {"before", "after"} <= set(p.columns):
            p["delta"] = p["after"] - p["before"]
        return p

    def figure(self):
        """Best-layer probe accuracy at each early position, before and after; baselines dashed."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, g in self.df.groupby("model", sort=False):
            best = g.groupby("rel_position").agg(score=("score", "max"), baseline=("baseline", "max")).reset_index()
            fig.add_trace(go.Scatter(x=best["rel_position"], y=best["score"], mode="lines+markers", name=name))
            fig.add_trace(go.Scatter(x=best["rel_position"], y=best["baseline"], mode="lines", name=f"{name} shuffled",
                                     line=dict(dash="dash")))
        fig.update_layout(title="Hidden planning: answer decodability before it is written (max over layers)",
                          xaxis_title="position (-1 = prompt's last token)", yaxis_title="probe accuracy",
                          template="plotly_white")
        return fig


def hidden_planning(ee_model_before, ee_model_after, examples, *, target: str = "answer_digit", column: int = 0,
                    n_positions: int = 4, layers: Sequence[int | str] | None = None, test_size: float = 0.3,
                    seed: int = 0, batch_size: int = 16) -> HiddenPlanningResult:
    """Probe the final answer at early positions, before vs after RL.

    For each model, residuals are collected (no exits, teacher-forced on the examples'
    reasoning) at the prompt's last token and the first ``n_positions - 1`` reasoning
    tokens; at each such relative position and each layer a logistic probe, trained on
    some sequences and tested on others, predicts a per-sequence label. Higher accuracy
    at positions where the answer has not been written yet means the answer is computed
    silently ("hidden planning"); RL for early exits should lower it. Use enough
    examples (hundreds) for the per-position probes to be meaningful.

    Args:
        ee_model_before, ee_model_after: the models to compare (e.g. calibrated vs RL-trained).
        examples: `Example`s (the same set is used for both models).
        target: "answer_digit" (the true answer's digit in `column`), or a df column that
            is constant within a sequence ("answer", "believed_location").
        column: which answer digit for "answer_digit": 0 = units (the first column
            computed in writing), -1 = the leading digit.
        n_positions: positions probed: the prompt's last token, then reasoning tokens.
        layers: layers to probe (default: exitable layers and the final residual).
        test_size, seed: the probe's split.
        batch_size: sequences per forward pass.

    Returns:
        A `HiddenPlanningResult`; ``.summary()`` pivots before/after and their difference.
    """
    if target == "answer_digit":  # fail before running any model
        _sequence_label(pd.DataFrame({"answer": [getattr(e, "answer", None) for e in examples]}), target, column)
    rows = []
    for name, ee in (("before", ee_model_before), ("after", ee_model_after)):
        rs = collect_residuals(ee, examples, layers=layers, prompt_last=True, batch_size=batch_size)
        label = _sequence_label(rs.df, target, column)
        rs.df["_label"] = label.astype(object).where(label.notna(), None)
        for rel in range(-1, n_positions - 1):
            sub = rs.subset((rs.df["rel_position"] == rel).to_numpy())
            if len(sub) < 4 or sub.df["_label"].dropna().astype(str).nunique() < 2:
                continue
            for l in sub.layers:
                try:
                    r = fit_probe(sub, l, "_label", kind="logistic", test_size=test_size, seed=seed,
                                  split="token").df.iloc[0]
                except ValueError:  # too few tokens or a single class in the training split
                    continue
                rows.append({"model": name, "rel_position": rel, "layer": l, "score": r["score"],
                             "baseline": r["baseline"], "chance": r["chance"], "n_train": r["n_train"],
                             "n_test": r["n_test"], "target": target})
    return HiddenPlanningResult(df=pd.DataFrame(rows, columns=["model", "rel_position", "layer", "score", "baseline",
                                                               "chance", "n_train", "n_test", "target"]))
