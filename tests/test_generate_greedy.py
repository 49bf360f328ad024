"""generate() without callbacks runs its greedy loop in C++ (generate_greedy, kernel_set.hpp), and
bench times that loop: it must choose exactly the tokens of the Python loop (the path generate()
takes with a callback, and the one the explorer streams), for every kernel set and padding."""

import cppyy
import numpy as np
import pytest
from conftest import small_model

from celerinfer_lab.bench import decode_cpp
from celerinfer_lab.errors import UsageError, UsageTypeError


def _python_loop(prepared, new_tokens, ids=None, mask=None):
    """generate() through its Python loop: any callback takes it there."""
    return prepared.generate(new_tokens, ids, mask, on_token=lambda step, tokens: True)


@pytest.mark.parametrize("kernels", ["readable", "fast", "bf16", "q8"])
@pytest.mark.parametrize("padding", ["none", "left", "right", "mixed"])
def test_the_cpp_loop_chooses_the_python_loops_tokens(native, kernels, padding):
    model = small_model(batch_size=3, seq_len=6, seed=11, padding=padding, use_moe=kernels == "fast")
    prepared = native.prepare(model, kernels)
    tokens, step_end = prepared.generate_timed(9)
    assert tokens.shape == (3, 9) and tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, _python_loop(prepared, 9))
    np.testing.assert_array_equal(prepared.generate(9), tokens)  # generate() without callbacks: the C++ loop
    assert step_end.shape == (9,) and np.all(np.diff(step_end) > 0) and step_end[0] > 0


def counting_model(**overrides):
    """A model whose greedy choice after token t is t + 1 (mod vocab): lm_head is the embedding shifted
    by one row, and the embedding is large beside the layers' outputs (which still flow: attention,
    its cache and the mask all run). A random model's greedy text mostly repeats one token, where a
    loop that fed a stale token would pass unseen."""
    model = small_model(batch_size=2, seq_len=4, seed=13, tie_word_embeddings=False, **overrides)
    embed = model.weights["model.embed_tokens.weight"]
    embed *= 20.0
    model.weights["lm_head.weight"] = np.roll(embed, 1, axis=0) / 20.0
    return model


@pytest.mark.parametrize("kernels", ["readable", "fast", "q8"])
def test_each_choice_is_the_argmax_after_the_tokens_before_it(native, kernels):
    model = counting_model()
    prepared = native.prepare(model, kernels)
    tokens = prepared.generate(12)
    vocab = model.config.vocab_size
    counted = (model.input_ids[:, -1:] + np.arange(1, 13)) % vocab
    np.testing.assert_array_equal(tokens, counted)  # so every step's token differs from the last
    np.testing.assert_array_equal(tokens, _python_loop(prepared, 12))
    steps = prepared.decode_steps(tokens[:, :-1])
    np.testing.assert_array_equal(np.stack([r.logits[:, -1].argmax(-1) for r in steps], axis=1), tokens)


def test_a_copy_of_the_headers_without_the_loop_falls_back_to_python(native, cpp_copy):
    """A user's copy of the C++ made before generate_greedy existed still generates (the Python loop)."""
    from celerinfer_lab import load_native
    from celerinfer_lab.errors import NativeError

    header = cpp_copy / "include" / "celerinfer" / "kernel_set.hpp"
    header.write_text(header.read_text().replace("generate_greedy(", "generate_greedy_not_yet("))
    older = load_native(cpp_copy)
    model = small_model(seed=3)
    np.testing.assert_array_equal(older.prepare(model, "fast").generate(5), native.prepare(model, "fast").generate(5))
    with pytest.raises(NativeError, match="no generate_greedy"):
        older.prepare(model, "fast").generate_timed(5)
    steps: list[float] = []  # bench's decode on such a copy: the Python loop, timed by its callbacks
    tokens, seconds = decode_cpp(older.prepare(model, "fast"), 5, steps)
    np.testing.assert_array_equal(tokens, native.prepare(model, "fast").generate(5))
    assert seconds > 0 and len(steps) == 4 and all(ms > 0 for ms in steps)


def test_a_prompt_of_its_own_and_a_single_token(native):
    model = small_model(seed=5)
    prepared = native.prepare(model, "fast")
    ids = np.array([[3, 9, 27, 4], [8, 8, 1, 2]])
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(prepared.generate(5, ids, mask), _python_loop(prepared, 5, ids, mask))
    one, _ = prepared.generate_timed(1)  # the prefill's choice alone
    np.testing.assert_array_equal(one, _python_loop(prepared, 1))


def test_argmax_takes_the_first_maximum_or_the_first_nan_as_numpy_does(native):
    rows = [
        [1.0, 3.0, 3.0, 2.0],
        [-np.inf, -np.inf, -np.inf],
        [0.5, np.nan, 9.0, np.nan],
        [np.inf, 1.0, np.inf],
        [-2.0],
    ]
    for row in rows:
        values = np.array(row, np.float32)
        got = int(getattr(cppyy.gbl, native.namespace).argmax_first(values, values.size))
        assert got == int(np.argmax(values)), row


@pytest.mark.parametrize(
    "new_tokens, error, match",
    [(0, UsageError, "need at least 1"), (2.5, UsageTypeError, "integer"), (True, UsageTypeError, "integer")],
)
def test_bad_token_counts_are_refused(native, new_tokens, error, match):
    prepared = native.prepare(small_model(), "fast")
    for call in (prepared.generate, prepared.generate_timed, lambda n: prepared.generate(n, on_token=print)):
        with pytest.raises(error, match=match):
            call(new_tokens)


def test_a_decode_longer_than_the_model_allows_is_refused(native):
    model = small_model()
    prepared = native.prepare(model, "fast")
    with pytest.raises(Exception, match="max_position_embeddings|longer"):
        prepared.generate(model.config.max_position_embeddings)
