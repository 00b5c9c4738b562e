"""The two deployments the benchmark compares, and starting one on free loopback ports.

  disaggregated  all four services. Placement emulating two devices on a 2-core machine:
                 prefill, gateway and monitor pinned to CPU 0, decode to CPU 1, one torch
                 thread per engine.
  colocated      the vLLM-style baseline: gateway, monitor and one engine process that
                 runs both phases (--colocated true), two torch threads, no pinning (one
                 device with both cores).
  default        all four services with every option at its default, as `edgellm up` runs them.

Every other option keeps its default, unless the caller adds `extra_flags` (bench/precision.py
sets the precision flags this way); the config is built from these flags alone (`env={}`), so
the caller's EDGELLM_* variables do not change what is measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from edgellm import config as cfg
from edgellm.launch import Stack, free_port_argv

STACK_FLAGS: dict[str, tuple[str, ...]] = {
    "disaggregated": (
        "--prefill-cpus", "0", "--gateway-cpus", "0", "--monitor-cpus", "0", "--decode-cpus", "1",
        "--prefill-threads", "1", "--decode-threads", "1",
    ),
    "colocated": ("--colocated", "true", "--prefill-threads", "2"),
    "default": (),  # what `edgellm up` runs: no pinning, every engine free to use both cores
}


def stack_config(name: str, extra_flags: tuple[str, ...] = ()) -> cfg.Config:
    return cfg.parse([*free_port_argv(), *STACK_FLAGS[name], *extra_flags], env={})


def describe(config: cfg.Config, services: tuple[str, ...]) -> dict[str, Any]:
    """What the run's metadata records about one stack."""
    return {
        "services": list(services),
        "colocated": config.network.colocated,
        "placement": dataclasses.asdict(config.placement),
        "engine": dataclasses.asdict(config.engine),
        "precision": {"prefill": config.model.prefill_dtype, "decode_weights": config.model.decode_weights,
                      "int4_group_size": config.model.int4_group_size, "int4_outliers": config.model.int4_outliers},
    }


@contextlib.contextmanager
def started_stack(name: str, extra_flags: tuple[str, ...] = (), **stack_options: Any) -> Iterator[tuple[Stack, dict[str, Any]]]:
    """Yield a started stack (its processes, addresses) and its description; stop it on the way out.
    stack_options go to Stack (process_args, process_prefix). Raises RuntimeError or TimeoutError
    (with the service's last log lines) if it does not start."""
    config = stack_config(name, extra_flags)
    with tempfile.TemporaryDirectory(prefix=f"edgellm-bench-{name}-") as log_dir:
        stack = Stack(config, log_dir=log_dir, **stack_options)
        stack.start_and_wait()  # stops what it started on failure
        try:
            yield stack, {"flags": [*STACK_FLAGS[name], *extra_flags], **describe(config, stack.services)}
        finally:
            stack.stop()


@contextlib.contextmanager
def running_stack(name: str, extra_flags: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield the gateway address and description of a started stack; stop it on the way out.
    Raises RuntimeError or TimeoutError (with the service's last log lines) if it does not start."""
    with started_stack(name, extra_flags) as (stack, description):
        yield stack.address("gateway"), description


@contextlib.contextmanager
def tiny_model_stack(tag: str, **overrides: Any) -> Iterator[Stack]:
    """A started stack on the suite's tiny random-weight model (tests/conftest.py: plumbing precision,
    `overrides` as options); the stack, its logs and the model are removed on the way out. Raises
    RuntimeError or TimeoutError if the stack does not start."""
    from tests.conftest import build_tiny_model, stack_config, start_stack

    model_dir = tempfile.mkdtemp(prefix=f"edgellm-{tag}-model-")
    stack = None
    try:
        build_tiny_model(model_dir)
        stack = start_stack(stack_config(model_dir, **overrides))
        yield stack
    finally:
        if stack is not None:
            stack.stop()
            shutil.rmtree(stack.log_dir, ignore_errors=True)
        shutil.rmtree(model_dir, ignore_errors=True)
