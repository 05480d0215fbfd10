"""Shared fixtures: a fresh Dynamo cache per test, reproducible but fresh random data."""

import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo_and_seed(request):
    # Each test compiles its own variants: without a reset the recompile limit of the shared
    # compiled callables would be reached across tests (a hard error with fullgraph=True).
    torch._dynamo.reset()
    # Fresh data each test, yet a failure is reproducible from the printed seed.
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    with warnings.catch_warnings():
        # torch's own flex, used as a comparison, warns when run uncompiled on CPU.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield
