"""Saga input is checked against the definition's JSON Schema; the format's own schema comes from the model."""

from __future__ import annotations

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagas.definitions import RetryPolicy, load_file, to_json_schema, validate_input
from sagas.errors import InvalidInput
from tests.definitions.support import SAMPLES

ORDER = {"customer_id": "c1", "items": [{"sku": "A", "quantity": 2}], "total": 20.5, "currency": "EUR"}


def test_valid_input_passes() -> None:
    """Input matching the schema is accepted silently."""
    validate_input(load_file(SAMPLES["order_payment"] / "saga.yaml"), ORDER)


def test_invalid_input_names_every_place_that_is_wrong() -> None:
    """InvalidInput names the definition and each failing field with the reason."""
    definition = load_file(SAMPLES["order_payment"] / "saga.yaml")
    bad = {**ORDER, "total": -1, "currency": "euro", "items": [{"sku": "A", "quantity": 0}]}
    with pytest.raises(InvalidInput) as caught:
        validate_input(definition, bad)
    message = str(caught.value)
    assert message.startswith("input of order_payment v1 does not match its schema")
    for where in ("input.total", "input.currency", "input.items[0].quantity"):
        assert where in message


def test_a_definition_without_input_schema_accepts_any_object() -> None:
    """Without an input schema any JSON object is accepted; a value of another type is refused with one line (a
    saga's input is an object: `steps` and `saga` beside it in the context are too)."""
    definition = load_file(SAMPLES["order_payment"] / "saga.yaml").model_copy(update={"input_schema": None})
    validate_input(definition, {"anything": ["at", 1, {"all": None}]})
    with pytest.raises(InvalidInput, match=r"^input of order_payment v1 must be a JSON object, not list$"):
        validate_input(definition, ["anything", 1])


def test_json_schema_is_a_valid_2020_12_schema() -> None:
    """The generated format schema is itself valid JSON Schema and rejects unknown top-level keys."""
    schema = to_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "version": 1, "steps": [], "stpes": []}, schema)


@given(
    attempt=st.integers(min_value=1, max_value=200),
    unit=st.floats(min_value=0, max_value=1, exclude_max=True),
    initial=st.floats(min_value=0, max_value=100),
    multiplier=st.floats(min_value=1, max_value=10),
    jitter=st.floats(min_value=0, max_value=1),
)
def test_backoff_stays_within_the_jittered_cap(
    attempt: int, unit: float, initial: float, multiplier: float, jitter: float
) -> None:
    """Any attempt's backoff is non-negative and never above max_backoff plus its jitter."""
    policy = RetryPolicy(initial_backoff=initial, max_backoff=initial + 50, multiplier=multiplier, jitter=jitter)
    delay = policy.backoff(attempt, unit)
    assert 0.0 <= delay <= policy.max_backoff * (1 + jitter) + 1e-9


def test_an_input_holding_a_nul_character_is_refused() -> None:
    """PostgreSQL's JSONB cannot store NUL: refused at the start on every store, not after the saga began."""
    definition = load_file(SAMPLES["order_payment"] / "saga.yaml")
    with pytest.raises(InvalidInput, match="NUL character"):
        validate_input(definition, {"note": ["ok", {"deep": "a\x00b"}]})
