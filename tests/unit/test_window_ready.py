"""When a window of an asyncio process may be linked: not before every span that overlaps it has
been sent. Requests overlap, so a short request that started after the window can be sent while a
long one that overlaps the window is still open (seen: 8 of 112 lock requests lost the part of
their time in the window before)."""

from agent.awaits import AwaitPoller

PID = 42


def poller(polls) -> AwaitPoller:
    p = AwaitPoller()
    p._procs[PID] = (None, None)      # watched (never started: no thread, no process read)
    p._open[PID] = [(t, frozenset(tasks)) for t, tasks in polls]
    return p


def test_waits_until_every_task_open_at_the_windows_end_has_ended_its_span():
    p = poller([(90, {1, 2}), (110, {1, 2, 3}), (120, {2, 3, 4}), (130, {3, 4}), (140, set())])
    # at 100 (the window's end) tasks 1 and 2 were open; 3 may have been (it is there at 110,
    # the first poll after); 4 came later and does not count
    assert p.settled_at(PID, 100) == 140
    assert p.settled_at(PID, 115) == 140      # 2, 3, 4 at 120: all gone at 140
    p._open[PID][3] = (130, frozenset({4}))
    assert p.settled_at(PID, 100) == 130
    assert p.settled_at(PID, 150) == 150      # nothing open at the last poll, before it: no wait


def test_not_known_until_a_poll_shows_them_gone():
    p = poller([(90, {1}), (110, {1, 2}), (120, {1})])
    assert p.settled_at(PID, 100) is None
    p._open[PID].append((130, frozenset({5})))
    assert p.settled_at(PID, 100) == 130


def test_a_process_without_tasks_or_not_polled_does_not_wait():
    p = poller([])
    assert p.settled_at(PID, 100) == 100
    assert p.settled_at(PID + 1, 100) == 100   # not watched (py-spy source, or exited)
    p = poller([(110, set())])
    assert p.settled_at(PID, 100) == 110       # ... spans that ended before 110: come first


def test_the_open_task_history_is_bounded_without_prunes():
    """attach and record never prune: a long recording of a busy asyncio app must not grow."""
    import agent.awaits as awaits
    p = AwaitPoller()
    p._procs[PID] = (None, None)
    for i in range(awaits.MAX_POLLS + 500):
        p._record_open(PID, i, [1, 2, i])
    assert len(p._open[PID]) == awaits.MAX_POLLS
    assert p._open[PID][-1] == (awaits.MAX_POLLS + 499, frozenset({1, 2, awaits.MAX_POLLS + 499}))
    assert p.settled_at(PID, awaits.MAX_POLLS + 400) is None  # 1 and 2 never ended
