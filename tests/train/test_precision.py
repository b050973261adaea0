"""``mixed_precision=auto`` on CPUs: the decision from flags and a timed trial; bf16 and fp32 training agree."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState

from mpp.train import pretrain
from mpp.train.precision import choose_cpu_precision, decide
from tests.pretrain_runs import tiny_config


def test_the_decision_needs_native_bf16_and_a_faster_trial():
    assert decide({"avx2", "fma"}, 0.5, 0.1)[0] == "no"  # AVX2 only: never bf16, whatever a trial said
    assert decide({"amx_bf16", "avx512_bf16"}, 0.5, 0.1) == ("bf16", "bf16: amx_bf16, avx512_bf16, and the trial step "
                                                            "ran 5.00x faster than fp32")  # fmt: skip
    precision, reason = decide({"avx512_bf16"}, 0.50, 0.49)
    assert precision == "no" and "1.02x" in reason  # present but not worth it
    model = torch.nn.Linear(4, 4)
    assert choose_cpu_precision(model, lambda: model(torch.ones(2, 4)).sum(), flags={"sse2"})[0] == "no"


def _reset():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_auto_records_its_choice_and_bf16_tracks_fp32(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        pretrain.run(tiny_config(out, f"mixed_precision={precision}", "stop_at_step=16"))
        _reset()
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = torch.tensor([r["loss"] for r in records if r.get("stage") == "pretrain"])
    assert len(losses["fp32"]) == 16
    assert torch.allclose(losses["bf16"], losses["fp32"], rtol=0.05)  # bf16 rounding, not another run
    out = tmp_path / "auto"
    pretrain.run(tiny_config(out, "mixed_precision=auto", "stop_at_step=2"))
    text = (out / "config.yaml").read_text()
    assert "precision_reason:" in text and ("fp32" in text or "bf16" in text)


@pytest.mark.parametrize("flags", [{"avx2"}])
def test_a_cpu_without_bf16_is_not_timed(flags):
    calls = []
    model = torch.nn.Linear(2, 2)
    choose_cpu_precision(model, lambda: calls.append(1) or model(torch.ones(1, 2)).sum(), flags=flags)
    assert calls == []
