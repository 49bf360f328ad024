"""logits_to_keep (MiniMind's forward argument): lm_head over the last L positions only, on both sides.

Generation reads the last position's logits only, so its prefill asks for those (lm_head over every
prompt position was ~12% of a minimind2-small prefill). The kept logits must be the full forward's
last L rows (bit for bit from the float32 kernel sets), and the trace covers the kept lm_head as it
covers the full one.
"""

import numpy as np
import pytest
import torch
from conftest import small_model

from celerinfer_lab import reference_forward
from celerinfer_lab.errors import UsageError
from celerinfer_lab.metrics import live_rows
from celerinfer_lab.reference import ReferenceModel, greedy_generate
from celerinfer_lab.trace import kept_positions, trace_points

LOGITS_REL_L2 = 1e-5  # as test_native.py: the C++ against the float32 reference


@pytest.mark.parametrize("kernels", ["readable", "fast", "bf16", "q8"])
@pytest.mark.parametrize("batch, seq_len, keep", [(1, 7, 1), (2, 7, 1), (3, 9, 4), (2, 5, 5), (2, 5, 9)])
def test_kept_logits_are_the_full_forwards_last_rows(native, kernels, batch, seq_len, keep):
    model = small_model(batch_size=batch, seq_len=seq_len, padding="left" if batch > 1 else "none")
    prepared = native.prepare(model, kernels)
    full = prepared.forward(trace=True)
    kept = prepared.forward(trace=True, logits_to_keep=keep)
    L = kept_positions(seq_len, keep)
    assert kept.logits.shape == (batch, L, model.config.vocab_size)
    last = full.logits[:, seq_len - L :]
    if kernels in ("readable", "fast"):  # each logit computed the same way whatever the row count
        np.testing.assert_array_equal(kept.logits, last)
    else:  # a few rows take the GEMV, which sums in another order: float32 rounding apart
        assert np.abs(kept.logits - last).max() <= 8 * np.finfo(np.float32).eps * np.abs(last).max()
    # the trace: every point as the full forward's, lm_head the kept logits
    assert list(kept.trace) == list(full.trace)
    for name, value in kept.trace.items():
        expected = kept.logits if name == "lm_head" else full.trace[name]
        np.testing.assert_array_equal(value, expected, err_msg=name)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_both_sides_keep_the_same_positions_and_agree(native, padding):
    model = small_model(batch_size=3, seq_len=8, padding=padding, qk_norm=True)
    cpp = native.forward(model, trace=True, logits_to_keep=3)
    ref = reference_forward(model, trace=True, logits_to_keep=3)
    assert [(k, v.shape) for k, v in cpp.trace.items()] == [(k, v.shape) for k, v in ref.trace.items()]
    shapes = {p.name: p.shape for p in trace_points(model.config, 3, 8, logits_to_keep=3)}
    assert {k: v.shape for k, v in ref.trace.items()} == shapes and shapes["lm_head"] == (3, 3, 128)
    # MiniMind's slice (float64: MKL's float32 GEMM sums a 3-row product in another order than a 24-row one)
    kept64, full64 = (reference_forward(model, torch.float64, logits_to_keep=k).logits for k in (3, 0))
    np.testing.assert_allclose(kept64, full64[:, -3:], rtol=1e-12, atol=1e-12)
    # the real positions among the kept ones (live_rows takes the mask's last 3 columns)
    real_cpp = live_rows(cpp.logits, 1, model.attention_mask)
    real_ref = live_rows(ref.logits, 1, model.attention_mask)
    assert len(real_ref) == int(model.attention_mask[:, -3:].sum()) > 0
    assert np.linalg.norm(real_cpp - real_ref) / np.linalg.norm(real_ref) <= LOGITS_REL_L2


def test_a_teacher_for_the_kept_lm_head(native):
    model = small_model(batch_size=2, seq_len=6)
    ref = reference_forward(model, trace=True, logits_to_keep=2)
    cpp = native.forward(model, teacher=ref.trace, logits_to_keep=2)
    assert cpp.trace["lm_head"].shape == (2, 2, 128)
    with pytest.raises(
        UsageError, match=r"teacher value 'lm_head' has shape \[2, 2, 128\]; the trace point's shape is \[2, 6, 128\]"
    ):
        native.forward(model, teacher={"lm_head": ref.trace["lm_head"]})


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1", None])
def test_bad_logits_to_keep_is_named_on_both_sides(native, bad):
    model = small_model()
    for forward in (
        lambda: native.forward(model, logits_to_keep=bad),
        lambda: reference_forward(model, logits_to_keep=bad),
    ):
        with pytest.raises(UsageError, match=r"logits_to_keep=.*a whole number >= 0"):
            forward()


def test_generation_prefills_with_the_last_positions_logits_only(native, monkeypatch):
    """Both sides' greedy generation ask for the last position only, and still choose the tokens the
    full logits choose (decode_steps keeps every position: the debugger's steps)."""
    from celerinfer_lab.native import NativeModel

    model = small_model(batch_size=2, seq_len=6, padding="left")
    prepared = native.prepare(model, "fast")
    asked: list[int] = []
    run = NativeModel.run

    def recording(self, *args, **kwargs):
        asked.append(kwargs.get("logits_to_keep", 0))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(NativeModel, "run", recording)
    tokens = prepared.generate(4, on_token=lambda step, chosen: True)  # a callback: the Python loop
    assert asked == [1, 0, 0, 0]  # the prefill's last position; a step has one position anyway
    # The C++ loop (generate_greedy) passes 1 to every forward: the same tokens.
    np.testing.assert_array_equal(prepared.generate(4), tokens)
    steps = prepared.decode_steps(tokens[:, :-1])
    assert [r.logits.shape[1] for r in steps] == [6, 1, 1, 1]
    np.testing.assert_array_equal(np.stack([r.logits[:, -1].argmax(-1) for r in steps], axis=1), tokens)

    ref = ReferenceModel(model)
    seen: list[int] = []
    forward = ref.forward
    monkeypatch.setattr(ref, "forward", lambda *a, **k: (seen.append(k.get("logits_to_keep", 0)), forward(*a, **k))[1])
    np.testing.assert_array_equal(greedy_generate(ref, model.input_ids, model.attention_mask, 4), tokens)
    assert seen == [1, 1, 1, 1]


def test_live_rows_of_kept_positions():
    mask = np.array([[0, 1, 1, 1], [1, 1, 0, 0]])
    logits = np.arange(2 * 2 * 3).reshape(2, 2, 3)  # the last 2 positions of each row
    np.testing.assert_array_equal(live_rows(logits, 1, mask), [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(IndexError):  # a token axis longer than the mask is a caller's error, not sliced
        live_rows(np.zeros((2, 5, 3)), 1, mask)


def test_forward_commands_take_logits_to_keep(tmp_path, capsys):
    from celerinfer_lab import cli

    path = tmp_path / "m.json"
    small_model(batch_size=2, seq_len=6).save(path)
    logits = {}
    for command, name in (("torch-forward", "logits_torch.npy"), ("cpp-forward", "logits_cpp.npy")):
        for keep in (0, 2):
            out = tmp_path / f"{command}-{keep}"
            argv = [command, str(path), "--logits-to-keep", str(keep), "--dump-dir", str(out), "--warmup", "0"]
            assert cli.main([*argv, "--repeat", "1"]) == 0
            printed = capsys.readouterr().out
            assert ("logits of the last 2 positions" in printed) == (keep == 2), printed
            assert f"logits: shape [2, {keep or 6}, 128]" in printed, printed
            logits[command, keep] = np.load(out / name)
    assert logits["cpp-forward", 2].shape == logits["torch-forward", 2].shape == (2, 2, 128)
    np.testing.assert_array_equal(logits["cpp-forward", 2], logits["cpp-forward", 0][:, -2:])
    np.testing.assert_allclose(logits["cpp-forward", 2], logits["torch-forward", 2], rtol=0, atol=1e-4)
    assert cli.main(["cpp-forward", str(path), "--logits-to-keep", "-1"]) == 2
    assert "logits_to_keep=-1: the positions whose logits a forward returns" in capsys.readouterr().err
