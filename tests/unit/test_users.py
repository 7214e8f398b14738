"""The users of a pool's shared fds: the last to let go closes them, once, and a thread that begins after
that touches nothing."""

from __future__ import annotations

import threading

from mp_tier.workers import Users


def test_the_last_to_let_go_closes_once_and_then_runs_what_waited():
    done: list[str] = []
    users = Users(lambda: done.append("closed"))
    assert users.enter() and users.enter()  # two worker threads begin
    users.after(lambda: done.append("released"))
    users.let_go()  # the pool
    users.let_go()  # one thread
    assert done == []
    users.let_go()  # the last thread
    assert done == ["closed", "released"]
    users.after(lambda: done.append("late"))  # asked once all let go: runs at once
    assert done == ["closed", "released", "late"]


def test_a_thread_that_begins_after_all_let_go_is_not_a_user():
    done: list[str] = []
    users = Users(lambda: done.append("closed"))
    users.let_go()
    assert not users.enter()
    assert done == ["closed"]


def test_threads_letting_go_at_once_close_exactly_once():
    closed: list[int] = []
    users = Users(lambda: closed.append(1))
    threads = [threading.Thread(target=lambda: users.enter() and users.let_go()) for _ in range(50)]
    for thread in threads:
        thread.start()
    users.let_go()
    for thread in threads:
        thread.join()
    assert closed == [1]
