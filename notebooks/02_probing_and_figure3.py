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

# %% tags=["parameters"]
# Sizes: SDATTN_NOTEBOOK_SIZE=small (what the tests run: a few steps and images, seconds);
# unset or "full" (the default) for the sizes this text describes.
import os

SMALL = os.environ.get("SDATTN_NOTEBOOK_SIZE", "full") == "small"

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
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("run", overrides=["logger=none", "progress=false", f"paths.output_dir={out}",
                                        f"paths.cache_dir={out}/cache", *overrides])
    return dispatch(cfg)


# %% [markdown]
# ## Table 1 on the toy model
#
# Small: 6 images per colour (the last 2 are the test split), 10 steps, 30 probe epochs — the numbers
# are noisy; `make run` gives the full table. The task prints it and writes CSV / Markdown / LaTeX.

# %%
if SMALL:
    size = ["probe.n_per_class=2", "probe.num_inference_steps=2", "trainer.max_epochs=2", "probe.layers=[2,6]"]
else:
    size = ["probe.n_per_class=6", "probe.num_inference_steps=10", "trainer.max_epochs=30"]
result = run("probe=cross_attn", "probe.control=false", *size)

# %% [markdown]
# ## Figure 3: what the maps look like
#
# Cross-attention maps per word from the toy model's 16×16 cross layers, and the top singular vectors
# of its self layer 6 (16×16).

# %%
fig = run("experiment=attention_maps", "prompt=a red car in the park",
          f"attention_maps.num_inference_steps={3 if SMALL else 10}",
          "attention_maps.cross_resolution=16", "attention_maps.self_layer=6", "attention_maps.components=4")
display(Image(filename=fig["png"]))
