"""The project's exceptions: one family under CelerInferError.

Every error a user can cause with bad input (a bad argument, file, config or C++ edit) is a
CelerInferError; the command line turns it into a one-line ``error: ...`` and exit status 2.
The classes keep their historical built-in bases (ValueError / RuntimeError / TypeError), so
``except ValueError`` written against older versions still catches them. The modules that
raise them re-export them (``celerinfer_lab.config.ConfigError`` is ``errors.ConfigError``).

    CelerInferError
    ├── UsageError (ValueError)          bad arguments: shapes, dtypes, names, numbers
    │   └── UsageTypeError (TypeError)   ... of the wrong type
    ├── ConfigError (ValueError)         a config field breaks a rule
    ├── ModelFileError (ValueError)      a malformed or unwritable model file
    │   ├── SidecarError                 the safetensors sidecar is missing, truncated or disagrees
    │   └── CheckpointError              a checkpoint to import (or a model to export) is malformed,
    │                                    unsupported or ambiguous
    ├── TokenizerError (ValueError)      no tokenizer kept with the model, or a malformed one
    ├── FaultError (ValueError)          an unknown fault, or one that no longer applies
    ├── NativeError (RuntimeError)       the C++ refused an input or failed
    │   └── NativeCompileError           the C++ did not compile
    ├── StandaloneError (RuntimeError)   building or running base_line_micro failed
    ├── HistoryError (ValueError)        the benchmark store is corrupt, foreign or of another schema,
    │                                    an id is unknown, or two results cannot be compared
    └── MachineError (RuntimeError)      measuring the machine's limits failed, or their cache is unreadable
"""

from __future__ import annotations


class CelerInferError(Exception):
    """Base of every error this package raises on purpose; the message says what is wrong."""


class UsageError(CelerInferError, ValueError):
    """A bad argument: wrong shape, value, name or combination. The message names it."""


class UsageTypeError(UsageError, TypeError):
    """A bad argument of the wrong type (also a TypeError, as these were before)."""


class ConfigError(CelerInferError, ValueError):
    """A config field breaks a rule. The message names the field and the rule."""


class ModelFileError(CelerInferError, ValueError):
    """The model file is malformed (or cannot be written). The message names the file, the tensor
    or field, and what is wrong."""


class SidecarError(ModelFileError):
    """The sidecar is missing, truncated or disagrees with the JSON file."""


class CheckpointError(ModelFileError):
    """A checkpoint to import (or a model to export) is malformed, holds a feature this project does
    not run, or fits more than one MiniMind era. The message names the file, the tensor or field."""


class TokenizerError(CelerInferError, ValueError):
    """No tokenizer is kept with the model file, or its tokenizer.json / tokenizer_config.json is
    malformed or does not fit the model. The message names the file and what is wrong."""


class FaultError(CelerInferError, ValueError):
    """An unknown fault, or one whose edit no longer matches the C++ source."""


class NativeError(CelerInferError, RuntimeError):
    """The C++ side refused an input or failed at run time (its message is kept)."""


class NativeCompileError(NativeError):
    """The C++ did not compile; the message is clang's diagnostic."""


class StandaloneError(CelerInferError, RuntimeError):
    """Building or running base_line_micro failed; the message carries its output."""


class HistoryError(CelerInferError, ValueError):
    """The benchmark history store is not one this version reads (corrupt, foreign, another schema
    version), a result id is unknown, or two results were measured on different parameters or
    machines. The message names the store, the id or the difference."""


class MachineError(CelerInferError, RuntimeError):
    """Measuring the machine's limits failed (no compiler, the measuring program failed), or the
    cached measurement is unreadable. The message names the file or command."""


__all__ = [
    "CelerInferError",
    "UsageError",
    "UsageTypeError",
    "ConfigError",
    "ModelFileError",
    "SidecarError",
    "CheckpointError",
    "TokenizerError",
    "FaultError",
    "NativeError",
    "NativeCompileError",
    "StandaloneError",
    "HistoryError",
    "MachineError",
]
