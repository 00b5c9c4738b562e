"""Typed, frozen configuration, built once at start-up from flags and EDGELLM_* variables.

Every option is declared once in OPTIONS (options.py) and held by one typed section (sections.py): its flag (`--kv-max-chunk-bytes`), its
environment variable (`EDGELLM_KV_MAX_CHUNK_BYTES`), type, default and help.
Precedence: flag > environment > default. `edgellm up` hands the resolved values
to the services it starts with `to_argv`, which reads them back from the typed sections
themselves (there is no second copy to drift: a section changed with dataclasses.replace,
e.g. the CPU split of `edgellm up`, reaches the children as it is). Values discovered at
run time (KV capacity, model shapes) never go back in here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Sequence

from edgellm.config.options import (  # noqa: F401  (re-exported: the one place to import config from)
    DECODE_WEIGHTS, DTYPES, INT4_KERNELS, KV_TRANSFER_DTYPES, LOG_LEVELS, OPTIONS, Option,
)
from edgellm.config.sections import (  # noqa: F401
    _SECTION_OF, _SECTIONS, Config, EngineConfig, GatewayConfig, ModelConfig, MonitorConfig, NetworkConfig,
    ParallelConfig, PlacementConfig, TransferConfig, SecurityConfig, LimitsConfig, parse_cpu_list,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every option on `parser`; defaults are filled in by `from_namespace`."""
    group = parser.add_argument_group("EdgeLLM options (each also as EDGELLM_<NAME>)")
    for opt in OPTIONS:
        group.add_argument(opt.flag, dest=opt.name, default=None, help=f"{opt.help} [{opt.env_var}]")


def _resolve(opt: Option, given: str | None, env: dict[str, str]) -> Any:
    raw = given if given is not None else env.get(opt.env_var)
    if raw is None:
        return opt.default
    try:
        value = opt.type(raw)
    except ValueError as e:
        raise ValueError(f"{opt.flag}/{opt.env_var}: cannot parse {raw!r}: {e}") from None
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"{opt.flag}/{opt.env_var} must be one of {list(opt.choices)}, got {raw!r}")
    return value


def from_namespace(ns: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    values = {opt.name: _resolve(opt, getattr(ns, opt.name, None), env) for opt in OPTIONS}
    sections = {}
    for section, cls in _SECTIONS.items():
        names = [f.name for f in dataclasses.fields(cls)]
        sections[section] = cls(**{n: values[n] for n in names})
    if values["log_level"] not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}")
    return Config(**sections, log_level=values["log_level"])


def parse(argv: Sequence[str] | None = None, env: dict[str, str] | None = None, prog: str | None = None) -> Config:
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    return from_namespace(parser.parse_args(argv), env)


def to_argv(config: Config) -> list[str]:
    """The flags that reproduce `config` in another process (used by `edgellm up`)."""
    argv: list[str] = []
    for opt in OPTIONS:
        value = config.value(opt.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        argv += [opt.flag, str(value)]
    return argv
