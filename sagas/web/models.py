"""The HTTP API's request and response bodies; the OpenAPI document is generated from them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sagas.engine.state import SagaInstance, SagaStatus, StepState, TimerSpec


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """An error, as RFC 9457 describes it (served as application/problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(None, description="For a request that fails validation: each error.")


class StartRequest(_Body):
    definition: str = Field(min_length=1, max_length=100, description="The saga definition's name.")
    input: dict[str, Any] = Field(default_factory=dict)
    key: str | None = Field(None, min_length=1, max_length=200, description="Idempotency key: one saga per key.")


class StartResult(BaseModel):
    id: str
    created: bool = Field(description="False: the key had started this saga already (same input).")
    status: SagaStatus


class BulkStartItem(BaseModel):
    index: int = Field(description="Position of the start in the request.")
    result: StartResult | None = None
    problem: Problem | None = None


class BulkStartResult(BaseModel):
    started: int
    existing: int
    failed: int
    items: list[BulkStartItem]


class SagaSummary(BaseModel):
    id: str
    definition: str
    definition_version: int
    status: SagaStatus
    stage: int
    failure: str | None
    idempotency_key: str | None
    created_at: float
    updated_at: float


class SagaPage(BaseModel):
    items: list[SagaSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null at the end.")
    total: int | None = Field(None, description="How many sagas the filter selects (when asked with total=true).")


class StepView(BaseModel):
    """A step of the saga's definition, in definition order, with where this saga stands on it."""

    name: str
    stage: int
    kind: str
    participant: str
    command: str
    compensation: str | None
    state: StepState


class HistoryItem(BaseModel):
    seq: int
    at: float
    type: str
    step: str | None
    attempt: int | None
    detail: dict[str, Any]


class HistoryPage(BaseModel):
    items: list[HistoryItem]
    next_after: int | None = Field(description="Pass as `after` for the next page; null at the end.")


class SagaDetail(BaseModel):
    instance: SagaInstance
    steps: list[StepView]
    timers: list[TimerSpec]
    history: HistoryPage


class RepairRequest(_Body):
    reason: str = Field(min_length=1, max_length=2000, description="Why: recorded in the saga's history.")


class SkipRequest(RepairRequest):
    step: str = Field(min_length=1, max_length=100)
    output: dict[str, Any] | None = Field(None, description="The step's reply data, as later steps read it.")


class SagaFilter(_Body):
    status: SagaStatus | None = None
    definition: str | None = Field(None, max_length=100)
    created_from: float | None = None
    created_to: float | None = None
    key: str | None = Field(None, max_length=200)
    reason: str | None = Field(None, max_length=200, description="Text the failure reason contains.")


class BulkRetryRequest(_Body):
    filter: SagaFilter = Field(default_factory=SagaFilter)
    confirm_count: int | None = Field(
        None, ge=0, description="Omitted: only count the parked sagas selected. Given: retry them if there are "
        "exactly this many (the count the operator confirmed).")
    reason: str = Field(min_length=1, max_length=2000)


class BulkRetryResult(BaseModel):
    count: int = Field(description="Parked sagas the filter selects.")
    retried: int
    confirmed: bool


class DeadLetterView(BaseModel):
    id: str
    reason: str
    saga_id: str | None
    at: float
    replayed_at: float | None
    topic: str
    key: str | None
    headers: dict[str, str] = Field(description="Each header's first 300 characters.")
    value: str = Field(description="A preview of the body as text: its first `preview_bytes` bytes (undecodable "
                                   "bytes replaced); GET .../body gives the stored body.")
    size: int | None = Field(description="Bytes of the body as it arrived.")
    sha256: str | None = Field(description="Hex SHA-256 of the body as it arrived; null if it was never read whole.")
    kept_bytes: int = Field(description="Bytes of the body stored (less than `size` when truncated).")
    truncated: bool = Field(description="Only a prefix of the body was stored.")
    preview_bytes: int = Field(description="Bytes of the stored body `value` shows.")


class DeadLetterPage(BaseModel):
    items: list[DeadLetterView]


class ReplayResult(BaseModel):
    id: str
    outcome: Literal["applied", "ignored"]


class DefinitionSummary(BaseModel):
    name: str
    version: int
    digest: str
    description: str
    steps: list[str]


class DefinitionCount(BaseModel):
    definition: str
    status: SagaStatus
    count: int


class Overview(BaseModel):
    counts: list[DefinitionCount]
    parked: list[SagaSummary] = Field(description="The newest parked (failed) sagas.")
    stuck: list[SagaSummary] = Field(description="Running or compensating sagas not updated for `stuck_after` s.")
    dead_letters: int = Field(description="Dead letters not replayed (up to 1000 counted).")
    started_last_minute: int
    started_last_hour: int
