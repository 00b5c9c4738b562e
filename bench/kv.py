"""`python -m bench.kv` (`make bench-kv`): how much of the KV transfer hides behind prefill.

For each emulated link (--links, Mbit/s: by default a real one, the decode service in its own
network namespace behind a veth pair shaped by `tc tbf` (bench/shaped_link.py); where that is
not possible (no root), the KV sender paces its stream like a link of that bandwidth,
--kv-link-mbps, a token bucket), each wire format (fp16, int8) and each mode
(layer-wise streaming, the default; send-after-prefill, the baseline), one disaggregated stack
(bench/stacks.py: prefill on CPU 0, decode on CPU 1) is started with the embedded model, and
prompts of --prompts tokens go straight to the prefill service's Prefill RPC. Per prompt:

  compute   the prefill forward pass (forward_start .. forward_end, from the response)
  bytes     KV bytes on the wire (the decode service's acknowledgement)
  transfer  first .. last chunk received at decode
  exposed   last chunk received - forward end, floored at 0: what the transfer adds to time to
            first token beyond the prefill compute (decode cannot start before the last chunk)

Acceptance (issue 5): where the link moves a layer's KV faster than prefill computes the next
layer, layer-wise exposed time <= 10 % of the send-after-prefill baseline's transfer time.
Writes bench/results/kv.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import pathlib
import sys
from collections.abc import Iterator
from typing import Any


from bench import shaped_link
from bench.shaped_link import ShapedLink
from bench.stacks import started_stack
from edgellm.launch import free_port
from edgellm.linkproxy import LinkProxy
from edgellm.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MODES = {"layerwise": (), "after-prefill": ("--kv-send-after-prefill", "true")}


def prefill_once(stack: Any, num_tokens: int, request_id: str) -> dict[str, float]:
    prompt = [1000 + (i * 7) % 20000 for i in range(num_tokens)]
    with stack.channel("prefill") as channel:
        reply = prefill_pb2_grpc.PrefillStub(channel).Prefill(
            prefill_pb2.PrefillRequest(
                spec=common_pb2.RequestSpec(request_id=request_id, prompt_token_ids=prompt, max_new_tokens=2),
                decode_address=stack.address("decode")),
            timeout=600,
        )
    ms = 1e-6
    return {
        "compute_ms": (reply.forward_end_unix_ns - reply.forward_start_unix_ns) * ms,
        "bytes": reply.kv.num_bytes,
        "transfer_ms": (reply.kv.last_chunk_received_unix_ns - reply.kv.first_chunk_received_unix_ns) * ms,
        "exposed_ms": max(0.0, (reply.kv.last_chunk_received_unix_ns - reply.forward_end_unix_ns) * ms),
    }


@contextlib.contextmanager
def link(emulation: str, mbps: float, delay_ms: float) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """The stack flags and Stack options that put the prefill -> decode link at `mbps`."""
    if emulation == "token-bucket":
        yield ("--kv-link-mbps", str(mbps)), {}
        return
    with ShapedLink(mbps) as shaped:
        decode = f"{shaped.decode_host}:{free_port()}"
        options = {"process_prefix": {"decode": shaped.prefix}, "process_args": {"decode": ["--host", shaped.decode_host]}}
        if not delay_ms:
            yield ("--decode-addrs", decode), options
            return
        proxy = LinkProxy(decode, delay_ms=delay_ms).start_in_thread()  # latency, which tbf cannot add
        options["process_args"]["decode"] += ["--decode-port", decode.rsplit(":", 1)[1]]
        yield ("--decode-addrs", proxy.address), options


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mbps in args.links:
        for wire in args.wire:
            for mode, flags in MODES.items():
                extra = ("--kv-transfer-dtype", wire, "--decode-weights", "bf16", *flags)
                with link(args.link_emulation, mbps, args.link_delay_ms) as (link_flags, options), \
                        started_stack("disaggregated", (*extra, *link_flags), **options) as (stack, _):
                    prefill_once(stack, 64, "warm-up")
                    for n in args.prompts:
                        row = {"link_mbps": mbps, "link": args.link_emulation, "delay_ms": args.link_delay_ms,
                               "wire": wire, "mode": mode, "prompt_tokens": n,
                               **prefill_once(stack, n, f"{mode}-{wire}-{n}")}
                        rows.append(row)
                        print(f"[kv] {row}", file=sys.stderr, flush=True)
    return rows


def verdicts(rows: list[dict[str, Any]], num_layers: int) -> list[str]:
    """Issue 5's acceptance 3, per (link, wire, prompt) where a layer moves faster than one computes."""
    lines = []
    by_key = {(r["link_mbps"], r["wire"], r["prompt_tokens"], r["mode"]): r for r in rows}
    for (mbps, wire, n, mode), layerwise in by_key.items():
        if mode != "layerwise" or (mbps, wire, n, "after-prefill") not in by_key:
            continue
        baseline = by_key[(mbps, wire, n, "after-prefill")]
        layer_send_ms = baseline["transfer_ms"] / num_layers
        layer_compute_ms = layerwise["compute_ms"] / num_layers
        if layer_send_ms >= layer_compute_ms:
            lines.append(f"- {mbps} Mbit/s, {wire}, {n} tokens: a layer takes longer to send ({layer_send_ms:.0f} ms) "
                         f"than to compute ({layer_compute_ms:.0f} ms): not a case the bound applies to")
            continue
        share = layerwise["exposed_ms"] / baseline["transfer_ms"] if baseline["transfer_ms"] else 0.0
        lines.append(f"- {mbps} Mbit/s, {wire}, {n} tokens: exposed {layerwise['exposed_ms']:.0f} ms = {share:.1%} of the "
                     f"baseline's transfer {baseline['transfer_ms']:.0f} ms (target <= 10%: {'met' if share <= 0.1 else 'NOT met'})")
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| link Mbit/s | wire | mode | prompt tokens | compute ms | KV MiB | transfer ms | exposed ms |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['link_mbps']:g} | {r['wire']} | {r['mode']} | {r['prompt_tokens']} | {r['compute_ms']:.0f} | "
                   f"{r['bytes'] / 2**20:.1f} | {r['transfer_ms']:.0f} | {r['exposed_ms']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", type=float, nargs="+", default=[100.0, 1000.0], help="Mbit/s")
    parser.add_argument("--wire", nargs="+", default=["fp16", "int8"])
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--link-emulation", choices=["auto", "netns", "token-bucket"], default="auto",
                        help="netns: the decode service behind a veth pair shaped by tc tbf (root, iproute2); "
                             "token-bucket: the KV sender paces itself (--kv-link-mbps); auto: netns where possible")
    parser.add_argument("--link-delay-ms", type=float, default=0.0,
                        help="netns only: one-way latency added by a delaying proxy (edgellm.linkproxy)")
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "kv.json")
    args = parser.parse_args(argv)
    if args.link_emulation == "auto":
        args.link_emulation = "netns" if shaped_link.available() else "token-bucket"
    elif args.link_emulation == "netns" and not shaped_link.available():
        parser.error("--link-emulation netns needs root and iproute2 (ip netns, tc)")
    rows = run(args)
    from transformers import AutoConfig

    from edgellm.model_store import resolve_model_dir

    num_layers = AutoConfig.from_pretrained(resolve_model_dir("")).num_hidden_layers
    lines = verdicts(rows, num_layers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(),
                                    "rows": rows, "acceptance": lines}, indent=2) + "\n")
    print(table(rows))
    print("\nIssue 5, acceptance 3:\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
