# %% [markdown]
# # Probes: what is in the residual stream where a token exits, and what did the exit skip?
#
# The questions of an interpretability researcher: what is linearly decodable at the exit point, what the
# skipped blocks would have added, how deep each token really needs to go, and whether early-exit RL pushes
# reasoning into the written tokens (less *hidden planning*).

# %%
import torch

import eetools as ee

torch.manual_seed(0)
torch.set_num_threads(2)
ee.views.setup_notebook()  # figures as JSON (JupyterLab) + offline HTML (exported HTML, nbviewer)

# %%
from eetools.analysis import probes

calibrated = ee.load_exit_model("tiny-reasoner/calibrated")
rl = ee.load_exit_model("tiny-reasoner/rl")
examples = ee.tasks.get("addition").test_split()[:60]

# %% [markdown]
# ## Residuals at every exitable layer, with token classes and task variables

# %%
res = probes.collect_residuals(calibrated, examples)
res.df[["token", "token_class", "carry", "sum_digit"]].head(12)

# %% [markdown]
# ## Linear probes with a shuffled-label baseline
# Is the carry out of the current column linearly decodable from the residual stream entering each layer, at the tokens where the column sum is written?

# %%
# NBVAL_IGNORE_OUTPUT
sweep = probes.probe_sweep(res, "carry", token_class="computed_digit")
sweep.df

# %%
sweep.figure()

# %% [markdown]
# ## What the exits skipped
# For every exited token: KL between the full-depth and the early readout, top-1 agreement, and each skipped block's contribution to the chosen token (direct logit attribution), by token class.

# %%
rollout = calibrated.generate([e.prompt for e in examples[:16]], 80, temperature=0, seed=0)
skipped = probes.skipped_computation(calibrated, rollout, examples=examples[:16])
skipped.summary()

# %%
skipped.figure()

# %% [markdown]
# ## Oracle exits and depth necessity
# The earliest layer whose logit lens already gives the final argmax (an upper bound on safe exits), and accuracy/loss when every token is read out at layer *l*:

# %%
oracle = probes.oracle_exits(calibrated, examples[:30], base=True)
print(f"oracle layers saved: {oracle.layers_saved:.2f}")
oracle.figure()

# %%
depth = probes.depth_necessity(calibrated, examples[:30], base=True)
depth.figure()

# %% [markdown]
# ## A tuned readout: the bound is the readout's
# The oracle above reads every layer through the logit lens. A tuned lens (Belrose et al. 2023) learns one
# affine translator per exitable layer, `h + A h + b`, so that its readout matches the final distribution
# (KL from the final layer, the model frozen; zero-initialised, so it starts as the logit lens). Tuned here on
# training examples of the base model (adapters off), it raises the per-layer agreement and the oracle bound on
# the same held-out tokens. `readout=` takes it in the oracle, depth necessity, `lens_topk` and the lens grid.

# %%
# NBVAL_IGNORE_OUTPUT
train = ee.tasks.get("addition").sample(400, seed=1)
with calibrated.adapters_disabled():
    tuned = ee.train.tune_readout(calibrated, train, steps=60, batch_size=16, attach=False, progress=False).readout
tuned_oracle = probes.oracle_exits(calibrated, examples[:30], base=True, readout=tuned)
print(f"oracle layers saved: logit lens {oracle.layers_saved:.2f}, tuned readout {tuned_oracle.layers_saved:.2f}")
tuned_depth = probes.depth_necessity(calibrated, examples[:30], base=True, readout=tuned)
depth.df[["layer", "agreement", "kl"]].merge(
    tuned_depth.df[["layer", "agreement", "kl"]], on="layer", suffixes=(" logit", " tuned")
)

# %%
# The same generated answer in the lens grid, each layer read out through the logit lens and the tuned readout
grids = [
    ee.views.lens_grid(calibrated, rollout, 0, exits=False, name="logit lens"),
    ee.views.lens_grid(calibrated, rollout, 0, exits=False, name="tuned readout", readout=tuned),
]
ee.views.compare_lens_grids(grids, max_tokens=40)

# %% [markdown]
# ## Hidden planning before vs after RL
# How well is the final answer's units digit decodable at the prompt's last token and the first reasoning tokens, before anything is written? Lower after RL would mean less planning hidden in the layers.

# %%
# NBVAL_IGNORE_OUTPUT
plan = probes.hidden_planning(calibrated, rl, ee.tasks.get("addition").test_split()[:120])
plan.summary()

# %%
plan.figure()
