# %% [markdown]
# # Externalisation, measured: does early-exit RL move reasoning from the layers into the tokens?
#
# The method's premise is that a model rewarded for exiting early must write its reasoning down instead of
# computing it silently. To test it the model needs a choice: the **steps** task is addition whose column
# lines are optional (written in full, in part, or the answer alone), and the verifier reads only the answer.
# We use its small regime, ``steps-small`` (1-2 digit operands), where the model's silent answers are as
# accurate as its written ones, so task reward alone does not favour writing.
# We start from the shipped mixed-style tiny reasoner (calibrated), run RL under three conditions -- task
# reward only (lam 0), early-exit RL with the paper's mean exit cost, and early-exit RL with the *total*
# compute of the answer as its cost -- and measure verbosity and hidden computation.

# %%
import torch

import eetools as ee
from eetools.analysis import externalisation as X
from eetools.analysis.externalisation_run import ExternalisationConfig, load_externalisation, run_externalisation
from eetools.io.paths import data_dir

torch.manual_seed(0)
torch.set_num_threads(1)
ee.views.setup_notebook()  # figures as JSON (JupyterLab) + offline HTML (exported HTML, nbviewer)

# %% [markdown]
# ## The task: three styles, one verifier

# %%
task = ee.tasks.get("steps-small")
for style in ("full", "partial", "terse"):
    ex = task.make(47, 38, style, written=1)
    print(
        f"{style:8s} {ex.reasoning!r}  score {task.score(ex, ex.reasoning)}  verbosity {task.verbosity(ex, ex.reasoning):.2f}"
    )
X.StepsTask.intermediates(ex)

# %% [markdown]
# ## The mixed-style model: which style does it choose, and is the terse style as accurate?
# Accuracy per style on the same held-out sums, the style forced by the completion's first characters
# (`"A: "` for terse, the first column digit for written); "free" is the model's own choice.

# %%
# NBVAL_IGNORE_OUTPUT
mixed = ee.load_exit_model("tiny-reasoner-mixed/calibrated")
X.style_accuracy(mixed, task, n=40)

# %% [markdown]
# ## A short live run
# `--quick` (2 RL steps per run, small measures), here one seed per condition: a smoke test; the measured
# answer is the shipped run below. `eetools externalisation --out DIR` without `--quick` is the full experiment.

# %%
# NBVAL_IGNORE_OUTPUT
import tempfile

live = run_externalisation(ExternalisationConfig(quick=True, seeds=[0]), tempfile.mkdtemp(), progress=False)
live.summary(["accuracy", "verbosity", "probe_carry", "answer_oracle_layer"])

# %% [markdown]
# ## The shipped experiment
# `eetools externalisation --task steps-small --seeds 0 1 2 3 4 --steps 32 --measure-every 8 --out runs/ext`
# (one process per condition with `--conditions`; see docs/experiments.md, 2026-12-04 (13)); its histories are
# in `data/results/externalisation_*.csv`. At lam 1.5 the paper's mean exit cost saves more layers than lam 0
# but leaves verbosity and the probes where they were; the total-cost control removes every written line.

# %%
results = data_dir() / "results"
shipped = load_externalisation(
    results / "externalisation_history.csv", rl_history=results / "externalisation_rl_history.csv"
)
shipped.summary(
    ["accuracy", "layers_saved", "blocks_per_answer", "verbosity", "probe_carry", "answer_oracle_layer"]
).round(3)

# %% [markdown]
# Differences from lam 0 at the last step, with 95 % intervals over seeds (Welch):

# %%
shipped.contrasts(
    measures=["verbosity", "terse_share", "probe_carry", "probe_digit", "answer_oracle_layer", "accuracy"]
).round(3)

# %% [markdown]
# Verbosity and hidden computation over RL steps: each run light, each condition's mean bold with +-1 SE.

# %%
shipped.figure()

# %% [markdown]
# The sampled rollouts' view, every RL step: completion length (tokens, a verbosity proxy) and task accuracy.

# %%
shipped.rl_history.groupby(["condition", "step"])[["length", "accuracy", "exitcost"]].mean().unstack(0).round(3)

# %% [markdown]
# ## A heavier exit cost: lam 6
# The same experiment with `--conditions mean-cost --lam 6` (5 seeds, beside the lam-0 runs above;
# `data/results/externalisation_lam6_*.csv`): verbosity rises (3 of 5 seeds write every line by step 24),
# the prompt-end probes do not move.

# %%
lam6 = load_externalisation(
    results / "externalisation_lam6_history.csv", rl_history=results / "externalisation_lam6_rl_history.csv"
)
lam6.contrasts(measures=["verbosity", "terse_share", "layers_saved", "probe_carry", "accuracy"]).round(3)

# %%
lam6.figure()
