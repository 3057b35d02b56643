"""Cancel requests heard on the wire, matched to tasks: bounded, whoever publishes them."""

from __future__ import annotations

from ocbridge.bridge.jetstream.cancel import CancelRegistry


async def test_a_cancel_for_a_running_task_stops_it_and_one_for_a_later_task_is_remembered():
    registry = CancelRegistry()
    running = registry.start("t1")
    assert registry.request("t1") is True and running.is_set()
    assert registry.request("t2") is False
    assert registry.start("t2").is_set()
    registry.finish("t1")
    assert registry.running == ["t2"]


async def test_a_flood_of_cancels_is_bounded():
    registry = CancelRegistry(limit=100)
    for i in range(10_000):
        registry.request(f"flood-{i}")
    assert len(registry._requested) <= 100
    assert registry.start("flood-9999").is_set()  # the newest are kept
    assert not registry.start("flood-0").is_set()
