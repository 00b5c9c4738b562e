"""Process placement: which CPUs a service runs on and how many threads its engine uses.

On one machine the CPUs stand in for separate devices (prefill on some cores, decode on
others). Every layer may use this module; it imports nothing from the engine or quant.
"""

from __future__ import annotations

import os
from dataclasses import replace

from edgellm.config import Config


def split_engine_cpus(config: Config, available: tuple[int, ...]) -> Config:
    """`edgellm up` on one machine: give prefill and decode disjoint halves of the CPUs (prefill
    the larger half), as two devices would have, unless the user placed them. Two engines whose
    OpenMP teams both span every core fight over them; on this 2-core VM even one decode engine
    alone ran a batch-1 step in 38 ms on two threads against 19 ms on one in some runs (in others
    two threads cost nothing)."""
    p = config.placement
    if p.prefill_cpus or p.decode_cpus or len(available) < 2:
        return config
    half = (len(available) + 1) // 2
    placement = replace(p, prefill_cpus=cpu_list(available[:half]), decode_cpus=cpu_list(available[half:]))
    return replace(config, placement=placement)


def cpu_list(cpus: tuple[int, ...]) -> str:
    """(0, 1, 3) -> '0,1,3' (the form --<service>-cpus takes)."""
    return ",".join(map(str, cpus))


def pin_process(cpus: tuple[int, ...]) -> None:
    """Restrict this process to `cpus` (no-op when empty). Call before starting threads:
    threads inherit the affinity of the thread that creates them."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def engine_threads(requested: int) -> int:
    """Keep torch single-threaded on the calling (event loop) thread; return the thread count
    for the engine thread: `requested`, or one per CPU this process may use.

    Why: torch's OpenMP team belongs to the thread that first runs a parallel op. If the main
    thread (KV staging, cache allocation) also had a multi-threaded team, two teams fight over
    the cores: a decode step went from 33 to 61-73 ms/token here.
    """
    import torch  # here, so that placing a process never loads torch

    torch.set_num_threads(1)
    return requested or len(os.sched_getaffinity(0))
