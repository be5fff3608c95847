"""The shipped samples run on the engine: both forms of each definition behave the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sagas.definitions import load_file, load_python
from sagas.definitions.model import SagaDefinition
from sagas.engine.state import SagaStatus, StepStatus
from sagas.engine.wire import CommandMessage
from sagas.participant import BusinessFailure, Participant
from sagas.testing import SagaHarness
from samples.order_payment import participants as orders_sample

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def travel_forms() -> list[SagaDefinition]:
    return [load_file(SAMPLES / "travel_booking" / "saga.yaml"), *load_python("samples.travel_booking.saga_dsl")]


def travel_participants(log: list[tuple[str, str]]) -> list[Participant]:
    """Airline, hotels, cars, payments, notifications. Cars refuse Mars; payments decline above 2,000."""

    def handler(name: str, reply: Any) -> Any:
        async def handle(command: CommandMessage, tx: Any) -> dict[str, Any]:
            log.append((name, command.type))
            result: dict[str, Any] = reply(command) if callable(reply) else reply
            return result
        return handle

    def car(command: CommandMessage) -> dict[str, Any]:
        if command.data["pickup"] == "Mars":
            raise BusinessFailure("no cars on Mars")
        return {"booking_id": "car-1", "price": 300}

    def charge(command: CommandMessage) -> dict[str, Any]:
        if command.data["amount"] > 2000:
            raise BusinessFailure("declined", type="payment.declined")
        return {"payment_id": "pay-1", "charged": command.data["amount"]}

    airline, hotels = Participant("airline"), Participant("hotels")
    cars, payments = Participant("cars", topic="car-rental.commands"), Participant("payments")
    notifications = Participant("notifications")
    airline.command("flight.book")(handler("airline", {"booking_id": "fl-1", "price": 500}))
    airline.compensation("flight.cancel")(handler("airline", {}))
    hotels.command("hotel.book")(handler("hotels", {"booking_id": "ht-1", "price": 400}))
    hotels.compensation("hotel.cancel")(handler("hotels", {}))
    cars.command("car.rent")(handler("cars", car))
    cars.compensation("car.cancel_rental")(handler("cars", {}))
    payments.command("payment.charge")(handler("payments", charge))
    notifications.command("itinerary.send")(handler("notifications", {"sent": True}))
    return [airline, hotels, cars, payments, notifications]


def trip(pickup: str = "Lisbon", nights: int = 2) -> dict[str, Any]:
    return {"traveller_id": "t-1", "currency": "EUR", "flight": {"number": "TP1", "date": "2027-01-02"},
            "hotel": {"id": "h-9", "check_in": "2027-01-02", "nights": nights},
            "car": {"location": pickup, "days": 3}}


@pytest.mark.parametrize("form", [0, 1], ids=["yaml", "dsl"])
async def test_travel_booking_completes_with_the_parallel_prices_summed(form: int) -> None:
    """All three bookings run as one parallel stage; the charge is their summed price; the itinerary goes out."""
    log: list[tuple[str, str]] = []
    async with SagaHarness([travel_forms()[form]], travel_participants(log)) as h:
        saga_id = await h.start("travel_booking", trip())
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPLETED
        assert inst.steps["charge_payment"].output == {"payment_id": "pay-1", "charged": 1200}
        sent = [e.entry.step for e in await h.history(saga_id) if e.entry.type == "step.sent"]
        assert set(sent[:3]) == {"book_flight", "book_hotel", "book_car"}  # sent together, before the charge
        assert sent[3:] == ["charge_payment", "send_itinerary"]


@pytest.mark.parametrize("form", [0, 1], ids=["yaml", "dsl"])
async def test_one_refused_booking_cancels_the_other_two_together(form: int) -> None:
    """When the car is refused, flight and hotel are cancelled (in one stage) and nothing is charged."""
    log: list[tuple[str, str]] = []
    async with SagaHarness([travel_forms()[form]], travel_participants(log)) as h:
        saga_id = await h.start("travel_booking", trip(pickup="Mars"))
        inst = await h.instance(saga_id)
        assert inst.status == SagaStatus.COMPENSATED
        assert inst.steps["book_car"].status == StepStatus.FAILED
        assert inst.steps["book_flight"].status == StepStatus.COMPENSATED
        assert inst.steps["book_hotel"].status == StepStatus.COMPENSATED
        assert ("payments", "payment.charge") not in log
        assert sorted(t for _, t in log if t.endswith("cancel")) == ["flight.cancel", "hotel.cancel"]


async def test_order_payment_sample_runs_in_both_forms_alike() -> None:
    """The order sample behaves identically whether it was read from YAML or built with the DSL."""
    outcomes = []
    for definition in (load_file(SAMPLES / "order_payment" / "saga.yaml"),
                       *load_python("samples.order_payment.saga_dsl")):
        async with SagaHarness([definition], list(orders_sample.ALL)) as h:
            ok = await h.start("order_payment", {"customer_id": "c", "items": [{"sku": "apple", "quantity": 1}],
                                                 "total": 10.0, "currency": "EUR"})
            declined = await h.start("order_payment", {"customer_id": "c", "items": [{"sku": "pear", "quantity": 1}],
                                                       "total": 900.0, "currency": "EUR"})
            outcomes.append([(await h.instance(i)).status for i in (ok, declined)])
    assert outcomes == [[SagaStatus.COMPLETED, SagaStatus.COMPENSATED]] * 2
