"""Engine.generate / Engine.logits as an SDK user calls them: every parameter the sampler cannot honour (NaN or
infinite temperature, a seed torch cannot take, float token ids) is a RequestError naming it, raised before any
work, never a torch RuntimeError / ValueError from deep inside the sampler or the embedding."""

import numpy as np
import pytest
import torch

from flashport import load_engine
from flashport.engine import SEED_RANGE, RequestError, check_sampling


@pytest.fixture(scope="module")
def engine(tiny_release):
    return load_engine(tiny_release, backend="torch")


@pytest.mark.parametrize("kwargs, word", [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, seed=2 ** 64), "seed"),
    (dict(temperature=1.0, seed=-(2 ** 63) - 1), "seed"),
    (dict(temperature=1.0, seed=1.5), "seed"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_parameters_are_request_errors(engine, kwargs, word):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(RequestError, match=word):
        engine.generate([1, 2, 3], **kwargs)


@pytest.mark.parametrize("ids", [[1.5, 2], [1, 2.0], torch.tensor([1.0, 2.0]), ["a", 1]], ids=str)
def test_token_ids_must_be_integers(engine, ids):
    with pytest.raises(RequestError, match="integers"):
        engine.generate(ids, max_new_tokens=1)
    with pytest.raises(RequestError, match="integers"):
        engine.logits(list(ids))


def test_integer_ids_of_every_kind_still_work(engine):
    want = engine.generate([1, 2, 3], max_new_tokens=2).token_ids
    assert engine.generate(torch.tensor([1, 2, 3]), max_new_tokens=2).token_ids == want
    assert engine.generate(list(np.array([1, 2, 3])), max_new_tokens=2).token_ids == want
    assert engine.generate([1, 2, 3], max_new_tokens=2, temperature=1.0, seed=SEED_RANGE[1]).token_ids


def test_check_sampling_accepts_the_edges():
    check_sampling(0, 0.0, 1.0, None)
    check_sampling(1, 1e6, 1e-9, SEED_RANGE[0])
