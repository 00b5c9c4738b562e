"""KV hand-off from prefill to decode: chunk codec, streaming sender, assembling receiver."""
