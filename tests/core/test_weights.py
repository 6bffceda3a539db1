"""Weight versions: stashes shared per version and freed with their last call; snapshots for staleness."""

import torch

from actorgrad.core import messages as m
from actorgrad.core.calls import CallState
from actorgrad.core.rules import Updater
from actorgrad.core.weights import WeightVersions


def setup(staleness=0, stashes=True):
    mod = torch.nn.Linear(2, 1)
    up = Updater("w", mod, torch.optim.SGD(mod.parameters(), lr=0.1))
    return mod, up, WeightVersions(mod, up, staleness, stashes)


def call(step=1, save=True):
    return CallState(m.Forward(1, step * 10, step, [], {}, (), save))


def test_calls_of_one_version_share_one_stash_freed_with_the_last():
    mod, up, w = setup()
    a, b = call(), call()
    pa, pb = w.for_forward(a), w.for_forward(b)
    assert pa is pb and a.version == 0 and w.stats()["stashed_versions"] == 1
    with torch.no_grad():
        mod.weight.add_(1.0)
    assert not torch.equal(pa["weight"], mod.weight)  # the copy stays as the forward saw it
    w.release(a)
    assert w.stats()["stashed_versions"] == 1
    w.release(b)
    assert w.stats()["stashed_versions"] == 0 and a.version is None


def test_no_stash_without_need_or_without_saving():
    _, _, w = setup(stashes=False)
    assert w.for_forward(call()) is None
    _, _, w = setup(stashes=True)
    assert w.for_forward(call(save=False)) is None


def test_a_forward_uses_the_snapshot_taken_k_plus_one_steps_before():
    mod, up, w = setup(staleness=1)
    assert list(w.snapshots) == [0]
    for step in (1, 2):
        with torch.no_grad():
            mod.weight.add_(1.0)
        up.version += 1
        w.committed(step)
    c = call(step=3)
    params = w.for_forward(c)
    assert c.snapshot == 1 and params is w.snapshots[1] and w.version_of(c) == 1
    assert w.forward_version(c) == -2
    assert 0 not in w.snapshots  # no forward of step >= 3 can need the initial weights
    w.release(c)
    assert w.snapshot_refs[1] == 0


def test_state_round_trips_the_snapshots_with_versions_bumped_by_the_load():
    _, up, w = setup(staleness=1)
    w.committed(1)
    state = w.state()
    _, up2, w2 = setup(staleness=1)
    w2.loaded(state, torch.device("cpu"))
    assert sorted(w2.snapshots) == [0, 1] and w2.snapshots[0].version == 1
    w2.loaded(None, torch.device("cpu"))
    assert list(w2.snapshots) == [1]
