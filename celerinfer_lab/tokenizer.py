"""A tokenizer kept with a model file: text in, token ids out, and back.

Beside ``m.json`` (any model file, either layout, with or without a sidecar) live

    m.tokenizer.json          the Hugging Face ``tokenizers`` file (tokenizer.json), as given
    m.tokenizer_config.json   optional: tokenizer_config.json (its chat_template, eos_token, ...)

named from the model file's stem, so the model file itself is unchanged: the C++ reader, the schema
and every existing file are untouched, and a model imported or generated again keeps its tokenizer.
``attach_tokenizer`` checks both files (the tokenizer loads, its vocabulary fits the model, the chat
template compiles) and writes them atomically; ``load_tokenizer`` reads them back, checking again.

The chat template is rendered as transformers renders it: jinja2's sandboxed environment with
``trim_blocks`` and ``lstrip_blocks``, the messages as a list of ``{"role", "content"}`` dicts,
``add_generation_prompt``, the special tokens of tokenizer_config.json (``bos_token``, ``eos_token``,
...) and ``raise_exception``. ``train_tokenizer`` trains a byte-level BPE on a text (the tests and
demos use ``data/coriolanus.txt``)."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ModelFileError, TokenizerError
from .reader import load_model

if TYPE_CHECKING:
    from tokenizers import Tokenizer as Backend

TOKENIZER_SUFFIX = ".tokenizer.json"
CONFIG_SUFFIX = ".tokenizer_config.json"
DATA_DIR = Path(__file__).resolve().parent / "data"
# The first ~40 KB of Coriolanus (Shakespeare, public domain) as in karpathy/char-rnn's tinyshakespeare.
SAMPLE_TEXT = DATA_DIR / "coriolanus.txt"
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>")  # the ChatML markers MiniMind's tokenizer has
# ChatML, as MiniMind's tokenizer_config.json writes it (without its tool-calling branches).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_paths(model_path: str | Path) -> tuple[Path, Path]:
    """Where the tokenizer of ``model_path`` lives: (``<stem>.tokenizer.json``, ``<stem>.tokenizer_config.json``)."""
    path = Path(model_path)
    return path.with_name(path.stem + TOKENIZER_SUFFIX), path.with_name(path.stem + CONFIG_SUFFIX)


def _backend(data: str, where: str) -> Backend:
    try:
        from tokenizers import Tokenizer as Backend
    except ImportError:  # pragma: no cover - the package's `real` extra installs it
        raise TokenizerError("the tokenizers package is not installed: pip install -e '.[real]'") from None
    try:
        return Backend.from_str(data)
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise TokenizerError(f"{where}: not a tokenizers tokenizer.json: {exc}") from None


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _compile_template(template: str, where: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"{where}: the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise TokenizerError(f"{where}: chat_template does not compile: {exc}") from None


@dataclass
class Tokenizer:
    """A ``tokenizers`` tokenizer with the fields of tokenizer_config.json that generation uses."""

    backend: Backend
    config: dict[str, Any] = field(default_factory=dict)
    source: str = "tokenizer"

    def __post_init__(self) -> None:
        where = f"{self.source} (tokenizer_config)"
        template = self.config.get("chat_template")
        if isinstance(template, list):  # transformers' named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{where}: chat_template must be a string, got {type(template).__name__}")
        self.chat_template: str | None = template
        self._template = _compile_template(template, where) if template else None
        eos = self.config.get("eos_token")
        self.eos_token = _token_text(eos)
        if eos is not None and self.eos_token is None:
            raise TokenizerError(f"{where}: eos_token must be a string or {{'content': ...}}, got {eos!r}")
        self.eos_token_id = None if self.eos_token is None else self.backend.token_to_id(self.eos_token)
        if self.eos_token is not None and self.eos_token_id is None:
            raise TokenizerError(f"{where}: eos_token {self.eos_token!r} is not in the tokenizer's vocabulary")

    @property
    def vocab_size(self) -> int:
        """Ids run 0 .. vocab_size - 1 (added tokens included)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens kept; an id outside the tokenizer shows as ``<id N>``."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if 0 <= int(i) < self.vocab_size:
                run.append(int(i))
                continue
            out.append(self.backend.decode(run, skip_special_tokens=False))
            out.append(f"<id {int(i)}>")
            run = []
        out.append(self.backend.decode(run, skip_special_tokens=False))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of ``messages`` ([{"role": ..., "content": ...}])."""
        if self._template is None:
            raise TokenizerError(
                f"{self.source}: no chat_template (tokenizer_config.json has none, or none was attached)"
            )
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise TokenizerError('messages must be a list of {"role": str, "content": str} dicts')
        specials = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        from jinja2 import TemplateError

        try:
            return str(
                self._template.render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    **{k: v for k, v in specials.items() if v is not None},
                )
            )
        except TokenizerError:  # raise_exception() called by the template
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:  # jinja passes these through
            raise TokenizerError(f"{self.source}: the chat template failed: {type(exc).__name__}: {exc}") from None


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file ({what})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read {what}: {exc}") from None


def _config_dict(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{where}: must be a JSON object, got {type(value).__name__}")
    return value


def _check_fits(tokenizer: Tokenizer, model_path: Path, vocab: int | None = None) -> None:
    """The tokenizer's ids must all be ids of the model (a larger model vocabulary is fine: MiniMind
    pads). ``vocab``: the model's vocab_size, when the caller has the model loaded already."""
    if vocab is None:
        vocab = load_model(model_path, allow_nonfinite=True).config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise TokenizerError(
            f"{tokenizer.source}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {vocab} ({model_path}): it belongs to another model"
        )


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ModelFileError(f"cannot write {path}: {exc.strerror or exc}") from None


def attach_tokenizer(
    model_path: str | Path,
    tokenizer_json_path: str | Path,
    tokenizer_config: str | Path | dict[str, Any] | None = None,
) -> Path:
    """Keep a tokenizer with the model file ``model_path``: copy ``tokenizer_json_path`` (a
    tokenizers tokenizer.json) to ``<stem>.tokenizer.json`` beside it, and ``tokenizer_config`` (a
    tokenizer_config.json path, or its contents as a dict) to ``<stem>.tokenizer_config.json``;
    without one, a config attached before is removed. Both are checked first (TokenizerError).
    Returns the path of the attached tokenizer.json."""
    model = Path(model_path)
    if not model.is_file():
        raise ModelFileError(f"{model}: no such model file")
    source = Path(tokenizer_json_path)
    text = _read_text(source, "tokenizer.json")
    config: dict[str, Any] = {}
    if isinstance(tokenizer_config, dict):
        config = tokenizer_config
    elif tokenizer_config is not None:
        config = _config_dict(_read_text(Path(tokenizer_config), "tokenizer_config.json"), str(tokenizer_config))
    tokenizer = Tokenizer(_backend(text, str(source)), config, str(source))
    _check_fits(tokenizer, model)
    tok_path, config_path = tokenizer_paths(model)
    if tokenizer_config is not None:
        _write_atomic(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    else:
        config_path.unlink(missing_ok=True)
    _write_atomic(tok_path, text)
    return tok_path


def load_tokenizer(model_path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer kept with the model file ``model_path`` (see attach_tokenizer). A model without
    one, or a malformed one, is a TokenizerError naming the file. ``vocab_size``: the model's, when
    it is loaded already (else the model file is read to check the tokenizer fits it)."""
    model = Path(model_path)
    tok_path, config_path = tokenizer_paths(model)
    if not tok_path.is_file():
        raise TokenizerError(
            f"{model}: no tokenizer kept with this model (expected {tok_path.name} beside it); attach one with "
            f"celerinfer_lab.attach_tokenizer({str(model)!r}, 'tokenizer.json')"
        )
    config = (
        _config_dict(_read_text(config_path, "tokenizer_config.json"), str(config_path))
        if config_path.is_file()
        else {}
    )
    tokenizer = Tokenizer(_backend(_read_text(tok_path, "tokenizer.json"), str(tok_path)), config, str(tok_path))
    _check_fits(tokenizer, model, vocab_size)
    return tokenizer


def train_tokenizer(
    text_path: str | Path = SAMPLE_TEXT, vocab_size: int = 384, specials: Sequence[str] = CHAT_SPECIALS
) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``text_path`` (default: the shipped Coriolanus excerpt)
    with ``vocab_size`` ids, ``specials`` first (ids 0, 1, ...). Deterministic: the same text gives
    the same tokenizer. Its config names the last special as eos_token and has the ChatML template."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train([str(text_path)], trainer)
    config: dict[str, Any] = {"chat_template": CHATML_TEMPLATE, "eos_token": specials[-1]} if specials else {}
    return Tokenizer(backend, config, f"trained on {Path(text_path).name}")


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> tuple[Path, Path]:
    """Write ``tokenizer`` as a Hugging Face folder does: tokenizer.json and tokenizer_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, config = folder / "tokenizer.json", folder / "tokenizer_config.json"
    tokenizer.backend.save(str(tok))
    config.write_text(json.dumps(tokenizer.config, indent=2, ensure_ascii=False) + "\n")
    return tok, config
