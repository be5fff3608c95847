"""The travel-booking saga in the Python DSL: the same definition as `saga.yaml` (see its comments)."""

from __future__ import annotations

from sagas.definitions import literal, saga

TRAVEL_INPUT = {
    "type": "object",
    "required": ["traveller_id", "flight", "hotel", "car", "currency"],
    "properties": {
        "traveller_id": {"type": "string"},
        "flight": {"type": "object", "required": ["number", "date"]},
        "hotel": {"type": "object", "required": ["id", "check_in", "nights"]},
        "car": {"type": "object", "required": ["location", "days"]},
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
    },
}

travel_booking = (
    saga("travel_booking", version=1,
         description="Book flight, hotel and car together, then take payment and send the itinerary.")
    .input_schema(TRAVEL_INPUT)
    .deadline("15m")
    .parallel("bookings")
        .step("book_flight")
            .invoke("airline", "flight.book", {"traveller_id": "input.traveller_id",
                                               "flight": "input.flight"})
            .replies(failure=["flight.sold_out"])
            .timeout("20s")
            # Keyed by the saga id, not the booking's reply: a booking that timed out is cancelled too, and it
            # has no reply (`sagas explore` reports a compensation that reads one).
            .with_compensation("flight.cancel", {
                "traveller_id": "input.traveller_id",
                "reference": "saga.id",
            })
        .step("book_hotel")
            .invoke("hotels", "hotel.book", {"traveller_id": "input.traveller_id", "hotel": "input.hotel"})
            .replies(failure=["hotel.no_vacancy"])
            .with_compensation("hotel.cancel", {"reference": "saga.id"})
        .step("book_car")
            .invoke("cars", "car.rent", {
                "traveller_id": "input.traveller_id",
                "pickup": "input.car.location",
                "days": "input.car.days",
                "insurance": literal("basic"),
            }, topic="car-rental.commands")
            .with_compensation("car.cancel_rental", {"reference": "saga.id"})
    .end_parallel()
    .step("charge_payment")
        .pivot()
        .invoke("payments", "payment.charge", {
            "traveller_id": "input.traveller_id",
            "amount": "sum([steps.book_flight.price, steps.book_hotel.price, steps.book_car.price])",
            "currency": "input.currency",
            "idempotency_key": "saga.id",
        })
        .replies(failure=["payment.declined"])
        .retry(max_attempts=5, initial_backoff="500ms", max_backoff="10s")
    .step("send_itinerary")
        .retriable()
        .invoke("notifications", "itinerary.send", {
            "traveller_id": "input.traveller_id",
            "flight": "steps.book_flight.booking_id",
            "hotel": "steps.book_hotel.booking_id",
            "car": "steps.book_car.booking_id",
            "payment": "steps.charge_payment.payment_id",
        })
        .retry(max_attempts=100, initial_backoff="2s", max_backoff="5m", jitter=0.3)
    .build()
)
