"""Build the tutorial notebooks from the cell sources below, then execute them in place.

    python notebooks/build.py            # write + execute every notebook
    python notebooks/build.py --no-exec  # write only

Notebooks are committed executed, so nbval (``--nbval-lax``) re-runs them top to bottom
and compares the cells marked ``# NBVAL_CHECK_OUTPUT``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).parent

SETUP = """import torch, plotly.io as pio
import eetools as ee
torch.manual_seed(0)
torch.set_num_threads(2)
pio.renderers.default = "plotly_mimetype"  # figures as JSON: JupyterLab renders them, no network"""

NOTEBOOKS = {
"01_quickstart.ipynb": [
("md", """# Quickstart: where does a model stop thinking?

eetools attaches **exit heads** to a TransformerLens model as hooks. At each exitable layer a head
decides whether the current token can stop; an exited token's residual stream is frozen and read out
through the unembedding (the logit lens, with the final norm). This notebook loads the shipped tiny
reasoner, samples with exits, and colours every token by the layer it exited at.

```
 token t ──► block 0 ► block 1 ► … ► block l ─┬─► blocks l..L-1 skipped (residual frozen)
                                  exit head l ─┘        ln_final ► unembed ► next token
```"""),
("code", SETUP),
("md", "The default model is the **tiny reasoner** shipped in `data/models/tiny-reasoner`: an 8-block Qwen3 trained by `eetools pretrain` on two reasoning tasks, loaded offline as a `TransformerBridge`."),
("code", """model = ee.load_model()
print(type(model).__name__, model.cfg.n_layers, "blocks, d_model", model.cfg.d_model)"""),
("code", """# NBVAL_CHECK_OUTPUT
task = ee.tasks.get("addition")
example = task.sample(1, seed=0)[0]
print(example.prompt + example.reasoning)"""),
("md", "The base model writes the column-by-column reasoning itself:"),
("code", """# NBVAL_CHECK_OUTPUT
print(model.generate(example.prompt, max_new_tokens=60, do_sample=False, verbose=False))"""),
("md", "Fresh exit heads start with a negative bias, so an uncalibrated model almost never exits and behaves like the base model:"),
("code", """fresh = ee.attach_exit_heads(model)
r = fresh.generate(example.prompt, 60, temperature=0, seed=0)
print(fresh, "compute:", round(float(r.compute[0]), 3))"""),
("md", "The shipped **calibrated** heads (self-distillation, notebook 2) exit whenever the early readout already agrees with the final layer. Greedy tokens, sampled exits:"),
("code", """calibrated = ee.load_exit_model("tiny-reasoner/calibrated")
r = calibrated.generate(example.prompt, 80, temperature=0, seed=0)
print(r.text[0])
print("score", task.score(example, ee.tasks.cut_at_answer(r.text[0])), "| layers saved", round(float(r.layers_saved[0]), 2))"""),
("code", "ee.views.color_tokens(r)"),
("md", "The same rollout as a heatmap: the heads' conditional exit probability at every exitable layer, with the chosen exit marked."),
("code", "ee.views.exit_heatmap(r)"),
("md", "Several prompts of both tasks at once (batched, KV-cached generation):"),
("code", """prompts = [e.prompt for e in task.sample(3, seed=1)] + [e.prompt for e in ee.tasks.get("tom").sample(2, seed=1)]
rs = calibrated.generate(prompts, 160, temperature=0, seed=0)
ee.views.color_tokens_many(rs)"""),
("md", """Exits can also **save time**. By default (`skip="mask"`, the exact reference) every block still runs on an exited
token and the hooks discard the result; with `skip="compute"` an exited token only computes its keys and values in the
blocks it skips (later tokens attend to them): its query, attention output and MLP are not run, and LoRA adapters are
merged for the call. The result is the same up to float rounding:"""),
("code", """# NBVAL_CHECK_OUTPUT
fast = calibrated.generate(prompts, 160, temperature=0, seed=0, skip="compute")
print("same tokens:", torch.equal(fast.tokens, rs.tokens), "| same exits:", torch.equal(fast.exit_layers, rs.exit_layers))
print("max log-prob difference < 1e-4:", bool((fast.token_logprobs - rs.token_logprobs).abs().max() < 1e-4))"""),
("md", "## The explorer\n`ee.views.explore(model)` opens an ipywidgets UI (pick a prompt, mode, temperature, threshold, seed; click through tokens). Here its static form, which also works without a widget frontend:"),
("code", """explorer = ee.views.explore(calibrated, static=True, max_new_tokens=80)
explorer"""),
("code", """d = explorer.details(5)
print("token", repr(d.token), "exited at layer", d.exit_layer, "| full depth would say", d.full_depth[0])
d.figure()"""),
],
"02_calibration.ipynb": [
("md", """# Calibration: teaching the heads when a token can stop

Self-distillation (DESIGN.md section 6): the teacher's final distribution `q_t` and its logit lens `p_{l,t}`
give `c*_{l,t} = 2 - 2 sigmoid(k KL(q_t || p_{l,t}))`, stick-broken into a target distribution over exits.
The student (LoRA adapters on) is trained on exits sampled from it."""),
("code", SETUP),
("code", """model = ee.load_model()
ee_model = ee.attach_exit_heads(model)
task = ee.tasks.get("addition")
example = task.test_split()[0]
from eetools.core.encoding import encode_sequences
from eetools.train.calibration import exit_targets
ids, attn, predict = encode_sequences(ee_model, [example.prompt], [example.reasoning])
teacher = ee_model.teacher_forward(ids, attn)
targets = exit_targets(teacher.logprobs, teacher.early_logprobs, kl_factor=64.0)[0]
print(targets.shape)"""),
("md", "The target exit distribution for every token of one worked sum (rows: exit outcomes; columns: the token each position predicts):"),
("code", """import plotly.graph_objects as go
from eetools.views.tokens import visible
pos = predict[0].nonzero().squeeze(-1)
labels = [f"{i}:{visible(model.tokenizer.decode([int(ids[0, p + 1])]), newline='')}" for i, p in enumerate(pos.tolist())]
go.Figure(go.Heatmap(z=targets[pos].T.numpy(), x=labels, y=[str(l) for l in ee_model.exit_layers] + ["none"],
                     colorscale="Blues")).update_layout(title="Target exit distribution (k=64)", yaxis_title="exit layer", height=320)"""),
("md", "Copied digits and format characters can exit at layer 1-3; the digit of each column sum needs depth. A short live calibration (the shipped heads used the same code with more steps):"),
("code", """# NBVAL_IGNORE_OUTPUT
res = ee.calibrate(ee_model, "addition", kl_factor=64.0, steps=20, batch_size=8, seed=0)
res.history[["step", "loss", "kl", "exit_nll", "student_compute", "target_compute"]].tail(3)"""),
("code", "ee.views.calibration_figure(res)"),
("md", "## Fig. 4: learned vs target exit distribution\nOn held-out examples, with the shipped calibrated heads:"),
("code", """calibrated = ee.load_exit_model("tiny-reasoner/calibrated")
fig4 = ee.analysis.exit_distribution_vs_target(calibrated, "addition", n=64)
print(f"total variation: {fig4.tv:.3f}")
fig4.figure()"""),
("md", "## Fig. 3: coherence across KL factors\nA larger `k` makes exits rarer and keeps the text closer to the base model. The sweep (`eetools reproduce`) calibrates one student per `k`; its results ship in `data/results/`:"),
("code", """import pandas as pd
from eetools.analysis.evaluation import CoherenceByKL
fig3 = CoherenceByKL(pd.read_csv(ee.io.data_dir() / "results" / "fig3.csv"))
fig3.summary()"""),
("code", "fig3.figure()"),
],
"03_rl.ipynb": [
("md", """# RL: rewarding early exits (RLOO)

Each prompt gets `k` rollouts with sampled exits; reward `task - beta*KL - lam*exitcost`;
leave-one-out advantages; the policy gradient covers both the sampled tokens and the sampled exits."""),
("code", SETUP),
("code", """# NBVAL_IGNORE_OUTPUT
calibrated = ee.load_exit_model("tiny-reasoner/calibrated")
res = ee.train_rl(calibrated, "addition", lam=1.5, beta=0.25, k=4, prompts_per_step=2, steps=3,
                  max_new_tokens=70, eval_every=0, seed=0)
res.history[["step", "reward", "task", "kl", "exitcost", "accuracy", "compute", "adv_std"]]"""),
("md", "## Fig. 2 (left): RL dynamics over seeds\nThe shipped histories of the runs behind the shipped RL model (`eetools reproduce`): each run light, the mean bold with ±1 SE, the base model dashed."),
("code", """import pandas as pd, json
results = ee.io.data_dir() / "results"
history = pd.read_csv(results / "rl_history.csv")
table = pd.read_csv(results / "evaluation.csv")
base = table[(table.system == "base") & (table.task == "addition")].iloc[0]
ee.views.rl_dynamics_figure(history, base={"accuracy": base.accuracy, "compute": 1.0, "coherence": base.coherence_reasoning})"""),
("code", "table"),
("md", """### Slower adapters
RL trains the LoRA adapters with the heads. At the heads' learning rate they also fit the text to a model
that exits: the shipped `tiny-reasoner/rl` scores 97 % on ToM with its exits but 90 % at full depth (base
99 %). With the adapters at a quarter of that rate (`train_rl(..., lr=2.5e-4, head_lr=1e-3)`) every seed
stays within a point of the base model on both tasks, with or without exits, saving 29-34 % of layers on
addition at `t = 0.5` (README, "Slower adapters"). The shipped preset `tiny-reasoner/rl-slow-adapters` is its
seed 0; here are the dynamics of its three seeds:"""),
("code", """slow = pd.read_csv(results / "rl_slow_adapters_history.csv")
ee.views.rl_dynamics_figure(slow, base={"accuracy": base.accuracy, "compute": 1.0, "coherence": base.coherence_reasoning})"""),
("md", "## Fig. 2 (right): the same prompt before and after RL"),
("code", """rl = ee.load_exit_model("tiny-reasoner/rl")
prompt = ee.tasks.get("addition").test_split()[3].prompt
before = calibrated.generate(prompt, 80, temperature=0, seed=0)
after = rl.generate(prompt, 80, temperature=0, seed=0)
ee.views.color_tokens(before, title="calibrated")"""),
("code", "ee.views.color_tokens(after, title=\"after RL\")"),
("md", """## Evaluation against the base model and the oracle bound
Besides the base model (adapters off, no exits) and the oracle bound, a model with LoRA adapters gets a
`no_exit` row: its own weights at full depth. What the adapters cost on their own shows there, so it is
not blamed on the exits."""),
("code", """# NBVAL_IGNORE_OUTPUT
ev = ee.evaluate(rl, "addition", n=40, seed=0)
ev.summary"""),
("code", "ev.figure()"),
("md", """## Operating points: accuracy against layers saved
Thresholded exits (a token exits at the first layer whose head gives `c >= t`) trade accuracy for depth
as `t` falls. `ee.tradeoff` evaluates several thresholds on the same held-out prompts, next to sampled
exits, the base model, the model without exits (`no_exit`) and the oracle bound (the most any exit policy
could save with the base model's text).

`confidence=[...]` adds the baseline the learned heads have to beat: the same weights with no heads, a
token exiting at the first layer where the logit lens's top probability reaches `t` (`head="confidence"`).
Early readouts are confident long before they are right, so its useful thresholds sit close to 1.
On the command line: `eetools tradeoff --exit-model tiny-reasoner/rl --n 200 --confidence 0.9999 0.999`."""),
("code", """# NBVAL_IGNORE_OUTPUT
points = ee.tradeoff(rl, "addition", thresholds=[0.7, 0.5, 0.3, 0.15], n=40, seed=0, confidence=[0.9999, 0.999])
points.df"""),
("code", "points.figure()"),
("md", """### Choosing a threshold without looking at the test split
The best point of a curve measured on the test split flatters that point. Choose the threshold on
`Task.validation_split` (fresh problems from the task's generator, none of them in the test split), then
report the test split at it. On the command line: `eetools tradeoff --split validation --max-drop 0.01`."""),
("code", """# NBVAL_IGNORE_OUTPUT
val = ee.tradeoff(rl, "addition", thresholds=[0.7, 0.5, 0.3, 0.15], n=40, seed=0, sample=False, split="validation")
t = val.best_threshold(max_drop=0.01)  # the most layers saved within 1 point of the base model
test = ee.evaluate(rl, "addition", n=40, mode="threshold", threshold=t, seed=0, compare=False).summary
print(f"chosen on validation: t = {t}; on the test split: accuracy {test.accuracy[0]:.1%}, "
      f"{test.layers_saved[0]:.1%} of layers saved")"""),
],
"04_probes.ipynb": [
("md", """# Probes: what is in the residual stream where a token exits, and what did the exit skip?

The questions of an interpretability researcher: what is linearly decodable at the exit point, what the
skipped blocks would have added, how deep each token really needs to go, and whether early-exit RL pushes
reasoning into the written tokens (less *hidden planning*)."""),
("code", SETUP),
("code", """from eetools.analysis import probes
calibrated = ee.load_exit_model("tiny-reasoner/calibrated")
rl = ee.load_exit_model("tiny-reasoner/rl")
examples = ee.tasks.get("addition").test_split()[:60]"""),
("md", "## Residuals at every exitable layer, with token classes and task variables"),
("code", """res = probes.collect_residuals(calibrated, examples)
res.df[["token", "token_class", "carry", "sum_digit"]].head(12)"""),
("md", "## Linear probes with a shuffled-label baseline\nIs the carry out of the current column linearly decodable from the residual stream entering each layer, at the tokens where the column sum is written?"),
("code", """# NBVAL_IGNORE_OUTPUT
sweep = probes.probe_sweep(res, "carry", token_class="computed_digit")
sweep.df"""),
("code", "sweep.figure()"),
("md", "## What the exits skipped\nFor every exited token: KL between the full-depth and the early readout, top-1 agreement, and each skipped block's contribution to the chosen token (direct logit attribution), by token class."),
("code", """rollout = calibrated.generate([e.prompt for e in examples[:16]], 80, temperature=0, seed=0)
skipped = probes.skipped_computation(calibrated, rollout, examples=examples[:16])
skipped.summary()"""),
("code", "skipped.figure()"),
("md", "## Oracle exits and depth necessity\nThe earliest layer whose logit lens already gives the final argmax (an upper bound on safe exits), and accuracy/loss when every token is read out at layer *l*:"),
("code", """oracle = probes.oracle_exits(calibrated, examples[:30], base=True)
print(f"oracle layers saved: {oracle.layers_saved:.2f}")
oracle.figure()"""),
("code", """depth = probes.depth_necessity(calibrated, examples[:30], base=True)
depth.figure()"""),
("md", "## Hidden planning before vs after RL\nHow well is the final answer's units digit decodable at the prompt's last token and the first reasoning tokens, before anything is written? Lower after RL would mean less planning hidden in the layers."),
("code", """# NBVAL_IGNORE_OUTPUT
plan = probes.hidden_planning(calibrated, rl, ee.tasks.get("addition").test_split()[:120])
plan.summary()"""),
("code", "plan.figure()"),
],
"05_bring_your_own_model.ipynb": [
("md", """# Bring your own model

Everything works on any TransformerLens bridge. With weights on disk or in the HF cache a user writes

```python
model = ee.load_model("Qwen/Qwen3-1.7B")          # or "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", or a folder
ee_model = ee.attach_exit_heads(model)             # about 8 evenly spaced exitable layers by default
```

This machine has no network, so here we build a small random Qwen3 offline, save it in HF format, and run
the same pipeline on it."""),
("code", SETUP),
("code", """import tempfile
from transformers import Qwen3Config, Qwen3ForCausalLM
from eetools.io.tokenizer import build_tokenizer
folder = tempfile.mkdtemp()
tok = build_tokenizer()
cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
Qwen3ForCausalLM(cfg).save_pretrained(folder); tok.save_pretrained(folder)
model = ee.load_model(folder)
ee_model = ee.attach_exit_heads(model, layers=[2, 4])
ee_model"""),
("code", """# NBVAL_IGNORE_OUTPUT
res = ee.calibrate(ee_model, "addition", steps=5, batch_size=4, seed=0)
r = ee_model.generate("Q: 12+34\\n", 20, seed=0)
ee.views.color_tokens(r)"""),
("md", "Exit heads save with a fingerprint of their base model; loading them into another model is refused with an error that names both:"),
("code", """ee.save_exit_model(ee_model, folder + "/exits")
try:
    ee.load_exit_model(folder + "/exits", model=ee.load_model())
except Exception as e:
    print(type(e).__name__, str(e)[:160])"""),
],
}


def build(execute: bool = True, only: list[str] | None = None) -> None:
    for name, cells in NOTEBOOKS.items():
        if only and name not in only:
            continue
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                    for kind, src in cells]
        path = HERE / name
        nbformat.write(nb, path)
        if execute:
            subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                            "--ExecutePreprocessor.timeout=600", str(path)], check=True)
        print("built", path)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    build(execute="--no-exec" not in sys.argv, only=args or None)
