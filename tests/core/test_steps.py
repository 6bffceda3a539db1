"""The step lifecycle: phases, the one transition table, and the table of live and ended steps."""

import pytest

from actorgrad.core import messages as m
from actorgrad.core.steps import TRANSITIONS, EndedSteps, IllegalTransition, Phase, StepState, StepTable


def close(step, req=1):
    return m.Close(req, step, (), (), ())


def test_the_happy_path_is_open_closing_ready_committing_closed():
    t = StepTable()
    st = t.open(3)
    assert st.phase is Phase.OPEN and t.open(3) is st
    t.on_close(close(3), now=1.0)
    assert st.phase is Phase.CLOSING and st.close_since == 1.0 and t.has_close()
    assert not t.on_commit(3)  # not ready yet: nothing to commit
    st.to(Phase.READY)
    assert t.on_commit(3) and st.phase is Phase.COMMITTING
    assert t.end(3, Phase.CLOSED) is st and st.phase is Phase.CLOSED
    assert t.get(3) is None and t.ended(3) and 3 in t.closed and 3 not in t.aborted


def test_illegal_transitions_are_refused():
    st = StepState(1)
    with pytest.raises(IllegalTransition):
        st.to(Phase.READY)  # READY only after CLOSING
    st.to(Phase.ABORTED)
    for phase in Phase:
        with pytest.raises(IllegalTransition):
            st.to(phase)  # final


def test_every_live_phase_may_abort_and_final_phases_go_nowhere():
    for phase, nexts in TRANSITIONS.items():
        final = phase in (Phase.CLOSED, Phase.ABORTED)
        assert (Phase.ABORTED in nexts) is not final and (not nexts) is final


def test_end_without_remembering_frees_the_step_but_does_not_mark_it_ended():
    t = StepTable()
    t.open(2)
    t.end(2, Phase.ABORTED, remember=False)
    assert t.get(2) is None and not t.ended(2)
    t.end(5, Phase.ABORTED)  # a step never seen here is still remembered as ended
    assert 5 in t.aborted


def test_has_close_and_the_staleness_gate():
    t = StepTable()
    for s in (4, 1):
        t.open(s)
    assert not t.has_close()
    t.on_close(close(4, 4), 0.0)
    assert t.has_close() and t.get(4).close.req == 4
    assert t.oldest_open_below(2) and not t.oldest_open_below(1)


def test_top_step_only_grows():
    t = StepTable()
    t.seen(5)
    t.seen(3)
    assert t.top_step == 5


def test_ended_steps_stay_bounded_and_remember_everything_below_the_floor():
    ended = EndedSteps()
    for s in range(1, 3000):
        ended.add(s)
    assert len(ended.recent) <= EndedSteps.LIMIT and ended.floor > 0
    assert 1 in ended and 2999 in ended and 3000 not in ended and "x" not in ended
