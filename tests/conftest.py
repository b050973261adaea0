import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so each in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def two_threads():
    torch.set_num_threads(2)


@pytest.fixture
def nan_loss(monkeypatch):
    """``nan_loss(call, once=False)``: the MAE loss is NaN from its ``call``-th computation on (or only then)."""

    def install(call: int, once: bool = False) -> None:
        import mpp.models.mae as mae

        real_loss = mae.MaskedAutoencoder.forward_loss
        calls = {"n": 0}

        def broken(self, imgs, pred, mask):
            calls["n"] += 1
            loss = real_loss(self, imgs, pred, mask)
            hit = calls["n"] == call if once else calls["n"] >= call
            return loss * float("nan") if hit else loss

        monkeypatch.setattr(mae.MaskedAutoencoder, "forward_loss", broken)

    return install
