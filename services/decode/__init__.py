"""The decode service: receives prompt KV from prefill and generates the remaining tokens."""
