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
# # 1 · The layer table and a hook
#
# Every attention layer of a UNet is a `LayerId` (index, kind, block, query grid, diffusers processor
# name), derived from `unet.attn_processors` — never hard-coded. A hook is a diffusers attention
# processor (`AttentionHook`) installed on chosen layers by `HookSet`, which restores the originals
# when the `with` block ends; the sampling loop tells the hooks the step index.
#
# Runs on the default model, the toy world's `models/toy` (64 px, 7 self + 7 cross layers).

# %% tags=["parameters"]
# Sizes: SDATTN_NOTEBOOK_SIZE=small (what the tests run: a few steps and images, seconds);
# unset or "full" (the default) for the sizes this text describes.
import os

SMALL = os.environ.get("SDATTN_NOTEBOOK_SIZE", "full") == "small"

# %%
import torch
from IPython.display import display

from editing.grid import labelled_grid
from sdattn.hooks import AttentionHook
from sdattn.layers import enumerate_layers, format_layer_table, select_layers
from sdattn.recorder import Recorder, Tap
from sdattn.sampling import latent_size, sample
from sdattn.text import word_token_positions
from toyworld.model import load_pipeline

torch.set_num_threads(1)
pipe = load_pipeline("models/toy")
layers = enumerate_layers(pipe.unet, latent_size(pipe))
print(format_layer_table(layers))

# %% [markdown]
# ## Recording: the cross-attention map of one word
#
# The attention recorder (`sdattn.recorder`, in the spirit of TransformerLens's `run_with_cache`) installs
# hooks that compute what the layers compute and keep what a `Tap` asks for: here softmax(QKᵀ/√d) of the
# conditional rows, averaged over heads, for the token of "red", summed over the steps. (A hook of your own
# is an `AttentionHook` subclass: its `attend(attn, q, k, v, mask)` sees the per-head queries, keys and
# values (B, H, N, d) of its layer; the recorder's and every editor's hooks are such subclasses.)

# %%
prompt = "a red car in the park"
position = word_token_positions(pipe.tokenizer, prompt, "red")[0]
red = torch.zeros(1, 1, pipe.tokenizer.model_max_length)  # (B, T, L): weights over the keys, one word
red[0, 0, position] = 1.0
cross = select_layers(layers, "all", "cross")
rec = Recorder([Tap(cross, "probs", rows="cond", heads="mean", tokens=red, over_steps="sum")])
steps = 3 if SMALL else 10
with rec.installed(pipe.unet):
    out = sample(pipe, [prompt], seeds=[0], num_inference_steps=steps, guidance_scale=2.0, callbacks=[rec],
                 progress=False)
assert not any(isinstance(p, AttentionHook) for p in pipe.unet.attn_processors.values())  # restored

# %%
maps = [(out.images[0], prompt)]
for layer in cross:
    total = rec["probs"][layer.label][0, 0].view(layer.height, layer.width)  # (h, w), the sum over the steps
    m = total / total.max()  # scaled to [0, 1]
    maps.append((m[None].repeat(3, 1, 1), layer.label))
display(labelled_grid([maps], cell=96))
