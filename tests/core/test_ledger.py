"""Ledger: which gradient messages a pass still waits for."""

from actorgrad.core.ledger import Arrival, Ledger


def test_complete_only_when_every_edge_of_every_output_arrived():
    led = Ledger()
    led.expect(1, 0, {(5, 0), (6, 1)})
    led.expect(1, 1, {(7, 0)})
    assert not led.is_complete(1)
    assert led.arrive(1, 0, (6, 1)) is Arrival.NEW
    assert led.arrive(1, 1, (7, 0)) is Arrival.NEW
    assert led.missing(1) == [(1, 0, (5, 0))]
    assert led.arrive(1, 0, (5, 0)) is Arrival.NEW
    assert led.is_complete(1) and led.missing() == []


def test_duplicates_and_strangers_are_reported_not_counted():
    led = Ledger()
    led.expect(1, 0, {(5, 0), (6, 0)})
    assert led.arrive(1, 0, (5, 0)) is Arrival.NEW
    assert led.arrive(1, 0, (5, 0)) is Arrival.DUPLICATE
    assert led.arrive(1, 0, (9, 9)) is Arrival.UNEXPECTED
    assert led.arrive(2, 0, (5, 0)) is Arrival.UNEXPECTED
    assert not led.is_complete(1)


def test_calls_keep_plan_order():
    led = Ledger()
    for c in (3, 1, 2):
        led.expect(c, 0, {(9, c)})
    assert led.calls() == [3, 1, 2]
    assert led.has_call(1) and not led.has_call(4)
