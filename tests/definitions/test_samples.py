"""The samples: both forms give the same model, and the committed JSON Schema matches the model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from sagas.definitions import ParallelGroup, SagaDefinition, StepKind, load_file, to_json_schema
from sagas.definitions.yaml_source import read_yaml
from tests.definitions.support import MALFORMED, REPO, SAMPLES

SCHEMA_FILE = REPO / "docs" / "saga-definition.schema.json"


def test_yaml_and_dsl_samples_produce_equal_models(sample: tuple[SagaDefinition, SagaDefinition]) -> None:
    """Each sample's YAML and DSL forms build equal models with the same digest and identity."""
    from_yaml, from_dsl = sample
    assert from_yaml == from_dsl
    assert from_yaml.digest == from_dsl.digest
    assert from_yaml.identity == from_dsl.identity
    assert from_yaml.model_dump() == from_dsl.model_dump()


def test_samples_cover_pivot_retriable_and_parallel_groups() -> None:
    """Between them the samples show every step kind and a parallel group, in a legal order."""
    order = SAMPLES["order_payment"]
    travel = SAMPLES["travel_booking"]

    order_def, travel_def = load_file(order / "saga.yaml"), load_file(travel / "saga.yaml")
    assert [s.name for s in order_def.iter_steps()] == [
        "create_order",
        "reserve_inventory",
        "charge_payment",
        "confirm_order",
    ]
    assert order_def.step("charge_payment").kind is StepKind.PIVOT
    assert order_def.step("confirm_order").kind is StepKind.RETRIABLE
    assert isinstance(travel_def.steps[0], ParallelGroup)
    assert {s.name for s in travel_def.stages[0]} == {"book_flight", "book_hotel", "book_car"}
    assert travel_def.stage_of("book_car") == 0
    assert travel_def.stage_of("charge_payment") == 1
    for definition in (order_def, travel_def):
        kinds = [s.kind for s in definition.iter_steps()]
        assert kinds == sorted(kinds, key=[StepKind.COMPENSATABLE, StepKind.PIVOT, StepKind.RETRIABLE].index)
        assert all((s.compensation is not None) == (s.kind is StepKind.COMPENSATABLE) for s in definition.iter_steps())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_yaml_points_editors_at_the_committed_schema(name: str) -> None:
    """Each sample YAML starts with a yaml-language-server comment whose path resolves to the schema file."""
    path = SAMPLES[name] / "saga.yaml"
    first = path.read_text(encoding="utf-8").splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix)
    assert (path.parent / first.removeprefix(prefix)).resolve() == SCHEMA_FILE.resolve()


def test_committed_schema_is_up_to_date() -> None:
    """docs/saga-definition.schema.json equals what `sagas schema` generates now (regenerate it if this fails)."""
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8")) == to_json_schema()


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_schema_accepts_the_samples(name: str) -> None:
    """The generated JSON Schema accepts each sample's YAML data, durations as text included."""
    path = SAMPLES[name] / "saga.yaml"
    data, _, problems = read_yaml(path.read_text(encoding="utf-8"), str(path))
    assert not problems
    jsonschema.validate(data, to_json_schema())


@pytest.mark.parametrize(
    "fixture", ["typo_step_key.yaml", "version_string.yaml", "bad_kind.yaml", "timeout_not_a_duration.yaml"]
)
def test_schema_rejects_malformed_definitions(fixture: str) -> None:
    """The generated JSON Schema rejects definitions with unknown keys, wrong types and bad values."""
    path = MALFORMED / fixture
    data, _, problems = read_yaml(path.read_text(encoding="utf-8"), str(path))
    assert data is not None
    assert not problems
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, to_json_schema())
