"""Recovery alone: what a death means for its tasks, the back-off of replacements, and when the tier breaks."""

from __future__ import annotations

import errno

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
    recovery.died(0, True, 0.0, "boot failed", serving=False)
    assert recovery.died(1, False, 1.0, "SIGKILL", serving=False) == 0.0
    assert recovery.startup_deaths == 0 and recovery.restart_at[1] == 1.0


def test_deaths_at_start_back_off_doubling_to_a_cap():
    recovery = Recovery()
    delays = [recovery.died(0, True, 0.01 * i, "boot failed", serving=False) for i in range(8)]
    expected = [min(BACKOFF_FIRST_SECONDS * 2**i, BACKOFF_MAX_SECONDS) for i in range(8)]
    assert delays == expected and delays[-1] == BACKOFF_MAX_SECONDS


def test_the_tier_breaks_only_after_enough_deaths_over_the_whole_window():
    quick = Recovery()
    for i in range(MAX_STARTUP_DEATHS * 3):
        quick.died(0, True, 0.1 * i / MAX_STARTUP_DEATHS, "boot failed", serving=False)
    assert quick.broken is None, "many deaths in a short time are not yet a broken tier"
    slow = Recovery()
    for i in range(MAX_STARTUP_DEATHS - 1):
        slow.died(0, True, i * STARTUP_WINDOW_SECONDS, "boot failed", serving=False)
    assert slow.broken is None, "a long window with few deaths is not either"
    slow.died(0, True, MAX_STARTUP_DEATHS * STARTUP_WINDOW_SECONDS, "exec failed: ENOENT", serving=False)
    assert slow.broken is not None and slow.broken.startswith(f"{MAX_STARTUP_DEATHS} workers in a row died while starting")
    assert slow.broken.endswith("last: exec failed: ENOENT")


def test_due_hands_out_replacements_in_time_and_within_room():
    recovery = Recovery()
    for index in range(3):
        recovery.died(index, False, 0.0, "SIGKILL", serving=False)
    recovery.died(3, True, 0.0, "boot failed", serving=False)
    assert recovery.next_restart() == 0.0
    assert recovery.due(0.0, 2) == [0, 1]
    assert recovery.due(0.0, 0) == [] and recovery.due(0.0, -1) == []
    assert recovery.due(0.0, 5) == [2]
    assert recovery.next_restart() == BACKOFF_FIRST_SECONDS
    assert recovery.due(BACKOFF_FIRST_SECONDS, 5) == [3] and recovery.next_restart() is None


def test_a_live_worker_keeps_the_tier_from_breaking_however_many_die_at_start():
    recovery = Recovery()
    for i in range(MAX_STARTUP_DEATHS * 3):
        recovery.died(0, True, i * STARTUP_WINDOW_SECONDS, "boot failed", serving=True)
    assert recovery.broken is None


def test_a_spawn_short_of_a_resource_backs_off_and_never_breaks_the_tier():
    recovery = Recovery()
    shortage = OSError(errno.EMFILE, "Too many open files")
    delays = [recovery.spawn_failed(0, shortage, i * STARTUP_WINDOW_SECONDS, "no fds", serving=False) for i in range(MAX_STARTUP_DEATHS * 3)]
    assert recovery.broken is None and delays[-1] == BACKOFF_MAX_SECONDS
    assert recovery.spawned() == MAX_STARTUP_DEATHS * 3 and recovery.shortage is None


def test_a_spawn_that_fails_for_good_is_a_death_at_start():
    recovery = Recovery()
    missing = OSError(errno.ENOENT, "No such file or directory")
    for i in range(MAX_STARTUP_DEATHS):
        recovery.spawn_failed(0, missing, i * STARTUP_WINDOW_SECONDS, "no interpreter", serving=False)
    assert recovery.broken is not None and recovery.broken.endswith("last: no interpreter")


def test_jobs_wait_out_a_shortage_only_for_the_limit_without_any_worker():
    recovery = Recovery()
    shortage = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    recovery.spawn_failed(0, shortage, 0.0, "no processes", serving=False)
    assert recovery.unserved(0.0, workers_up=False, limit=3.0) is None
    assert recovery.unserved(2.9, workers_up=False, limit=3.0) is None
    assert recovery.unserved(3.0, workers_up=False, limit=3.0) is shortage
    assert recovery.unserved(3.1, workers_up=True, limit=3.0) is None, "a worker up ends the wait"
    assert recovery.unserved(9.0, workers_up=False, limit=3.0) is None, "and the clock starts again"
