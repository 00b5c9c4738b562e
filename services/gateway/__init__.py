"""The gateway: the public Generate entry, text handling, and routing to prefill/decode."""
