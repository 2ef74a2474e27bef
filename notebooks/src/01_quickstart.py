# %% [markdown]
# # Quickstart: where does a model stop thinking?
#
# eetools attaches **exit heads** to a TransformerLens model as hooks. At each exitable layer a head
# decides whether the current token can stop; an exited token's residual stream is frozen and read out
# through the unembedding (the logit lens, with the final norm). This notebook loads the shipped tiny
# reasoner, samples with exits, and colours every token by the layer it exited at.
#
# ```
#  token t ──► block 0 ► block 1 ► … ► block l ─┬─► blocks l..L-1 skipped (residual frozen)
#                                   exit head l ─┘        ln_final ► unembed ► next token
# ```

# %%
import torch

import eetools as ee

torch.manual_seed(0)
torch.set_num_threads(2)
ee.views.setup_notebook()  # figures as JSON (JupyterLab) + offline HTML (exported HTML, nbviewer)

# %% [markdown]
# The default model is the **tiny reasoner** shipped in `data/models/tiny-reasoner`: an 8-block Qwen3 trained by `eetools pretrain` on two reasoning tasks, loaded offline as a `TransformerBridge`.

# %%
model = ee.load_model()
print(type(model).__name__, model.cfg.n_layers, "blocks, d_model", model.cfg.d_model)

# %%
# NBVAL_CHECK_OUTPUT
task = ee.tasks.get("addition")
example = task.sample(1, seed=0)[0]
print(example.prompt + example.reasoning)

# %% [markdown]
# The base model writes the column-by-column reasoning itself:

# %%
# NBVAL_CHECK_OUTPUT
print(model.generate(example.prompt, max_new_tokens=60, do_sample=False, verbose=False))

# %% [markdown]
# Fresh exit heads start with a negative bias, so an uncalibrated model almost never exits and behaves like the base model:

# %%
fresh = ee.attach_exit_heads(model)
r = fresh.generate(example.prompt, 60, temperature=0, seed=0)
print(fresh, "compute:", round(float(r.compute[0]), 3))

# %% [markdown]
# The shipped **calibrated** heads (self-distillation, notebook 2) exit whenever the early readout already agrees with the final layer. Greedy tokens, sampled exits:

# %%
calibrated = ee.load_exit_model("tiny-reasoner/calibrated")
r = calibrated.generate(example.prompt, 80, temperature=0, seed=0)
print(r.text[0])
print(
    "score",
    task.score(example, ee.tasks.cut_at_answer(r.text[0])),
    "| layers saved",
    round(float(r.layers_saved[0]), 2),
)

# %% [markdown]
# Hover a token (or focus it with Tab) for its exit layer, the heads' probability of that exit and the logit lens's top 5 at
# that layer: what the token was predicted from.

# %%
ee.views.color_tokens(r, title="calibrated", readouts=ee.views.exit_readouts(calibrated, r))

# %% [markdown]
# The same rollout as a heatmap: the heads' conditional exit probability at every exitable layer, with the chosen exit marked.

# %%
ee.views.exit_heatmap(r)

# %% [markdown]
# ## The logit lens, layer by layer
# Each layer read out through the final norm and unembedding: one column per generated token, one row per layer, each cell
# the lens's top-1 token coloured by its probability (top 5 on hover). The rollout is replayed with its own exits, so a
# red square marks where each token exited and the cells above it are blank: its residual was frozen there. Below, the
# same prompt under the RL model (`tiny-reasoner/rl-lam6`), which stops earlier. `ee.views.lens_grid_text(model, text)`
# draws the same grid for any teacher-forced text.

# %%
rl = ee.load_exit_model("tiny-reasoner/rl-lam6")
r_rl = rl.generate(example.prompt, 80, temperature=0, seed=0)
grids = [ee.views.lens_grid(calibrated, r, name="calibrated"), ee.views.lens_grid(rl, r_rl, name="rl-lam6")]
ee.views.compare_lens_grids(grids, max_tokens=40)

# %% [markdown]
# The two models' exits token by token (the difference is rl-lam6's exit layer minus the calibrated one's):

# %%
ee.views.exit_diff(r, r_rl, names=("calibrated", "rl-lam6"))

# %% [markdown]
# Several prompts of both tasks at once (batched, KV-cached generation):

# %%
prompts = [e.prompt for e in task.sample(3, seed=1)] + [e.prompt for e in ee.tasks.get("tom").sample(2, seed=1)]
rs = calibrated.generate(prompts, 160, temperature=0, seed=0)
ee.views.color_tokens_many(rs)

# %% [markdown]
# Exits can also **save time**. By default (`skip="mask"`, the exact reference) every block still runs on an exited
# token and the hooks discard the result; with `skip="compute"` an exited token only computes its keys and values in the
# blocks it skips (later tokens attend to them): its query, attention output and MLP are not run, and LoRA adapters are
# merged for the call. The result is the same up to float rounding:

# %%
# NBVAL_CHECK_OUTPUT
fast = calibrated.generate(prompts, 160, temperature=0, seed=0, skip="compute")
print(
    "same tokens:", torch.equal(fast.tokens, rs.tokens), "| same exits:", torch.equal(fast.exit_layers, rs.exit_layers)
)
print("max log-prob difference < 1e-4:", bool((fast.token_logprobs - rs.token_logprobs).abs().max() < 1e-4))

# %% [markdown]
# ## The explorer
# `ee.views.explore(model)` opens an ipywidgets UI (pick a prompt, mode, temperature, threshold, seed; click a token for
# its details); `ee.views.explore({"calibrated": calibrated, "rl": rl})` compares two models on the same prompts. Here its
# static form, which also works without a widget frontend:

# %%
explorer = ee.views.explore(calibrated, static=True, max_new_tokens=80)
explorer

# %%
d = explorer.details(5)
print("token", repr(d.token), "exited at layer", d.exit_layer, "| full depth would say", d.full_depth[0])
d.figure()
