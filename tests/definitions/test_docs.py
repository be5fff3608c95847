"""The examples in docs/definitions.md and README.md are valid and say the same thing in both forms."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sagas.definitions import SagaDefinition, loads
from tests.definitions.support import REPO

DOC = REPO / "docs" / "definitions.md"


def blocks(language: str, doc: Path = DOC) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", doc.read_text(encoding="utf-8"), re.DOTALL)


@pytest.mark.parametrize("doc", [DOC, REPO / "README.md"], ids=["definitions.md", "README.md"])
def test_documented_yaml_and_python_examples_build_the_same_model(doc: Path) -> None:
    """The first YAML example loads, and the first Python example builds an equal model (the same digest)."""
    from_yaml = loads(blocks("yaml", doc)[0], str(doc))
    namespace: dict[str, object] = {}
    exec(compile(blocks("python", doc)[0], str(doc), "exec"), namespace)  # the doc's own example code
    (from_python,) = [value for value in namespace.values() if isinstance(value, SagaDefinition)]
    assert from_python == from_yaml
    assert from_python.digest == from_yaml.digest
