"""The OpenAPI document kept in the repository is the one the server serves."""

from __future__ import annotations

import json
from pathlib import Path

from sagas.web.api import openapi_document
from tests.web.served import Stack

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_docs_openapi_json_is_current() -> None:
    """docs/openapi.json equals the generated document (regenerate: python -m sagas.web.api > docs/openapi.json)."""
    assert json.loads(DOC.read_text()) == openapi_document()


async def test_the_served_document_is_the_kept_one_and_declares_the_bearer_scheme(served: Stack) -> None:
    """GET /api/openapi.json serves the kept document; every operation but reads declares the bearer scheme."""
    served_doc = (await served.client.get("/api/openapi.json")).json()
    assert served_doc["paths"] == json.loads(DOC.read_text())["paths"]
    assert served_doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in served_doc["paths"].items():
        for method, operation in operations.items():
            assert operation.get("security") == [{"HTTPBearer": []}], (method, path)
