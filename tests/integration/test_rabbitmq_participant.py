"""The participant tests of tests/engine/test_participant.py that hold for any broker, run on the real RabbitMQ:
`sagas.participant` behaves the same over `RabbitBroker` as over the in-memory broker.

Each test gets a virtual host of its own (made and removed through the management API), so the fixed topic and
group names of those tests never meet an earlier run's queues.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from sagas.adapters.rabbitmq import RabbitBroker
from tests.engine.test_participant import (
    test_a_business_failure_that_could_not_be_recorded_is_not_recorded_as_one,
    test_a_compensation_that_failed_runs_again_when_sent_again,
    test_a_dedup_table_from_an_earlier_release_gets_its_new_columns,
    test_a_repeated_business_failure_keeps_its_reason_and_data,
    test_a_reply_the_wire_cannot_carry_rolls_its_effect_back_and_is_retryable,
)
from tests.integration.rabbitmq_support import delete_vhost, new_vhost

pytestmark = pytest.mark.rabbitmq

# Collected here, they take this module's `broker` fixture (pytest resolves fixtures where a test is collected).
__all__ = [
    "test_a_business_failure_that_could_not_be_recorded_is_not_recorded_as_one",
    "test_a_compensation_that_failed_runs_again_when_sent_again",
    "test_a_dedup_table_from_an_earlier_release_gets_its_new_columns",
    "test_a_repeated_business_failure_keeps_its_reason_and_data",
    "test_a_reply_the_wire_cannot_carry_rolls_its_effect_back_and_is_retryable",
]
# Not here: the tests that read MemoryBroker's own `lag`, and test_an_outage_is_waited_out_not_answered, which
# counts on two commands of two sagas arriving in one fetch (here they are in two partition queues, and may come
# in two fetches; the retried batch is still whole each time).


@pytest.fixture
async def broker(amqp_url: str, amqp_management_url: str) -> AsyncIterator[RabbitBroker]:
    vhost = f"participant-{uuid.uuid4().hex[:10]}"
    await new_vhost(amqp_management_url, urlsplit(amqp_url).username or "guest", vhost)
    broker = RabbitBroker.from_url(urlunsplit(urlsplit(amqp_url)._replace(path=f"/{quote(vhost, safe='')}")))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()
        await delete_vhost(amqp_management_url, vhost)
