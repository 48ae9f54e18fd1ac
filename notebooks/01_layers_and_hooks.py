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
from probing.prompts import word_token_positions
from sdattn.hooks import AttentionHook, HookSet
from sdattn.layers import LayerSelector, enumerate_layers, format_layer_table
from sdattn.sampling import latent_size, sample
from toyworld.model import load_pipeline

torch.set_num_threads(1)
pipe = load_pipeline("models/toy")
layers = enumerate_layers(pipe.unet, latent_size(pipe))
print(format_layer_table(layers))

# %% [markdown]
# ## A hook: the cross-attention map of one word
#
# `attend(attn, q, k, v, mask)` sees the per-head queries, keys and values (B, H, N, d) of its layer;
# the default computes what diffusers' `AttnProcessor2_0` computes. This hook also keeps
# softmax(QKᵀ/√d) of the conditional rows for the token of "red" at every step, and returns the
# layer's output unchanged.


# %%
class WordMap(AttentionHook):
    """Sums the (h, w) cross-attention map of token ``position`` (conditional rows, mean over heads)."""

    def __init__(self, layer, state, position, store):
        super().__init__(layer, state)
        self.position, self.store = position, store

    def attend(self, attn, query, key, value, mask):
        rows = self.state.layout.cond_rows
        probs = torch.softmax(query[rows] @ key[rows].transpose(-1, -2) * attn.scale, -1)  # (B, H, N, L)
        word = probs[..., self.position].mean(1)  # (B, N)
        side = self.layer.height
        self.store[self.layer.label] = self.store.get(self.layer.label, 0) + word.view(-1, side, self.layer.width)
        return super().attend(attn, query, key, value, mask)


prompt = "a red car in the park"
position = word_token_positions(pipe.tokenizer, prompt, "red")[0]
cross = LayerSelector(kinds="cross", indices="all").select(layers)
store: dict = {}
steps = 3 if SMALL else 10
with HookSet(pipe.unet, cross, lambda layer, state: WordMap(layer, state, position, store)) as hooks:
    out = sample(pipe, [prompt], seeds=[0], num_inference_steps=steps, guidance_scale=2.0, callbacks=[hooks],
                 progress=False)
assert type(next(iter(pipe.unet.attn_processors.values()))).__name__ != "WordMap"  # restored

# %%
maps = [(out.images[0], prompt)]
for label, total in store.items():
    m = total[0] / total[0].max()  # (h, w), the sum over the steps, scaled to [0, 1]
    maps.append((m[None].repeat(3, 1, 1), label))
display(labelled_grid([maps], cell=96))
