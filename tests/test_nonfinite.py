"""A NaN or Inf is found at the op that first produces it, padded rows included: padded positions
are left out of the metrics, but a NaN there spreads into real rows one layer later (0 * NaN)."""

import numpy as np
import pytest
from conftest import small_model

from celerinfer_lab import compare, load_native
from celerinfer_lab.native import edit_source


@pytest.mark.parametrize("kernels", ["readable", "fast"])
def test_nan_born_in_padded_rows_is_the_culprit(cpp_copy, kernels):
    # The classic bug MiniMind's -1e9 avoids: padded keys masked with -inf. A left-padded query
    # whose every visible key is padding then gets softmax(-inf, ...) = NaN, in a padded row only.
    header, old = {
        "readable": ("ops.hpp", "if (mask[size_t(b) * d.P + j] == 0) s += -1e9f;"),
        "fast": ("fast.hpp", "if (key_mask[j] == 0) s[j] += -1e9f;"),
    }[kernels]
    edit_source(cpp_copy / "include/celerinfer" / header, old, old.replace("-1e9f", "-INFINITY"))
    model = small_model(batch_size=2, seq_len=8, padding="left")
    report = compare(model, load_native(cpp_copy), kernels=kernels)
    probs = report.point("model.layers.0.self_attn.probs")
    assert report.culprit is probs, report.to_text()
    assert "NaN/Inf in padded rows" in probs.note
    # Real rows of layer 0 are still right: the NaN had not reached them yet.
    assert np.isfinite(report.runs["cpp"]["model.layers.0.self_attn.context"][model.attention_mask.astype(bool)]).all()
    assert "padded" in (report.diagnosis or ""), report.diagnosis
    assert not report.agrees and np.isnan(report.runs["cpp"]["lm_head"]).any()  # and it does spread
