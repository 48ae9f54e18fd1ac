# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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

# %%
import torch
from hydra import compose, initialize_config_dir
from IPython.display import display

from editing.grid import labelled_grid
from evaluation.datasets import EditExample
from experiments.common import load_model
from experiments.run import CONFIG_DIR
from experiments.tasks.benchmark import build_method

torch.set_num_threads(1)


def config(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("run", overrides=list(overrides))


pipe = load_model(config())  # the default model: the toy world's
pair = EditExample(id="demo", source_prompt="a white car", target_prompt="a red car")

# %%
row = []
for method in ("fpe", "p2p", "masactrl"):
    name, edit = build_method(config(f"method={method}").method)
    source, edited = edit(pipe, pair, 0)
    row.append((edited, name))
display(labelled_grid([[(source, pair.source_prompt), *row]], cell=160))
