# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2 · A probing table and Figure 3
#
# The same task functions `python -m experiments.run` calls, on the default (toy) model with small
# sizes so the notebook runs in about a minute on a laptop CPU: Table 1 (colour from the colour
# token's cross-attention map, per layer) with a few images per class, then Figure 3 (per-word
# cross-attention maps and the top components of a self-attention map).

# %%
import tempfile

import torch
from hydra import compose, initialize_config_dir
from IPython.display import Image, display

from experiments.run import CONFIG_DIR, dispatch

torch.set_num_threads(1)
out = tempfile.mkdtemp(prefix="sdattn-notebook-")


def run(*overrides):
    """Compose the run config with ``overrides`` (as on the command line) and run its task."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("run", overrides=["logger=none", "progress=false", f"paths.output_dir={out}",
                                        f"paths.cache_dir={out}/cache", *overrides])
    return dispatch(cfg)


# %% [markdown]
# ## Table 1 on the toy model
#
# Small: 6 images per colour (the last 2 are the test split), 10 steps, 30 probe epochs — the numbers
# are noisy; `make run` gives the full table. The task prints it and writes CSV / Markdown / LaTeX.

# %%
result = run("probe=cross_attn", "probe.n_per_class=6", "probe.num_inference_steps=10", "trainer.max_epochs=30",
             "probe.control=false")

# %% [markdown]
# ## Figure 3: what the maps look like
#
# Cross-attention maps per word from the toy model's 16×16 cross layers, and the top singular vectors
# of its self layer 6 (16×16).

# %%
fig = run("experiment=attention_maps", "prompt=a red car in the park", "attention_maps.num_inference_steps=10",
          "attention_maps.cross_resolution=16", "attention_maps.self_layer=6", "attention_maps.components=4")
display(Image(filename=fig["png"]))
