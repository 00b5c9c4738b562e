"""The prefill service: high-precision prompt processing that streams KV to decode."""
