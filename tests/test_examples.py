"""The real-data examples run end to end at a reduced size (``--tiny``), in this process.

They write their curves and tables, and backprop through workers ends with the
same parameters as plain PyTorch (docs/design.md, semantics 1) on real data.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    """Import examples/<name>.py as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"actorgrad_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_digits_tiny_learns_and_writes_its_curves(tmp_path, capsys):
    out = load_example("digits").main(["--backend", "local", "--tiny", "--out", str(tmp_path)])
    assert os.path.getsize(tmp_path / "digits.png") > 0
    table = (tmp_path / "digits.md").read_text()
    assert "sklearn digits" in table and f"{out['test_acc']:.4f}" in table
    h = out["history"]
    assert len(h.train_loss) == len(h.test_acc) == 3
    assert h.train_loss[-1] < h.train_loss[0]
    assert out["test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"test accuracy: {out['test_acc']:.4f}"


def test_mnist1d_compare_tiny_all_methods(tmp_path, capsys):
    mod = load_example("mnist1d_compare")
    out = mod.main(["--backend", "local", "--tiny", "--out", str(tmp_path)])
    assert out["diff"] is not None and out["diff"] <= 1e-5
    results = out["results"]
    assert list(results) == list(mod.METHODS)
    for r in results.values():
        assert r.steps == results["plain"].steps > 0
        assert len(r.history.test_acc) == 2 and 0.0 <= r.test_acc <= 1.0
    # Exact: the same curves, not only the same final parameters.
    assert results["backprop"].history.train_loss == pytest.approx(results["plain"].history.train_loss, abs=1e-5)
    assert os.path.getsize(tmp_path / "mnist1d.png") > 0
    table = (tmp_path / "results.md").read_text()
    for r in results.values():
        assert r.label in table
    assert f"{out['diff']:.2e}" in table and "MISMATCH" not in table
    for model, acc in mod.PUBLISHED:
        assert f"| {model} | {acc} |" in table
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("test accuracy: ")


@pytest.mark.ray
def test_mnist1d_backprop_on_ray_matches_plain_pytorch(tmp_path, ray_session):
    ray_session()
    mod = load_example("mnist1d_compare")
    # One block: three actors to start, which is most of this test's time.
    out = mod.main(["--backend", "ray", "--tiny", "--depth", "1", "--methods", "plain,backprop", "--out", str(tmp_path)])
    assert out["diff"] is not None and out["diff"] <= 1e-5
    assert "backend `ray`" in (tmp_path / "results.md").read_text()


def test_mismatch_fails_the_run(tmp_path, monkeypatch):
    mod = load_example("mnist1d_compare")
    run_plain = mod.run_plain

    def perturbed(s):
        r = run_plain(s)
        r.params = {k: v + 1e-3 for k, v in r.params.items()}
        return r

    monkeypatch.setattr(mod, "run_plain", perturbed)
    with pytest.raises(SystemExit, match="does not match plain PyTorch"):
        mod.main(["--backend", "local", "--tiny", "--epochs", "1", "--methods", "plain,backprop",
                  "--out", str(tmp_path)])
    assert "MISMATCH" in (tmp_path / "results.md").read_text()


def test_steps_cut_the_last_epoch_short():
    common = load_example("_common")
    batches = common.epoch_batches(10, 3, epochs=5, seed=0, steps=6)
    assert [len(e) for e in batches] == [4, 2]
    assert sorted(int(i) for b in batches[0] for i in b) == list(range(10))  # a full epoch sees every example once
    assert [len(e) for e in common.epoch_batches(10, 3, epochs=2, seed=0)] == [4, 4]
