"""Recovery alone: what a death means for its tasks, the back-off of replacements, and when the tier breaks."""

from __future__ import annotations

from mp_tier.recovery import BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS, MAX_STARTUP_DEATHS, STARTUP_WINDOW_SECONDS, Recovery


def test_a_lost_task_is_retried_once_then_fails():
    recovery = Recovery()
    assert recovery.lost([1, 2]) == ([1, 2], [])
    assert recovery.lost([2, 3]) == ([3], [2])
    assert recovery.failure_code(2) == "EOWNERDEAD"


def test_a_completed_task_starts_afresh():
    recovery = Recovery()
    recovery.lost([5])
    recovery.completed(5)
    assert recovery.lost([5]) == ([5], [])


def test_a_task_killed_for_its_deadline_fails_with_etimedout():
    recovery = Recovery()
    recovery.timed_out.add(4)
    assert recovery.failure_code(4) == "ETIMEDOUT"
    recovery.completed(4)
    assert recovery.failure_code(4) == "EOWNERDEAD"


def test_a_ready_worker_is_replaced_at_once_and_resets_the_count():
    recovery = Recovery()
    recovery.died(0, True, 0.0, "boot failed")
    assert recovery.died(1, False, 1.0, "SIGKILL") == 0.0
    assert recovery.startup_deaths == 0 and recovery.restart_at[1] == 1.0


def test_deaths_at_start_back_off_doubling_to_a_cap():
    recovery = Recovery()
    delays = [recovery.died(0, True, 0.01 * i, "boot failed") for i in range(8)]
    expected = [min(BACKOFF_FIRST_SECONDS * 2**i, BACKOFF_MAX_SECONDS) for i in range(8)]
    assert delays == expected and delays[-1] == BACKOFF_MAX_SECONDS


def test_the_tier_breaks_only_after_enough_deaths_over_the_whole_window():
    quick = Recovery()
    for i in range(MAX_STARTUP_DEATHS * 3):
        quick.died(0, True, 0.1 * i / MAX_STARTUP_DEATHS, "boot failed")
    assert quick.broken is None, "many deaths in a short time are not yet a broken tier"
    slow = Recovery()
    for i in range(MAX_STARTUP_DEATHS - 1):
        slow.died(0, True, i * STARTUP_WINDOW_SECONDS, "boot failed")
    assert slow.broken is None, "a long window with few deaths is not either"
    slow.died(0, True, MAX_STARTUP_DEATHS * STARTUP_WINDOW_SECONDS, "exec failed: ENOENT")
    assert slow.broken is not None and slow.broken.startswith(f"{MAX_STARTUP_DEATHS} workers in a row died while starting")
    assert slow.broken.endswith("last: exec failed: ENOENT")


def test_due_hands_out_replacements_in_time_and_within_room():
    recovery = Recovery()
    for index in range(3):
        recovery.died(index, False, 0.0, "SIGKILL")
    recovery.died(3, True, 0.0, "boot failed")
    assert recovery.next_restart() == 0.0
    assert recovery.due(0.0, 2) == [0, 1]
    assert recovery.due(0.0, 0) == [] and recovery.due(0.0, -1) == []
    assert recovery.due(0.0, 5) == [2]
    assert recovery.next_restart() == BACKOFF_FIRST_SECONDS
    assert recovery.due(BACKOFF_FIRST_SECONDS, 5) == [3] and recovery.next_restart() is None
