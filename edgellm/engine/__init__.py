"""The engine: a Llama-family model in plain torch, its KV cache, sampling and the step loop."""
