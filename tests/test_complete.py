"""Text in, text out: a tokenizer kept with the model file, greedy generation on both sides, and the
first divergence diagnosed (a bug with its culprit, or a near-tie that is no bug).

The model: a byte-level BPE tokenizer trained here on the shipped Coriolanus excerpt
(celerinfer_lab/data/coriolanus.txt), attached to a small random model of the same vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import small_config

from celerinfer_lab import attach_tokenizer, cli, complete, generate_model, load_tokenizer
from celerinfer_lab.errors import TokenizerError
from celerinfer_lab.faults import get_fault
from celerinfer_lab.tokenizer import CHAT_SPECIALS, save_tokenizer, tokenizer_paths, train_tokenizer

VOCAB = 384
PROMPT = "First Citizen:\nBefore we proceed"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A HF-style tokenizer folder (tokenizer.json, tokenizer_config.json with the ChatML template)."""
    folder = tmp_path_factory.mktemp("tok")
    tokenizer = train_tokenizer(vocab_size=VOCAB)
    assert tokenizer.vocab_size == VOCAB
    return save_tokenizer(tokenizer, folder)


def _model_with_tokenizer(folder, trained, name="m.json", **overrides):
    path = folder / name
    generate_model(small_config(vocab_size=VOCAB, **overrides), 1, 4, seed=5).save(path)
    attach_tokenizer(path, *trained)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, trained):
    return _model_with_tokenizer(tmp_path_factory.mktemp("model"), trained)


def test_tokenizer_round_trip_through_attach_and_load(tmp_path, trained):
    path = _model_with_tokenizer(tmp_path, trained)
    tok_file, config_file = tokenizer_paths(path)
    assert (tok_file.name, config_file.name) == ("m.tokenizer.json", "m.tokenizer_config.json")
    assert tok_file.read_text() == trained[0].read_text()  # kept as given
    tokenizer = load_tokenizer(path)
    text = "MENENIUS:\nWhat work's, my countrymen, in hand? — ünïcode too\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and max(ids) < VOCAB
    assert len(ids) < len(text.encode())  # BPE merges: fewer tokens than bytes
    assert tokenizer.eos_token == CHAT_SPECIALS[-1] and tokenizer.eos_token_id == 1
    assert tokenizer.chat_template == json.loads(trained[1].read_text())["chat_template"]
    # attached again without a config: the old config goes with it (no stale chat template)
    attach_tokenizer(path, trained[0])
    assert not config_file.exists() and load_tokenizer(path).chat_template is None


def test_complete_with_a_reduced_kernel_set(model_path, native):
    """kernels="q8": the model is quantized in memory and torch decodes on the same q8 weights."""
    result = complete(model_path, PROMPT, 8, native=native, kernels="q8", stop_at_eos=False)
    assert result.kernels == "q8" and result.identical, "\n".join(result.lines)
    assert "torch (q8 weights)" in result.lines[1]


def test_complete_with_a_bf16_kv_cache(model_path, native, capsys):
    """kv_cache="bf16" on both sides: keys and values rounded as they join each cache, the same tokens;
    the command line takes --kv-cache too."""
    result = complete(model_path, PROMPT, 8, native=native, stop_at_eos=False, kv_cache="bf16")
    assert result.identical, "\n".join(result.lines)
    assert "torch (float32, bf16 KV)" in result.lines[1]
    code = cli.main(["complete", str(model_path), "--prompt", PROMPT, "--max-new-tokens", "4", "--kv-cache", "bf16"])
    assert code == 0 and "bf16 KV" in capsys.readouterr().out


def test_attach_refuses_a_tokenizer_that_does_not_fit(tmp_path, trained):
    small = tmp_path / "small.json"
    generate_model(small_config(vocab_size=128), 1, 4).save(small)
    with pytest.raises(TokenizerError, match="384 tokens, more than the model's vocab_size 128"):
        attach_tokenizer(small, trained[0])
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "nonesuch"}}')
    with pytest.raises(TokenizerError, match="not a tokenizers tokenizer.json"):
        attach_tokenizer(small, bad)
    with pytest.raises(TokenizerError, match="chat_template does not compile"):
        attach_tokenizer(small, trained[0], {"chat_template": "{% for %}"})
    assert not tokenizer_paths(small)[0].exists()  # nothing attached by a refused call
    # a model generated again with a smaller vocabulary: its old tokenizer no longer fits
    path = _model_with_tokenizer(tmp_path, trained, "again.json")
    generate_model(small_config(vocab_size=128), 1, 4).save(path)
    with pytest.raises(TokenizerError, match="belongs to another model"):
        load_tokenizer(path)


def test_complete_gives_identical_tokens_on_both_sides(model_path, native):
    lines = []
    result = complete(model_path, PROMPT, 32, native=native, stop_at_eos=False, on_line=lines.append)
    assert result.identical and result.divergence is None
    assert len(result.cpp_ids) == len(result.torch_ids) == 32
    assert result.torch_text == result.cpp_text == load_tokenizer(model_path).decode(result.cpp_ids)
    assert lines == result.lines and len([line for line in lines if line[:4].strip().isdigit()]) == 32
    assert "≠" not in "".join(lines) and lines[-1].startswith("identical: 32 tokens")


def test_a_fault_is_found_at_the_first_divergence(model_path, capsys):
    from celerinfer_lab.native import load_native

    fault = get_fault("residual_added_twice")
    result = complete(model_path, PROMPT, 8, native=load_native(fault=fault.name), stop_at_eos=False)
    d = result.divergence
    assert d is not None and d.verdict == "bug" and d.culprit == fault.culprit
    assert result.torch_ids[: d.step] == result.cpp_ids[: d.step] and result.torch_ids[d.step] != result.cpp_ids[d.step]
    assert any(line.startswith(f"{d.step:4d} ≠") for line in result.lines)
    assert f"culprit: {fault.culprit}" in result.lines
    # the same on the command line: exit 1 (a bug), the culprit printed
    code = cli.main(["complete", str(model_path), "--prompt", PROMPT, "--max-new-tokens", "8", "--fault", fault.name])
    out = capsys.readouterr().out
    assert code == 1 and f"culprit: {fault.culprit}" in out and "verdict: bug" in out


def test_a_near_tie_is_reported_as_a_tie(tmp_path, trained, native):
    """Every row of an untied lm_head is one row plus noise at float32's rounding: the logits are a
    many-way tie, so the two sides pick different tokens while every op agrees within tolerance."""
    path = tmp_path / "tie.json"
    model = generate_model(small_config(vocab_size=VOCAB, tie_word_embeddings=False), 1, 4, seed=5)
    head = model.weights["lm_head.weight"]
    rng = np.random.default_rng(0)
    base = head[0].astype(np.float64)
    noise = rng.standard_normal(head.shape) * 2e-7 * np.abs(base)
    model.weights["lm_head.weight"] = (base + noise).astype(np.float32)
    model.save(path)
    attach_tokenizer(path, *trained)
    result = complete(path, PROMPT, 32, native=native, stop_at_eos=False)
    d = result.divergence
    assert d is not None, "the constructed tie did not split the two sides"
    assert d.verdict == "tie" and d.gap <= d.margin, d.summary()
    assert any(line.startswith("verdict: tie") for line in result.lines)


def test_a_choice_far_from_the_best_is_no_tie(model_path, native):
    """The companion: the same judgement on a planted choice (the C++ said to pick the worst
    token) finds every op in tolerance but a gap far above the floor: not called a tie."""
    import dataclasses

    from celerinfer_lab import load_model
    from celerinfer_lab.complete import _diagnose
    from celerinfer_lab.reference import reference_forward

    tokenizer = load_tokenizer(model_path)
    ids = np.array([tokenizer.encode(PROMPT)])
    model = dataclasses.replace(load_model(model_path), input_ids=ids, attention_mask=np.ones_like(ids))
    row = reference_forward(model).logits[0, -1]
    d = _diagnose(model, native, "fast", [], int(row.argmax()), int(row.argmin()))
    assert d.verdict == "within tolerance" and d.gap > d.margin, d.summary()
    assert "verdict: within tolerance" in d.summary()


def test_a_model_without_a_tokenizer_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bare.json"
    generate_model(small_config(vocab_size=VOCAB), 1, 4).save(path)
    code = cli.main(["complete", str(path), "--prompt", "hello"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error:") and "no tokenizer kept with this model" in err and "bare.tokenizer.json" in err


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-new-tokens", "0"], "max_new_tokens=0: must be a whole number >= 1"),
        (["--max-new-tokens", "500"], "need 503 positions; the model has max_position_embeddings=128"),
        (["--kernels", "nope"], "unknown kernel set 'nope'"),
    ],
)
def test_bad_complete_arguments_exit_2(model_path, capsys, flags, words):
    code = cli.main(["complete", str(model_path), "--prompt", "All:\n", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and words in err, err


def test_chat_template_path(model_path, tmp_path, trained, native):
    result = complete(model_path, "Who art thou?", 4, chat=True, native=native, stop_at_eos=False)
    assert result.prompt == "<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n"
    tokenizer = load_tokenizer(model_path)
    assert result.prompt_ids[0] == tokenizer.backend.token_to_id("<|im_start|>") == 0
    assert result.prompt_ids.count(1) == 1  # <|im_end|>: one special token, not its characters
    assert result.identical and len(result.cpp_ids) == 4
    # a tokenizer without a chat template: --chat is refused by name (exit 2)
    plain = _model_with_tokenizer(tmp_path, trained, "plain.json")
    attach_tokenizer(plain, trained[0])
    with pytest.raises(TokenizerError, match="no chat_template"):
        complete(plain, "hello", 2, chat=True, native=native)
    assert cli.main(["complete", str(plain), "--prompt", "hello", "--chat"]) == 2


def test_compare_decode_feeds_the_tokens_given(native):
    """complete() compares the step that diverged on the tokens both sides agreed on (feed=...)."""
    from celerinfer_lab import compare_decode
    from celerinfer_lab.errors import UsageError

    model = generate_model(small_config(), 1, 5, seed=3)
    feed = np.array([[5, 9, 5]])
    reports = compare_decode(model, native, steps=1, feed=feed)  # feed wins over steps
    assert len(reports) == 4 and all(r.agrees for r in reports)
    fed = reports[-1].runs["oracle"]["model.embed_tokens"][0, 0]
    assert np.array_equal(fed, model.weights["model.embed_tokens.weight"][5])  # the last step embedded token 5
    with pytest.raises(UsageError, match=r"feed has shape \[3\]; expected \[1, N\]"):
        compare_decode(model, native, feed=np.array([5, 9, 5]))


def test_both_sides_stop_after_the_eos_token(tmp_path, trained, native):
    """Made the eos_token the third token the model chooses, generation stops right after it."""
    path = _model_with_tokenizer(tmp_path, trained)
    free = complete(path, PROMPT, 6, native=native, stop_at_eos=False)
    eos_id = free.cpp_ids[2]
    config = {**json.loads(trained[1].read_text()), "eos_token": load_tokenizer(path).backend.id_to_token(eos_id)}
    attach_tokenizer(path, trained[0], config)
    stopped = complete(path, PROMPT, 6, native=native)
    n = free.cpp_ids.index(eos_id) + 1
    assert stopped.identical and stopped.cpp_ids == free.cpp_ids[:n] and stopped.divergence is None
    assert complete(path, PROMPT, 6, native=native, stop_at_eos=False).cpp_ids == free.cpp_ids  # --ignore-eos
