"""Benchmarks (prompt-pair datasets) and metrics for comparing text-guided image editors."""

from .datasets import (
                       DATASET_NAMES,
                       EditExample,
                       LoadedDataset,
                       car_fake_edit_pairs,
                       decode_rle_mask,
                       load_dataset,
)

__all__ = ["DATASET_NAMES", "EditExample", "LoadedDataset", "car_fake_edit_pairs", "decode_rle_mask",
           "load_dataset"]
