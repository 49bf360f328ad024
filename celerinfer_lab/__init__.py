"""CelerInfer Lab: random MiniMind models, a PyTorch reference with a named trace, and the tools
to prove a C++ forward computes the same thing, op by op."""
from .compare import Comparison, Report, compare, compare_decode
from .config import PRESETS, ConfigError, ModelConfig, preset
from .generate import generate_model
from .modelfile import Model, ModelFileError, load_model, save_model, weight_shapes
from .native import NativeCompileError, NativeEngine, NativeError, NativeModel, copy_cpp, edit_source, load_native
from .reference import ForwardResult, KVCache, ReferenceModel, reference_forward
from .trace import TracePoint, trace_names, trace_points

__all__ = [
    "PRESETS", "ConfigError", "ModelConfig", "preset", "generate_model", "Model", "ModelFileError",
    "load_model", "save_model", "weight_shapes", "ForwardResult", "ReferenceModel", "reference_forward",
    "KVCache", "TracePoint", "trace_names", "trace_points", "Report", "Comparison", "compare", "compare_decode",
    "load_native", "NativeEngine", "NativeModel", "NativeError", "NativeCompileError", "copy_cpp", "edit_source",
]
__version__ = "0.1.0"
