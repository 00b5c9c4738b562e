import pytest
import torch

from edgellm.engine.sampling import SamplingParams, sample


def logits(seed=0, vocab=100):
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    x = logits()
    assert sample(x, SamplingParams(), index=0) == int(x.argmax())


def test_same_seed_and_position_give_the_same_token_anywhere():
    x, p = logits(), SamplingParams(temperature=1.0, seed=42)
    draws = [sample(x, p, index=i) for i in range(50)]
    assert draws == [sample(x, p, index=i) for i in range(50)]  # reproducible per position
    assert len(set(draws)) > 5  # and actually random across positions
    other = [sample(x, SamplingParams(temperature=1.0, seed=43), index=i) for i in range(50)]
    assert other != draws


def test_top_k_one_is_greedy():
    x = logits(3)
    assert {sample(x, SamplingParams(temperature=2.0, top_k=1, seed=s), 0) for s in range(20)} == {int(x.argmax())}


def test_top_p_keeps_only_the_nucleus():
    x = torch.tensor([5.0, 4.0, -10.0, -10.0, -10.0])  # first two hold ~all the mass
    drawn = {sample(x, SamplingParams(temperature=1.0, top_p=0.9, seed=s), 0) for s in range(200)}
    assert drawn == {0, 1}


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 1.5}, {"top_k": -2}])
def test_invalid_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
