"""A small *trained* model, made here: trained weights behave unlike random ones (peaked softmaxes,
large activations, near-tied logits), which is where real kernels fail, and the machines have no
model hub. ``train_small_model`` trains a MiniMind-shaped model of about a million parameters on a
text (default: the shipped Coriolanus excerpt) with a byte-level BPE tokenizer (tokenizer.py), for a
time budget, through the reference's own forward (ReferenceModel.training_logits): the model that
comes out is a plain ``Model``, compared, saved and completed like any other.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import UsageError
from .generate import generate_model
from .modelfile import Model
from .tokenizer import SAMPLE_TEXT, Tokenizer, train_tokenizer


def small_config(vocab_size: int) -> ModelConfig:
    """MiniMind-3's shape at about a million parameters: GQA 4/2, q/k norm, tied head."""
    return ModelConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        qk_norm=True,
    )


def train_small_model(
    steps: int | None = 300,
    seconds: float | None = 60.0,
    text_path: str | Path = SAMPLE_TEXT,
    tokenizer: Tokenizer | None = None,
    config: ModelConfig | None = None,
    seq_len: int = 64,
    batch: int = 16,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> tuple[Model, Tokenizer, list[float]]:
    """Train from the generator's random weights for ``steps`` optimizer steps or ``seconds``, whichever
    ends first (at least one step; None: no such limit). Returns the model (its inputs: the text's
    first ``seq_len`` tokens), the tokenizer and the loss per step. With ``steps`` alone the result is
    the same on every run of the same machine (``seed`` fixes the start and the batches); a time
    budget makes the step count follow the machine's speed."""
    if steps is None and seconds is None:
        raise UsageError("train_small_model: give steps, seconds or both")
    import torch
    import torch.nn.functional as F

    from .reference import ReferenceModel

    tokenizer = tokenizer or train_tokenizer(text_path)
    config = config or small_config(tokenizer.vocab_size)
    ids = np.array(tokenizer.encode(Path(text_path).read_text(), add_special_tokens=False), dtype=np.int64)
    if len(ids) < 2 * (seq_len + 1):
        raise UsageError(f"{text_path}: {len(ids)} tokens, too few for windows of {seq_len + 1}")
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(
            f"the tokenizer has {tokenizer.vocab_size} ids, the config's vocab_size is {config.vocab_size}"
        )
    start = generate_model(config, batch_size=1, seq_len=seq_len, seed=seed)
    ref = ReferenceModel(start)
    params = {name: ref.w[name].requires_grad_() for name in start.weights}
    optimizer = torch.optim.AdamW(params.values(), lr=learning_rate, weight_decay=0.0)
    draw = np.random.default_rng(seed)
    tokens = torch.from_numpy(ids)
    losses: list[float] = []
    deadline = None if seconds is None else time.monotonic() + seconds

    def more() -> bool:
        if not losses:
            return True
        return (steps is None or len(losses) < steps) and (deadline is None or time.monotonic() < deadline)

    while more():
        offsets = draw.integers(0, len(ids) - seq_len - 1, size=batch)
        window = torch.stack([tokens[o : o + seq_len + 1] for o in offsets])
        logits = ref.training_logits(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), window[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    weights = {name: p.detach().numpy().astype(np.float32) for name, p in params.items()}
    prompt = ids[None, :seq_len]
    trained = Model(
        config, weights, prompt, np.ones_like(prompt), start.rope_cos, start.rope_sin, dict(start.meta, trained=True)
    )
    return trained, tokenizer, losses


def save_trained(model: Model, tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write the model file and keep the tokenizer with it (``<stem>.tokenizer*.json``)."""
    import tempfile

    from .tokenizer import attach_tokenizer, save_tokenizer

    path = Path(path)
    model.save(path)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer_json, tokenizer_config = save_tokenizer(tokenizer, folder)
        attach_tokenizer(path, tokenizer_json, tokenizer_config)
    return path
