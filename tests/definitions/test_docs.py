"""The examples in docs/definitions.md are valid and say the same thing in both forms."""

from __future__ import annotations

import re

from sagas.definitions import SagaDefinition, loads
from tests.definitions.support import REPO

DOC = REPO / "docs" / "definitions.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def test_documented_yaml_and_python_examples_build_the_same_model() -> None:
    """The full YAML example loads, and the Python example next to it builds an equal model."""
    from_yaml = loads(blocks("yaml")[0], str(DOC))
    namespace: dict[str, object] = {}
    exec(compile(blocks("python")[0], str(DOC), "exec"), namespace)  # the doc's own example code
    (from_python,) = [value for value in namespace.values() if isinstance(value, SagaDefinition)]
    assert from_python == from_yaml
