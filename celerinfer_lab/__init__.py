"""CelerInfer Lab: random MiniMind models, a PyTorch reference with a named trace, and the tools
to prove a C++ forward computes the same thing, op by op.

The names below are imported on first use (PEP 562), so ``import celerinfer_lab`` (and the CLI's
``--help``) loads none of torch, matplotlib, pandas or cppyy; ``celerinfer_lab.X`` and
``from celerinfer_lab import X`` work as if everything had been imported here."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ below returns, for type checkers and editors (tests/test_typecheck.py: in step)
    from .campaign import CampaignSpec, draw_case, run_campaign
    from .checkpoint import export_checkpoint, import_checkpoint
    from .compare import Comparison, compare, compare_decode
    from .complete import Completion, complete
    from .config import PRESETS, ConfigError, ModelConfig, preset
    from .generate import generate_model
    from .machine import MachineLimits, machine_limits
    from .modelfile import Model, ModelFileError, save_model, weight_shapes
    from .native import NativeCompileError, NativeEngine, NativeError, NativeModel, copy_cpp, edit_source, load_native
    from .precision import PrecisionCost, precision_cost
    from .profile import Profile, profile_model
    from .reader import load_model
    from .reference import ForwardResult, KVCache, ReferenceModel, reference_forward
    from .report import Report
    from .tokenizer import Tokenizer, attach_tokenizer, load_tokenizer, save_tokenizer, train_tokenizer
    from .tolerances import Tolerances
    from .trace import TracePoint, trace_names, trace_points
    from .train import save_trained, train_small_model

# public name -> the module (under celerinfer_lab) that defines it
_EXPORTS = {
    "CampaignSpec": "campaign",
    "draw_case": "campaign",
    "run_campaign": "campaign",
    "import_checkpoint": "checkpoint",
    "export_checkpoint": "checkpoint",
    "Comparison": "compare",
    "Report": "report",
    "Tolerances": "tolerances",
    "compare": "compare",
    "compare_decode": "compare",
    "Completion": "complete",
    "complete": "complete",
    "PrecisionCost": "precision",
    "precision_cost": "precision",
    "Tokenizer": "tokenizer",
    "attach_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "save_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "train_small_model": "train",
    "save_trained": "train",
    "PRESETS": "config",
    "ConfigError": "config",
    "ModelConfig": "config",
    "preset": "config",
    "generate_model": "generate",
    "MachineLimits": "machine",
    "machine_limits": "machine",
    "Profile": "profile",
    "profile_model": "profile",
    "Model": "modelfile",
    "ModelFileError": "modelfile",
    "load_model": "reader",
    "save_model": "modelfile",
    "weight_shapes": "modelfile",
    "NativeCompileError": "native",
    "NativeEngine": "native",
    "NativeError": "native",
    "NativeModel": "native",
    "copy_cpp": "native",
    "edit_source": "native",
    "load_native": "native",
    "ForwardResult": "reference",
    "KVCache": "reference",
    "ReferenceModel": "reference",
    "reference_forward": "reference",
    "TracePoint": "trace",
    "trace_names": "trace",
    "trace_points": "trace",
}

__all__ = [
    "PRESETS",
    "ConfigError",
    "ModelConfig",
    "preset",
    "generate_model",
    "Model",
    "ModelFileError",
    "load_model",
    "save_model",
    "import_checkpoint",
    "export_checkpoint",
    "weight_shapes",
    "ForwardResult",
    "ReferenceModel",
    "reference_forward",
    "KVCache",
    "TracePoint",
    "trace_names",
    "trace_points",
    "Report",
    "Tolerances",
    "Comparison",
    "compare",
    "compare_decode",
    "run_campaign",
    "CampaignSpec",
    "draw_case",
    "complete",
    "Completion",
    "precision_cost",
    "PrecisionCost",
    "machine_limits",
    "MachineLimits",
    "profile_model",
    "Profile",
    "attach_tokenizer",
    "load_tokenizer",
    "Tokenizer",
    "train_tokenizer",
    "save_tokenizer",
    "train_small_model",
    "save_trained",
    "load_native",
    "NativeEngine",
    "NativeModel",
    "NativeError",
    "NativeCompileError",
    "copy_cpp",
    "edit_source",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``compare`` (and ``complete``) names both a submodule and its main function. Importing a submodule sets the
    package attribute of its name to the module; for ``compare`` the package keeps the function
    instead, as the eager ``from .compare import compare`` used to (``celerinfer_lab.compare`` is
    the function, ``sys.modules["celerinfer_lab.compare"]`` the module)."""

    def __setattr__(self, name: str, value: object) -> None:
        if (
            _EXPORTS.get(name) == name
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
