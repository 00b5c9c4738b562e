"""Incremental detokenization and stop strings with the real tokenizer."""

import pytest
from transformers import AutoTokenizer

from edgellm.model_store import prepare_default_model
from services.gateway.text import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(prepare_default_model())


def run(tokenizer, text, stop=()):
    stream = TextStream(tokenizer, list(stop))
    out = [stream.add(t) for t in tokenizer(text)["input_ids"]]
    if not stream.stopped:
        out.append(stream.flush())
    return out, stream.stopped


@pytest.mark.parametrize("text", ["Hello world, how are you?", "naïve café — 東京 🚀 done", "  spaces\n\nand lines"])
def test_deltas_concatenate_to_the_full_text(tokenizer, text):
    out, _ = run(tokenizer, text)
    assert "".join(out) == tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
    assert not any("\ufffd" in d for d in out)  # never half a character


def test_stop_string_ends_output_before_it(tokenizer):
    out, stopped = run(tokenizer, "The answer is 42. END of story", stop=["END"])
    assert stopped and "".join(out) == "The answer is 42. "


def test_stop_string_spanning_tokens_is_never_partly_sent(tokenizer):
    out, stopped = run(tokenizer, "one two ###STOP### three", stop=["###STOP###"])
    assert stopped and "".join(out) == "one two "
    assert not any("#" in d for d in out)


def test_held_back_prefix_is_released_when_it_does_not_complete(tokenizer):
    out, stopped = run(tokenizer, "a b ### c", stop=["###STOP"])
    assert not stopped and "".join(out) == "a b ### c"
