# %% [markdown]
# # Bring your own model
#
# Everything works on any TransformerLens bridge. With weights on disk or in the HF cache a user writes
#
# ```python
# model = ee.load_model("Qwen/Qwen3-1.7B")          # or "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", or a folder
# ee_model = ee.attach_exit_heads(model)             # about 8 evenly spaced exitable layers by default
# ```
#
# This machine has no network, so here we build a small random Qwen3 offline, save it in HF format, and run
# the same pipeline on it.

# %%
import torch

import eetools as ee

torch.manual_seed(0)
torch.set_num_threads(2)
ee.views.setup_notebook()  # figures as JSON (JupyterLab) + offline HTML (exported HTML, nbviewer)

# %%
import tempfile

from transformers import Qwen3Config, Qwen3ForCausalLM

from eetools.io.tokenizer import build_tokenizer

folder = tempfile.mkdtemp()
tok = build_tokenizer()
cfg = Qwen3Config(
    vocab_size=len(tok),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
)
Qwen3ForCausalLM(cfg).save_pretrained(folder)
tok.save_pretrained(folder)
model = ee.load_model(folder)
ee_model = ee.attach_exit_heads(model, layers=[2, 4])
ee_model

# %%
# NBVAL_IGNORE_OUTPUT
res = ee.calibrate(ee_model, "addition", steps=5, batch_size=4, seed=0)
r = ee_model.generate("Q: 12+34\n", 20, seed=0)
ee.views.color_tokens(r)

# %% [markdown]
# Exit heads save with a fingerprint of their base model; loading them into another model is refused with an error that names both:

# %%
ee.save_exit_model(ee_model, folder + "/exits")
try:
    ee.load_exit_model(folder + "/exits", model=ee.load_model())
except Exception as e:
    print(type(e).__name__, str(e)[:160])
