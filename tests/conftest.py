"""Shared fixtures: a tiny random-weight Llama checkpoint, free ports, and real service stacks.

Most tests run on the tiny model (4 layers, hidden 64) so they are fast on two cores; the
equivalence and end-to-end tests marked `real_model` use the embedded SmolLM2-135M.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterator

import pytest
import torch

from edgellm import config as cfg
from edgellm.model_store import prepare_default_model
from edgellm.launch import Stack, free_port_argv


def build_tiny_model(path: str, num_layers: int = 4, max_positions: int = 2048) -> str:
    """A random Llama with the default model's tokenizer, saved as an HF checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # A machine without the default model's package (a GPU machine) names a tokenizer folder.
    tokenizer = AutoTokenizer.from_pretrained(os.environ.get("EDGELLM_TEST_TOKENIZER") or prepare_default_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than default init, so greedy outputs vary with the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


# Most stack tests check plumbing (equal text across services, resumes, equivalence with
# transformers), so both phases run fp32 unless a test asks otherwise; the shipped default
# (bf16 prefill, INT4-AWQ decode) has its own tests in test_precision.py and test_real_model.py.
PLUMBING_PRECISION = {"prefill_dtype": "fp32", "decode_weights": "fp32"}
# Test stacks run unpinned, prefill and decode sharing both cores: the hot backup's extensions
# (prefill work while decode runs) would fight decode for them, so they are off unless a test
# turns them on (`edgellm up` and real devices give prefill its own cores).
TEST_DEFAULTS = {"backup_follow_tokens": 0}


def stack_config(model: str, shipped_precision: bool = False, **overrides: str) -> cfg.Config:
    argv = ["--model", model, *free_port_argv()]
    for key, value in (TEST_DEFAULTS | ({} if shipped_precision else PLUMBING_PRECISION) | overrides).items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return cfg.parse(argv, env={})


def start_stack(config: cfg.Config, **stack_options) -> Stack:
    log_dir = tempfile.mkdtemp(prefix="edgellm-stack-")
    stack = Stack(config, log_dir=log_dir, **stack_options)
    stack.start_and_wait()
    return stack


def scrape(port: int) -> str:
    """A service's Prometheus metrics page."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def log_events(stack: Stack, name: str, event: str) -> list[dict]:
    """The JSON log lines of one service of a stack (its log_dir) for `event`."""
    with open(f"{stack.log_dir}/{name}.log") as f:
        return [e for e in map(json.loads, (line for line in f if line.startswith("{"))) if e.get("event") == event]


def count_in_log(stack: Stack, name: str, event: str) -> int:
    with open(f"{stack.log_dir}/{name}.log") as f:
        return f.read().count(f'"event": "{event}"')


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of a metric whose label text contains `labels` (every label set by default)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#") and labels in line.rsplit(" ", 1)[0]:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="session")
def tiny_stack(tiny_model_dir) -> Iterator[Stack]:
    """A shared stack on the tiny model. Tests that kill services start their own."""
    stack = start_stack(stack_config(tiny_model_dir))
    yield stack
    stack.stop()
    shutil.rmtree(stack.log_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def real_stack() -> Iterator[Stack]:
    stack = start_stack(stack_config(str(prepare_default_model())))
    yield stack
    stack.stop()
    shutil.rmtree(stack.log_dir, ignore_errors=True)
