"""Definitions by name and version. A name + version always means the same content."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sagas.definitions.checks import check
from sagas.definitions.model import SagaDefinition
from sagas.definitions.source import format_path
from sagas.errors import DefinitionConflict, DefinitionError, Problem, UnknownDefinition


def verify(definition: SagaDefinition, *, where: str | None = None) -> None:
    """Run the whole-definition checks (unique step names, compensations where needed, the order of step kinds...)
    on a definition however it was made; raise `DefinitionError` with every finding. The loaders and the DSL run
    them on the source, with positions; a model built directly would otherwise reach the engine unchecked."""
    findings = check(definition.model_dump(mode="json"))
    if findings:
        file = where or f"<{definition.name} v{definition.version}>"
        raise DefinitionError([Problem(format_path(f.path), f.message, file) for f in findings])


class DefinitionRegistry:
    """Holds definitions; registering other content under a known name and version is refused."""

    def __init__(self, definitions: Iterable[SagaDefinition] = ()) -> None:
        self._by_name: dict[str, dict[int, SagaDefinition]] = {}
        for definition in definitions:
            self.register(definition)

    def register(self, definition: SagaDefinition) -> SagaDefinition:
        """Add `definition`; registering the same content again is a no-op. Returns the registered definition.

        Raises:
            DefinitionConflict: the name and version are taken by different content.
            DefinitionError: `definition` fails the checks `sagas validate` runs (one built with
                `SagaDefinition.model_validate` skips them).
        """
        known = self._by_name.get(definition.name, {}).get(definition.version)
        if known is None:
            verify(definition)  # before anything is recorded: a refused definition leaves no trace
            self._by_name.setdefault(definition.name, {})[definition.version] = definition
            return definition
        if known.digest != definition.digest:
            raise DefinitionConflict(
                f"{definition.name} v{definition.version} is already registered with digest {known.digest}; "
                f"this one has digest {definition.digest}. Changed definitions need a new version."
            )
        return known

    def get(self, name: str, version: int | None = None) -> SagaDefinition:
        """The definition `name` at `version`, or its latest version when `version` is None.

        Raises:
            UnknownDefinition: no such name, or no such version of it.
        """
        versions = self._by_name.get(name)
        if not versions:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise UnknownDefinition(f"no saga definition named {name!r} (registered: {known})")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise UnknownDefinition(
                f"{name!r} has no version {version} (registered: {', '.join(map(str, sorted(versions)))})"
            )
        return versions[version]

    def versions(self, name: str) -> tuple[int, ...]:
        return tuple(sorted(self._by_name.get(name, {})))

    def __iter__(self) -> Iterator[SagaDefinition]:
        for name in sorted(self._by_name):
            versions = self._by_name[name]
            yield from (versions[v] for v in sorted(versions))

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    def __contains__(self, item: object) -> bool:
        if isinstance(item, SagaDefinition):
            known = self._by_name.get(item.name, {}).get(item.version)
            return known is not None and known.digest == item.digest
        return isinstance(item, str) and item in self._by_name
