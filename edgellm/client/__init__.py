"""The EdgeLLM client SDK.

    from edgellm.client import Client
    client = Client("127.0.0.1:50051")
    for delta in client.generate("Hello", max_tokens=32):
        print(delta.text, end="")
    print(client.generate_text(messages=[{"role": "user", "content": "Hi"}]))

AsyncClient has the same methods as coroutines / async iterators.
"""

from edgellm.client.sdk import AsyncClient, Client, Completion, Delta, GenerationError

__all__ = ["AsyncClient", "Client", "Completion", "Delta", "GenerationError"]
