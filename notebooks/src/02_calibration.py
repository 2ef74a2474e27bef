# %% [markdown]
# # Calibration: teaching the heads when a token can stop
#
# Self-distillation (docs/method.md section 6): the teacher's final distribution `q_t` and its logit lens `p_{l,t}`
# give `c*_{l,t} = 2 - 2 sigmoid(k KL(q_t || p_{l,t}))`, stick-broken into a target distribution over exits.
# The student (LoRA adapters on) is trained on exits sampled from it.

# %%
import torch

import eetools as ee

torch.manual_seed(0)
torch.set_num_threads(2)
ee.views.setup_notebook()  # figures as JSON (JupyterLab) + offline HTML (exported HTML, nbviewer)

# %%
model = ee.load_model()
ee_model = ee.attach_exit_heads(model)
task = ee.tasks.get("addition")
example = task.test_split()[0]
from eetools.train.calibration import encode_sequences, exit_targets

ids, attn, predict = encode_sequences(ee_model, [example.prompt], [example.reasoning])
teacher = ee_model.teacher_forward(ids, attn)
targets = exit_targets(teacher.logprobs, teacher.early_logprobs, kl_factor=64.0)[0]
print(targets.shape)

# %% [markdown]
# The target exit distribution for every token of one worked sum (rows: exit outcomes; columns: the token each position predicts):

# %%
import plotly.graph_objects as go

from eetools.views.tokens import visible

pos = predict[0].nonzero().squeeze(-1)
labels = [
    f"{i}:{visible(model.tokenizer.decode([int(ids[0, p + 1])]), newline='')}" for i, p in enumerate(pos.tolist())
]
go.Figure(
    go.Heatmap(
        z=targets[pos].T.numpy(), x=labels, y=[str(l) for l in ee_model.exit_layers] + ["none"], colorscale="Blues"
    )
).update_layout(title="Target exit distribution (k=64)", yaxis_title="exit layer", height=320)

# %% [markdown]
# Copied digits and format characters can exit at layer 1-3; the digit of each column sum needs depth. A short live calibration (the shipped heads used the same code with more steps):

# %%
# NBVAL_IGNORE_OUTPUT
res = ee.calibrate(ee_model, "addition", kl_factor=64.0, steps=20, batch_size=8, seed=0)
res.history[["step", "loss", "kl", "exit_nll", "student_compute", "target_compute"]].tail(3)

# %%
ee.views.calibration_figure(res)

# %% [markdown]
# ## Fig. 4: learned vs target exit distribution
# On held-out examples, with the shipped calibrated heads:

# %%
calibrated = ee.load_exit_model("tiny-reasoner/calibrated")
fig4 = ee.analysis.exit_distribution_vs_target(calibrated, "addition", n=64)
print(f"total variation: {fig4.tv:.3f}")
fig4.figure()

# %% [markdown]
# ## Fig. 3: coherence across KL factors
# A larger `k` makes exits rarer and keeps the text closer to the base model. The sweep (`eetools reproduce`) calibrates one student per `k`; its results ship in `data/results/`:

# %%
import pandas as pd

from eetools.analysis.evaluation import CoherenceByKL

fig3 = CoherenceByKL(pd.read_csv(ee.io.data_dir() / "results" / "fig3.csv"))
fig3.summary()

# %%
fig3.figure()
