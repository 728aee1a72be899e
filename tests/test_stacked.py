"""Stacked training (heads/stacked.py): each member of one stacked pass ends like the same model trained alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads.config import ConfigError
from heads.stacked import DropoutSite, SeedStacks, draw_mask, stack_problem, train_stacked
from heads.train import train_heads

from heads_fixtures import splits, tiny_model, tiny_train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return splits(64, 32)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def _assert_same_run(alone, stacked) -> None:
    assert stacked.best_epoch == alone.best_epoch
    assert stacked.threshold == pytest.approx(alone.threshold, abs=1e-9)
    assert stacked.stopped_early == alone.stopped_early
    assert len(stacked.history) == len(alone.history)
    for k in ("macro_f1", "f1_ah", "f1_noah", "ap", "accuracy"):
        assert stacked.val_metrics[k] == pytest.approx(alone.val_metrics[k], abs=1e-6), k
    for ha, hb in zip(alone.history, stacked.history):
        assert hb.val_macro_f1 == pytest.approx(ha.val_macro_f1, abs=1e-6)
        assert hb.train_loss == pytest.approx(ha.train_loss, rel=1e-5)
        assert hb.val_loss == pytest.approx(ha.val_loss, rel=1e-5)
        assert hb.lr == pytest.approx(ha.lr, rel=1e-9)
    assert _max_diff(alone.model, stacked.model) < 1e-4


def test_each_stacked_member_ends_like_its_model_trained_alone(data):
    train, val = data
    mc = tiny_model(train)
    # seed 1 with patience 1 stops at epoch 2 and leaves the stack, keeping its best state; seed 0 has its own
    # label smoothing, seed 2 its own alpha (validation blend).
    cfgs = [tiny_train(seed=1, epochs=5, patience=1), tiny_train(seed=0, epochs=5, label_smoothing=0.1),
            tiny_train(seed=2, epochs=5, alpha=0.3)]
    alone = [train_heads(train, val, mc, c) for c in cfgs]
    stacked = train_stacked(train, val, mc, cfgs)
    assert len({len(r.history) for r in alone}) > 1          # the early stop really happened mid-stack
    for a, s, c in zip(alone, stacked, cfgs):
        assert s.train_config is c and s.completed
        _assert_same_run(a, s)
    # The comparison can fail: members with another seed end far apart (a seed swap would be caught).
    assert _max_diff(alone[1].model, stacked[2].model) > 1e-2
    assert [h.val_macro_f1 for h in alone[1].history] != [h.val_macro_f1 for h in stacked[2].history]


def test_stacked_models_without_text_head(data):
    train, val = data
    mc = tiny_model(train, "va")
    cfgs = [tiny_train(seed=s, epochs=3) for s in (5, 6)]
    for a, s in zip([train_heads(train, val, mc, c) for c in cfgs], train_stacked(train, val, mc, cfgs)):
        _assert_same_run(a, s)


def test_dropout_masks_are_the_ones_nn_dropout_draws():
    site = DropoutSite("ffn.3", 0.3, 7)
    torch.manual_seed(123)
    ref = F.dropout(torch.ones(5, 7), 0.3, training=True)
    assert torch.equal(draw_mask(torch.Generator().manual_seed(123), 5, site), ref)
    assert not torch.equal(draw_mask(torch.Generator().manual_seed(124), 5, site), ref)


def test_only_compatible_configurations_stack(data):
    train, _ = data
    mc = tiny_model(train)
    assert stack_problem([mc, mc], [tiny_train(seed=0), tiny_train(seed=1, patience=2, alpha=0.2)]) is None
    assert "lr" in stack_problem([mc, mc], [tiny_train(), tiny_train(lr=1e-4)])
    assert "model" in stack_problem([mc, tiny_model(train, "va")], [tiny_train(), tiny_train()])
    assert "unfreeze_top" in stack_problem([mc], [tiny_train(unfreeze_top=2)])
    with pytest.raises(ConfigError, match="one stack"):
        train_stacked(train, train, mc, [tiny_train(), tiny_train(epochs=2)])


def test_seed_stacks_train_later_seeds_with_the_first_and_hand_them_out(data):
    train, val = data
    mc = tiny_model(train, "va")
    epochs = []
    stacks = SeedStacks(train, val, on_epoch=lambda rec, prog: epochs.append(rec.epoch))
    first = stacks.take("va", mc, tiny_train(seed=7, epochs=2), [8])
    assert first is not None and first.train_config.seed == 7 and set(stacks.ready) == {("va", 8)}
    assert epochs == [1, 2]                                   # one progress call per epoch of the stack
    later = stacks.take("va", mc, tiny_train(seed=8, epochs=2), [])
    assert later.train_config.seed == 8 and not stacks.ready
    _assert_same_run(train_heads(train, val, mc, tiny_train(seed=8, epochs=2)), later)
    assert stacks.take("va", mc, tiny_train(seed=9, epochs=2), []) is None       # nothing to stack with


def test_bench_reports_the_ratio_with_both_times_and_renders_its_row(data):
    from ahbench.stacked import stacked_goal_rows, stacked_vs_sequential

    train, val = data
    r = stacked_vs_sequential(train, val, tiny_model(train, "va"), [tiny_train(seed=s, epochs=2) for s in (0, 1)],
                              "cpu")
    assert r["stacked_vs_sequential"] == pytest.approx(r["stacked_s"] / r["sequential_s"])
    assert r["models"] == 2 and r["max_val_macro_f1_diff"] < 1e-6
    rows = stacked_goal_rows({"ablate": r | {"heads": "tiny heads", "ablate_3_seeds_s": None}})
    assert len(rows) == 1 and "not measured" in rows[0][1] and f"{r['stacked_vs_sequential']:.2f}" in rows[0][1]
    gpu = stacked_goal_rows({"ablate": r | {"ablate_3_seeds_s": 100.0}})
    assert gpu[0][2] == "yes" and "measured 100.0 s" in gpu[0][1]
    assert stacked_goal_rows({"ablate": None}) == []
