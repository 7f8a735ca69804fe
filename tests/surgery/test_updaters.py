"""DL4J-faithful updaters: each name (ours and DL4J's) builds the documented torch
optimizer with DL4J's defaults, and a step of ``sgd`` is a step of plain ``torch.optim.SGD``."""

import pytest
import torch
from torch import nn

from freezeray.schema import SchemaError
from surgery import FineTuneConfiguration

# DL4J's name -> (torch class, settings that DL4J's defaults give it)
DL4J = {
    "Sgd": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.0, "nesterov": False}),
    "Nesterovs": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "Adam": (torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False}),
    "AdaMax": (torch.optim.Adamax, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    "Nadam": (torch.optim.NAdam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
    "AMSGrad": (torch.optim.Adam, {"lr": 1e-3, "amsgrad": True}),
    "AdaGrad": (torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-6}),
    "AdaDelta": (torch.optim.Adadelta, {"lr": 1.0, "rho": 0.95, "eps": 1e-6}),
    "RmsProp": (torch.optim.RMSprop, {"lr": 0.1, "alpha": 0.95, "eps": 1e-8, "momentum": 0.0}),
    "NoOp": (torch.optim.SGD, {"lr": 0.0, "momentum": 0.0}),
}


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _loss(net: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    return nn.functional.cross_entropy(net(x), y)


@pytest.mark.parametrize("dl4j", sorted(DL4J))
def test_each_dl4j_updater_name_builds_the_documented_optimizer(dl4j):
    cls, want = DL4J[dl4j]
    for spelling in (dl4j, dl4j.lower(), dl4j.upper()):
        opt = FineTuneConfiguration(updater=spelling).build_optimizer(_net())
        assert type(opt) is cls, (spelling, type(opt))
        for key, value in want.items():
            assert all(group[key] == pytest.approx(value) for group in opt.param_groups), (spelling, key)


def test_sgd_is_plain_sgd_one_step_equals_torch():
    ours, theirs = _net(), _net()
    opt = FineTuneConfiguration(updater="sgd", lr=0.5).build_optimizer(ours)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.5)
    for net, o in ((ours, opt), (theirs, ref)):
        for _ in range(3):  # momentum would make the 2nd and 3rd steps differ
            o.zero_grad()
            _loss(net).backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    moved = _net()
    assert not torch.equal(next(moved.parameters()), next(ours.parameters()))  # the step did something


def test_momentum_and_decay_given_are_used():
    opt = FineTuneConfiguration(updater="rmsprop", momentum=0.5, decay=0.9).build_optimizer(_net())
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["alpha"] == 0.9
    opt = FineTuneConfiguration(updater="sgd", momentum=0.9).build_optimizer(_net())
    assert opt.param_groups[0]["momentum"] == 0.9 and not opt.param_groups[0]["nesterov"]


def test_noop_changes_nothing():
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = FineTuneConfiguration(updater="NoOp", lr=0.3).build_optimizer(net)
    _loss(net).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_unknown_updater_names_the_valid_ones():
    with pytest.raises(SchemaError, match="Nesterovs"):
        FineTuneConfiguration(updater="Momentum")


def test_a_second_fine_tune_configuration_overrides_only_the_settings_given(tiny_name):
    import surgery
    from surgery import TransferLearning

    first = (TransferLearning(surgery.zoo.load(tiny_name))
             .fine_tune_configuration(FineTuneConfiguration(updater="Nesterovs", lr=0.05, weight_decay=1e-4, seed=9))
             .set_feature_extractor("flatten").build())
    second = TransferLearning(first).fine_tune_configuration(FineTuneConfiguration(lr=0.001)).build()
    config = surgery.get_info(second).fine_tune
    assert (config.updater, config.lr, config.weight_decay, config.seed) == ("nesterov", 0.001, 1e-4, 9)
