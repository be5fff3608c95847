"""Fixtures shared by the definition tests."""

from __future__ import annotations

import pytest

from sagas.definitions import SagaDefinition, load_file, load_python
from tests.definitions.support import SAMPLES


@pytest.fixture(params=sorted(SAMPLES))
def sample(request: pytest.FixtureRequest) -> tuple[SagaDefinition, SagaDefinition]:
    """Each sample as (YAML model, DSL model)."""
    folder = SAMPLES[request.param]
    (from_dsl,) = load_python(folder / "saga_dsl.py")
    return load_file(folder / "saga.yaml"), from_dsl
