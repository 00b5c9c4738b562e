"""EdgeLLM: prefill/decode-disaggregated LLM serving for clusters of small devices."""

__version__ = "0.1.0"
