"""Weight and KV quantization: model-to-model transforms applied at load time."""
