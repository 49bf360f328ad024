"""A small trained model (celerinfer_lab/train.py): training lowers the loss, the result is a model file
with its tokenizer, and greedy generation on it is identical on both sides for 64 tokens."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import TRAINED_STEPS

import celerinfer_lab as cl
from celerinfer_lab.errors import UsageError
from celerinfer_lab.train import small_config, train_small_model

STEPS = TRAINED_STEPS


@pytest.fixture
def trained(trained_small):
    return trained_small


def test_training_lowers_the_loss(trained):
    model, tokenizer, losses, _ = trained
    assert model.config == small_config(tokenizer.vocab_size)
    assert 800_000 < model.config.num_parameters() < 1_200_000
    # Random weights start near ln(vocab) or above; a trained model is well below where it started.
    assert losses[0] > np.log(tokenizer.vocab_size) - 0.5
    assert len(losses) == STEPS
    assert np.mean(losses[-3:]) < 0.75 * losses[0], losses


def test_the_trained_weights_are_not_the_random_ones(trained):
    model, *_ = trained
    start = cl.generate_model(model.config, batch_size=1, seq_len=64, seed=0)
    moved = [n for n in model.weights if not np.array_equal(model.weights[n], start.weights[n])]
    assert moved == list(model.weights)


def test_the_trained_model_agrees_and_generates_the_same_text(trained):
    *_, path = trained
    assert cl.compare(cl.load_model(path)).agrees
    done = cl.complete(path, "First Citizen:", max_new_tokens=64, stop_at_eos=False)
    assert len(done.torch_ids) == 64 and done.identical and done.divergence is None
    assert done.torch_text == done.cpp_text


def test_the_cli_completes_the_trained_model(trained):
    *_, path = trained
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "celerinfer_lab.cli",
            "complete",
            str(path),
            "--prompt",
            "MENENIUS:",
            "--max-new-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "MENENIUS:" in result.stdout


def test_too_little_text_is_refused(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("First Citizen: speak.")
    with pytest.raises(UsageError, match="too few"):
        train_small_model(steps=1, text_path=short, tokenizer=cl.train_tokenizer())


def test_the_train_command_writes_a_model_and_its_tokenizer(tmp_path):
    out = tmp_path / "new" / "tiny.json"  # a missing folder is made
    command = [sys.executable, "-m", "celerinfer_lab.cli", "train", "-o", str(out), "--steps", "2"]
    result = subprocess.run(
        [*command, "--seed", "1", "--vocab-size", "300"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "2 steps in" in result.stdout and "vocabulary 300" in result.stdout, result.stdout
    written = cl.load_model(out)
    assert cl.load_tokenizer(out).vocab_size == written.config.vocab_size == 300
    # the flags reach the training: the same weights and first loss as train_small_model with them
    model, _, losses = train_small_model(steps=2, seconds=None, seed=1, tokenizer=cl.train_tokenizer(vocab_size=300))
    assert f"loss: {losses[0]:.3f} at the start, {np.mean(losses):.3f} at the end" in result.stdout, result.stdout
    assert all(np.array_equal(written.weights[n], w) for n, w in model.weights.items())
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists: pass --force" in again.stderr


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--steps", "0"], "--steps 0: must be 1 or more"),
        (["--seconds", "0"], "--seconds 0.0: must be a number of seconds above 0"),
        (["--seconds", "inf"], "--seconds inf: must be a number"),
        (["--seed", "-1"], "--seed -1: must be 0 or more"),
        (["--vocab-size", "100"], "--vocab-size 100: must be at least 258"),
        (["--kept"], "tokenizer.json already exist: pass --force"),
        (["--folder"], "is a folder"),
    ],
)
def test_the_train_command_refuses_bad_flags(tmp_path, capsys, flags, words):
    from celerinfer_lab.cli import main

    out = tmp_path / "small.json"
    if flags == ["--kept"]:  # a tokenizer of that name already there, the model file not
        (tmp_path / "small.tokenizer.json").write_text("{}")
        flags = []
    if flags == ["--folder"]:
        out.mkdir()
        flags = []
    assert main(["train", "-o", str(out), "--steps", "1", *flags]) == 2
    assert words in capsys.readouterr().err
    assert not out.is_file()


def test_the_train_command_refuses_flags_argparse_cannot_read(capsys):
    from celerinfer_lab.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "-o", "x.json", "--steps", "many"])
    assert stop.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err
