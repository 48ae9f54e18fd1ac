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
# # 3 · FPE and two baselines side by side
#
# Each editor is one module under `editing/` and one config under `configs/method/` naming it with
# `_target_`; the benchmark task instantiates the config and calls
# `edit(pipe, example, seed, image=None) -> (source, edited)`. Here: FPE, Prompt-to-Prompt and
# MasaCtrl on one toy-world pair, generated from the same seed, with the settings of their configs.

# %% tags=["parameters"]
# Sizes: SDATTN_NOTEBOOK_SIZE=small (what the tests run: a few steps and images, seconds);
# unset or "full" (the default) for the sizes this text describes.
import os

SMALL = os.environ.get("SDATTN_NOTEBOOK_SIZE", "full") == "small"

# %%
import torch
from hydra import compose, initialize_config_dir
from IPython.display import display

from editing.grid import labelled_grid
from editing.methods import build_method
from evaluation.datasets import EditExample
from experiments.common import load_model
from experiments.run import CONFIG_DIR

torch.set_num_threads(1)


def config(*overrides):
    """The run config with ``overrides`` (as on the command line); small: 4 sampling steps."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("run", overrides=[*(["model.steps=4"] if SMALL else []), *overrides])


pipe = load_model(config())  # the default model: the toy world's
pair = EditExample(id="demo", source_prompt="a white car", target_prompt="a red car")

# %%
row = []
for method in ("fpe", "p2p", "masactrl"):
    name, edit = build_method(config(f"method={method}").method)
    source, edited = edit(pipe, pair, 0)
    row.append((edited, name))
display(labelled_grid([[(source, pair.source_prompt), *row]], cell=160))
