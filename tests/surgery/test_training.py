"""The Ray-free training loop: early stopping, best weights, exact epochs, resume from a
checkpoint, and the one optimizer step every trainer shares. Milliseconds, no Ray."""

import pytest
import torch

import surgery
from pipeline.checkpoints import checkpoint_files, read_checkpoint
from surgery import (
    FineTuneConfiguration,
    TransferLearning,
    TransferLearningHelper,
)
from surgery.layers import Output
from surgery.training import Stopping, run_epochs, tensor_batches
from surgery.training import loop as training  # the module that defines the step: patched there


def _head(tiny_name, ftc):
    model = (TransferLearning(surgery.zoo.load(tiny_name)).fine_tune_configuration(ftc).set_feature_extractor("flatten")
             .remove_vertex_and_connections("fc1").add_layer("out", Output(2, loss="cross_entropy"), "flatten")
             .set_outputs("out").build())
    return model, surgery.split(model).unfrozen


def _shifted_task(n=256, seed=0):
    """Training labels follow x0; validation labels follow x0 + 2*x1, so the validation
    loss falls while the model learns x0 and rises once it grows overconfident in it."""
    g = torch.Generator().manual_seed(seed)
    x, vx = torch.randn(n, 64, generator=g), torch.randn(n, 64, generator=g)
    return (x, (x[:, 0] > 0).long()), (vx, (vx[:, 0] + 2 * vx[:, 1] > 0).long())




def _run(model, head, ftc, data, stopping, state=None, snapshots=None):
    (x, y), (vx, vy) = data
    opt, sched = ftc.build_optimizer(head), None
    sched = ftc.build_scheduler(opt, stopping.limit)
    specs = surgery.loss_specs(model)
    train = tensor_batches((x,), y, 32, seed=1)
    val = tensor_batches((vx,), vy, 64, shuffle=False)

    def on_epoch(st, metrics):
        if snapshots is not None:
            snapshots[metrics["epoch"]] = {k: v.clone() for k, v in head.state_dict().items()}

    st = run_epochs(head, opt, sched, ftc, specs, train, validation=lambda: val(0), stopping=stopping, state=state,
                    on_epoch=on_epoch)
    return st, opt, sched


def test_epochs_none_stops_by_itself_and_keeps_the_best_epochs_weights(tiny_name):
    ftc = FineTuneConfiguration(updater="adam", lr=0.05, seed=0)
    model, head = _head(tiny_name, ftc)
    snapshots = {}
    st, _, _ = _run(model, head, ftc, _shifted_task(), Stopping(epochs=None, patience=4), snapshots=snapshots)
    losses = [h["val_loss"] for h in st.history]
    assert st.stopped and len(st.history) < 200  # stopped by itself, long before the bound
    assert st.best_epoch == losses.index(min(losses)) and st.best_epoch < len(losses) - 1
    assert len(st.history) == st.best_epoch + 1 + 4  # exactly `patience` epochs without improvement
    assert losses[-1] > min(losses) + 1e-3  # the last epoch is worse than the best...
    for k, v in st.best_weights.items():  # ...and the best epoch's weights are the ones kept
        assert torch.equal(v, snapshots[st.best_epoch][k])
    assert not torch.equal(st.best_weights["out.linear.weight"], head.state_dict()["out.linear.weight"])
    assert [h["best"] for h in st.history].count(True) >= 1 and st.history[st.best_epoch]["best"]


def test_explicit_epochs_mean_exactly_that_many(tiny_name):
    ftc = FineTuneConfiguration(updater="adam", lr=0.05, seed=0)
    model, head = _head(tiny_name, ftc)
    st, _, _ = _run(model, head, ftc, _shifted_task(), Stopping(epochs=25))
    assert [h["epoch"] for h in st.history] == list(range(25)) and not st.stopped
    assert st.best_epoch < 24  # the validation loss got worse, and the run went on regardless
    st, _, _ = _run(model, _head(tiny_name, ftc)[1], ftc, _shifted_task(), Stopping(epochs=25, patience=2))
    assert st.stopped and len(st.history) == st.best_epoch + 3


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_name):
    ftc = FineTuneConfiguration(updater="nesterov", lr=0.05, momentum=0.9, l2=1e-3, seed=0)
    data = _shifted_task()
    model, straight = _head(tiny_name, ftc)
    _, first = _head(tiny_name, ftc)
    first.load_state_dict(straight.state_dict())
    whole, _, _ = _run(model, straight, ftc, data, Stopping(epochs=6))

    part, opt, sched = _run(model, first, ftc, data, Stopping(epochs=3))
    files = checkpoint_files(first, opt, sched, part)  # through the checkpoint format and back
    weights, state, opt_state, _ = read_checkpoint(lambda name: files[name])
    _, resumed = _head(tiny_name, ftc)
    resumed.load_state_dict(weights)
    opt2 = ftc.build_optimizer(resumed)
    sched2 = ftc.build_scheduler(opt2, 6)
    opt2.load_state_dict(opt_state["optimizer"])
    sched2.load_state_dict(opt_state["scheduler"])
    (x, y), (vx, vy) = data
    val = tensor_batches((vx,), vy, 64, shuffle=False)
    done = run_epochs(resumed, opt2, sched2, ftc, surgery.loss_specs(model), tensor_batches((x,), y, 32, seed=1),
                      validation=lambda: val(0), stopping=Stopping(epochs=6), state=state)
    assert [h["epoch"] for h in done.history] == list(range(6)) and done.best_epoch == whole.best_epoch
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    for k, v in whole.best_weights.items():
        assert torch.equal(done.best_weights[k], v)


def test_fit_featurized_and_the_loop_take_the_same_step(tiny_name, monkeypatch):
    ftc = FineTuneConfiguration(updater="nesterov", lr=0.1, momentum=0.9, weight_decay=1e-3, l1=1e-4, seed=5)
    calls = []
    real = training.train_step

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", counting)
    (x, y), _ = _shifted_task(n=64)
    model, head = _head(tiny_name, ftc)
    twin, twin_head = _head(tiny_name, ftc)
    twin_head.load_state_dict(head.state_dict())
    helper = TransferLearningHelper(model)
    for i in range(0, 64, 16):
        helper.fit_featurized(x[i:i + 16], y[i:i + 16])
    assert len(calls) == 4
    opt = ftc.build_optimizer(twin_head)
    run_epochs(twin_head, opt, ftc.build_scheduler(opt, 1), ftc, surgery.loss_specs(twin),
               tensor_batches((x,), y, 16, shuffle=False), stopping=Stopping(epochs=1))
    assert len(calls) == 8 and calls[-1] is twin_head
    for k, v in helper.unfrozen_graph().state_dict().items():
        torch.testing.assert_close(twin_head.state_dict()[k], v, rtol=0, atol=0)


def test_stopping_and_batches_check_their_input():
    with pytest.raises(ValueError, match="epochs must be a positive integer or None, got 0"):
        Stopping(epochs=0)
    with pytest.raises(ValueError, match="patience must be a positive integer or None, got -1"):
        Stopping(patience=-1)
    assert Stopping().limit == training.DEFAULT_MAX_EPOCHS and Stopping().effective_patience == training.DEFAULT_PATIENCE
    assert Stopping(epochs=7).effective_patience is None
    batches = tensor_batches((torch.arange(10).float()[:, None],), torch.arange(10), 4, seed=3)
    first, again, other = [torch.cat([y for _, y in batches(e)]) for e in (0, 0, 1)]
    assert torch.equal(first, again) and not torch.equal(first, other) and sorted(first.tolist()) == list(range(10))
