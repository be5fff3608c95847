"""The registry: one content per name and version, latest version by default."""

from __future__ import annotations

from typing import Any

import pytest

from sagas.definitions import DefinitionRegistry, SagaDefinition, loads
from sagas.errors import DefinitionConflict, DefinitionError, UnknownDefinition
from tests.definitions.support import VALID_YAML


def version(number: int, description: str = "") -> SagaDefinition:
    return loads(VALID_YAML.replace("version: 1", f"version: {number}\ndescription: '{description}'"))


def test_get_without_version_returns_the_latest() -> None:
    """get(name) returns the highest registered version, whatever the registration order."""
    registry = DefinitionRegistry([version(2), version(10), version(1)])
    assert registry.get("shop").version == 10
    assert registry.get("shop", 2).version == 2
    assert registry.versions("shop") == (1, 2, 10)
    assert len(registry) == 3


def test_registering_the_same_content_twice_is_a_no_op() -> None:
    """Registering equal content again (e.g. from the DSL and from YAML) keeps one entry."""
    registry = DefinitionRegistry()
    first = registry.register(version(1))
    assert registry.register(version(1)) is first
    assert len(registry) == 1
    assert version(1) in registry


def test_different_content_under_the_same_name_and_version_conflicts() -> None:
    """Changed content needs a new version: the registry refuses it and names both digests."""
    registry = DefinitionRegistry([version(1)])
    changed = version(1, "changed")
    with pytest.raises(DefinitionConflict) as caught:
        registry.register(changed)
    assert version(1).digest in str(caught.value)
    assert changed.digest in str(caught.value)
    assert registry.get("shop") == version(1)


def test_unknown_names_and_versions_raise_unknown_definition() -> None:
    """Asking for a missing name or version raises UnknownDefinition saying what exists."""
    registry = DefinitionRegistry([version(1)])
    with pytest.raises(UnknownDefinition, match="registered: shop"):
        registry.get("nope")
    with pytest.raises(UnknownDefinition, match="no version 3"):
        registry.get("shop", 3)


def test_digest_ignores_source_formatting_but_not_content() -> None:
    """Comments, key order and duration spelling do not change the digest; a changed value does."""
    reformatted = "# a comment\n" + VALID_YAML.replace(
        "    command: inventory.reserve\n", "    command: inventory.reserve\n    timeout: 30s\n"
    )
    assert loads(reformatted).digest == loads(VALID_YAML).digest
    assert loads(VALID_YAML.replace("input.sku", "input.item")).digest != loads(VALID_YAML).digest


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        ([{"name": "a", "participant": "s", "command": "a.do"},  # compensatable, with no compensation
          {"name": "b", "participant": "s", "command": "b.do", "kind": "pivot"}], "needs a compensation"),
        ([{"name": "a", "participant": "s", "command": "a.do", "kind": "pivot"},
          {"name": "a", "participant": "t", "command": "other.do", "kind": "retriable"}], "'a'"),
    ],
)
def test_a_model_built_without_the_checks_is_refused_when_registered(steps: list[Any], fragment: str) -> None:
    """`SagaDefinition.model_validate` checks fields, not the definition as a whole; the registry (which the engine
    and the store's readers go through) runs the checks `sagas validate` runs."""
    definition = SagaDefinition.model_validate({"name": "x", "version": 1, "steps": steps})
    with pytest.raises(DefinitionError, match=fragment):
        DefinitionRegistry([definition])
