"""Tests that need CUDA (`make test-gpu`): every test here is marked `gpu` and skipped where
torch cannot run on a GPU, so the CPU suite and CI stay green.

The model: $EDGELLM_GPU_TEST_MODEL (a checkpoint directory) if set, else the embedded default
model when it is installed, else the tiny random model (its tokenizer from
$EDGELLM_TEST_TOKENIZER on a machine without the default model's package).
"""

from __future__ import annotations

import os
import pathlib

import pytest

from edgellm.device import cuda_problem

HERE = pathlib.Path(__file__).resolve().parent
NO_CUDA = cuda_problem(0)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in pathlib.Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if NO_CUDA is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs CUDA: {NO_CUDA}"))


@pytest.fixture(scope="session")
def gpu_model_dir(request) -> str:
    if os.environ.get("EDGELLM_GPU_TEST_MODEL"):
        return os.environ["EDGELLM_GPU_TEST_MODEL"]
    try:
        from edgellm.model_store import prepare_default_model

        return str(prepare_default_model())
    except Exception:  # noqa: BLE001 - no default model here: the tiny one still checks the paths
        return request.getfixturevalue("tiny_model_dir")
