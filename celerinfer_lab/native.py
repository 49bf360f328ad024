"""The C++ forward in Python: cppyy JIT-compiles the headers under cpp/include/celerinfer.

Cling cannot redefine code, so each (re)load compiles the headers' text under a fresh namespace
(``celerinfer_jit_1``, ``_2``, ...): an edited header runs from the next ``reload()`` on, and a
compile error raises ``NativeCompileError`` with clang's message while the previous version stays
in use. Arrays pass to C++ without copies; every shape, dtype and value range is checked here
first, so bad input is a Python exception, never a crash of the kernel.
"""

from __future__ import annotations

import itertools
import re
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from .config import ModelConfig
from .faults import apply_fault, get_fault
from .kvcache import check_kv_cache
from .modelfile import Model, input_problem
from .paths import DEFAULT_CPP_DIR, HEADER, copy_cpp, edit_source  # noqa: F401  (defined in paths.py, re-exported here)
from .paths import include_dir as _include_dir
from .trace import ForwardResult, check_logits_to_keep, kept_positions, trace_points  # noqa: F401  (ForwardResult: defined in trace.py, re-exported here)

_versions = itertools.count(1)  # namespaces are process-wide in cling
# A cppyy proxy (a C++ object, function or namespace): cppyy ships no types, its attributes are the C++ names.
Cpp = Any
# What a decode calls after each forward: (step, logits, trace or None) -> the next tokens [B, 1], or None to stop.
NextToken = Callable[[int, np.ndarray, "dict[str, np.ndarray] | None"], "np.ndarray | None"]
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


from .errors import NativeCompileError, NativeError, UsageError, UsageTypeError  # noqa: E402,F401  (defined in errors.py, re-exported here)


def assemble_source(include_dir: Path) -> str:
    """The headers as one text: local includes inlined once each, #pragma once dropped.

    cppdef of the text (not an #include) is what makes an edited file take effect: cling caches
    included files by path.
    """
    seen: set[Path] = set()

    def inline(path: Path) -> str:
        path = path.resolve()
        if path in seen:
            return ""
        seen.add(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: included from the C++ headers but missing")
        text = path.read_text().replace("#pragma once", "")
        # "x.hpp" is looked up beside the including file, then in the include folder.
        return _LOCAL_INCLUDE.sub(
            lambda m: inline(
                next(
                    (p for p in (path.parent / m.group(1), include_dir / m.group(1)) if p.is_file()),
                    path.parent / m.group(1),
                )
            ),
            text,
        )

    return inline(include_dir / HEADER)


def _cppyy() -> Cpp:
    import cppyy  # imported lazily: 0.5 s, and only the C++ side needs it

    return cppyy


_runtime_loaded = False


def _load_runtime(include_dir: Path) -> None:
    """Compile the shared thread pool (threadpool.hpp) once per process, before any version: it
    must never be compiled after a failed cppdef (see threadpool.hpp)."""
    global _runtime_loaded
    if _runtime_loaded:
        return
    path = include_dir / "celerinfer" / "threadpool.hpp"
    try:
        _cppyy().cppdef(path.read_text())
    except SyntaxError as exc:
        raise NativeCompileError(f"{path} did not compile:\n{exc}") from None
    _runtime_loaded = True


DEFAULT_KERNELS = "fast"  # what users run; "readable" is the baseline anyone can check by eye


class NativeEngine:
    """One folder of C++ headers, compiled; ``reload()`` compiles the folder's current text.

    ``kernels``: the default kernel set for forwards ("fast", "readable", or any set registered with
    CELERINFER_REGISTER_KERNELS); None: "fast", or with a fault the first set the fault changes.
    ``extra_source``: C++ compiled after the headers, inside their namespace: a place for your own kernel set (README: "Your own kernel set"). ``fault``: a name
    from the fault catalogue (celerinfer_lab.faults): its source edits are applied to a scratch copy
    of ``cpp_dir``, and that copy is compiled.
    """

    def __init__(
        self,
        cpp_dir: str | Path | None = None,
        fault: str | None = None,
        kernels: str | None = None,
        extra_source: str = "",
    ):
        self.cpp_dir = Path(cpp_dir) if cpp_dir is not None else DEFAULT_CPP_DIR
        self.fault = get_fault(fault)
        if self.fault is not None:
            self.cpp_dir = apply_fault(self.fault, self.cpp_dir)
        self.extra_source = extra_source
        self.namespace: str | None = None
        self.ns: Cpp = None  # the compiled namespace
        self.reload()
        if kernels is None:  # a fault's engine runs, by default, a kernel set the fault changes
            kernels = (
                DEFAULT_KERNELS
                if self.fault is None or DEFAULT_KERNELS in self.fault.kernels
                else self.fault.kernels[0]
            )
        self.kernels = self.check_kernels(kernels)

    def reload(self) -> None:
        """Compile the headers as they are now. On a compile error the previous version stays."""
        include_dir = _include_dir(self.cpp_dir)
        _load_runtime(include_dir)
        source = assemble_source(include_dir)
        namespace = f"celerinfer_jit_{next(_versions)}"
        cppyy = _cppyy()
        extra = f"namespace {namespace} {{\n{self.extra_source}\n}}\n" if self.extra_source else ""
        text = f"#undef CELERINFER_NS\n#define CELERINFER_NS {namespace}\n{source}\n{extra}#undef CELERINFER_NS\n"
        try:
            cppyy.cppdef(text)
        except SyntaxError as exc:
            raise NativeCompileError(f"C++ in {self.cpp_dir} did not compile:\n{exc}") from None
        ns = getattr(cppyy.gbl, namespace)
        for name in (
            "run_forward",
            "make_kernels",
            "kernel_set_names",
            "ModelWeights",
            "Workspace",
            "Config",
            "TraceRecorder",
        ):
            if not hasattr(ns, name):
                raise NativeCompileError(f"C++ in {self.cpp_dir} compiled but defines no {namespace}::{name}")
        # A crash on the calling thread (a wild read or write) becomes a Python exception, not a dead
        # kernel. The GIL stays held: with __release_gil__ cppyy no longer turns signals into
        # exceptions (measured: the process died with a stack dump).
        ns.run_forward.__sig2exc__ = True
        ns.BoundForward.run.__sig2exc__ = True  # a timing loop's bound call
        if hasattr(ns, "generate_greedy"):  # absent from a copy of the headers older than it (generate falls back)
            ns.generate_greedy.__sig2exc__ = True
        self.namespace, self.ns = namespace, ns

    @property
    def kernel_sets(self) -> list[str]:
        """The registered kernel sets, in registration order ("readable", "fast", then yours)."""
        return [str(name) for name in self.ns.kernel_set_names()]

    def check_kernels(self, kernels: str) -> str:
        if kernels not in self.kernel_sets:
            raise NativeError(f"unknown kernel set {kernels!r}; this build has {', '.join(self.kernel_sets)}")
        return kernels

    def make_kernels(self, kernels: str, weights: Any = None) -> Any:
        """A C++ KernelSet by name (a unique_ptr), prepared for ``weights`` (a ModelWeights; None:
        nothing prepared, as the op tests use), compiling a built-in set first if it waits for it."""
        name = self.compile_kernels(kernels)
        cppyy = _cppyy()
        return _call(
            f"preparing the {name} kernels", self.ns.make_kernels, name, cppyy.nullptr if weights is None else weights
        )

    def compile_kernels(self, kernels: str) -> str:
        """Compile a built-in kernel set that is declared but not yet compiled (kernel_set.hpp: under
        cling every built-in set but fast compiles on first use, a fraction of every load); a no-op otherwise."""
        name = self.check_kernels(kernels)
        pending_type = getattr(self.ns, "kernel_set_pending_type", None)  # absent in a copy of older headers
        pending = str(pending_type(name)) if pending_type else ""
        if pending:
            ident = re.sub(r"\W", "_", name)
            cppyy = _cppyy()
            try:
                cppyy.cppdef(
                    f"namespace {self.namespace} {{ inline const bool celerinfer_defined_{ident} = "
                    f'define_kernels<{pending}>("{name}"); }}'
                )
            except SyntaxError as exc:
                raise NativeCompileError(
                    f"kernel set {name!r} ({pending}) in {self.cpp_dir} did not compile:\n{exc}"
                ) from None
        return name

    def kernel_format(self, kernels: str | None = None) -> str:
        """The weight format a kernel set reads: "f32" (readable, fast: any model, through its float32
        decoding), "bf16" or "q8" (the stored weights of a model in that format; see prepare())."""
        name = self.check_kernels(kernels or self.kernels)
        return str(_call("kernel_set_format", self.ns.kernel_set_format, name))

    @property
    def cpu(self) -> str:
        """What the CPU reports (cpuid) and which widening code the bf16/q8 kernels run."""
        return str(self.ns.cpu_report())

    def set_threads(self, n: int) -> None:
        """Threads of the fast kernels' pool (default: every core)."""
        _call("set_num_threads", self.ns.set_num_threads, int(n))

    @property
    def threads(self) -> int:
        return int(self.ns.num_threads())

    def prepare(self, model: Model, kernels: str | None = None, kv_cache: str = "f32") -> "NativeModel":
        """``model`` bound for a kernel set, converted to the weight format the set reads
        (``model.as_format``): a float32 model quantized in memory for bf16/q8 sets, a bf16/q8
        model's float32 decoding for readable/fast. ``NativeModel.model`` is the converted model.
        ``kv_cache``: "f32" (the default) or "bf16": every new key and value rounded to bfloat16
        as it joins the cache (an engine choice, for any kernel set and weight format)."""
        return NativeModel(self, model, kernels or self.kernels, kv_cache)

    def forward(
        self,
        model: Model,
        trace: bool = False,
        input_ids: np.ndarray | None = None,
        attention_mask: np.ndarray | None = None,
        teacher: dict[str, np.ndarray] | None = None,
        kernels: str | None = None,
        kv_cache: str = "f32",
        logits_to_keep: int = 0,
    ) -> ForwardResult:
        return self.prepare(model, kernels, kv_cache).forward(input_ids, attention_mask, trace, teacher, logits_to_keep)


def load_native(
    cpp_dir: str | Path | None = None, fault: str | None = None, kernels: str | None = None, extra_source: str = ""
) -> NativeEngine:
    """Compile the C++ forward (this project's cpp/, or a copy of it in ``cpp_dir``), optionally
    with one fault from the catalogue applied to a scratch copy; ``kernels`` picks the default
    kernel set, ``extra_source`` adds C++ (your own kernel set)."""
    return NativeEngine(cpp_dir, fault, kernels, extra_source)


def _native_config(ns: Cpp, config: ModelConfig) -> Cpp:
    c = ns.Config()
    c.hidden, c.layers = config.hidden_size, config.num_hidden_layers
    c.heads, c.kv_heads, c.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    c.vocab, c.intermediate, c.max_pos = config.vocab_size, config.intermediate_size, config.max_position_embeddings
    c.eps = float(config.rms_norm_eps)
    c.qk_norm, c.tied = config.qk_norm, config.tie_word_embeddings
    c.rope_interleaved = config.rope_pairing == "interleaved"
    c.moe = config.use_moe
    if config.use_moe:
        c.experts, c.topk = config.num_experts, config.num_experts_per_tok
        c.shared_experts, c.moe_intermediate = config.n_shared_experts, config.moe_intermediate_size
        c.topk_renorm = {
            "never": ns.TopkRenorm.Never,
            "always": ns.TopkRenorm.Always,
            "k>1": ns.TopkRenorm.WhenKAbove1,
        }[config.topk_renorm]
    return c


def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a C++ call; its exception (any type) becomes NativeError with the C++ message."""
    try:
        return fn(*args)
    except Exception as exc:  # cppyy raises the C++ type (std::runtime_error) or SegmentationViolation
        raise NativeError(f"C++ {what} failed: {exc}") from None


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


class NativeModel:
    """A model bound to one compiled version: weights by pointer (kept alive here), workspaces by shape."""

    def __init__(self, engine: NativeEngine, model: Model, kernels: str = DEFAULT_KERNELS, kv_cache: str = "f32"):
        model.check_sidecar()  # binding and packing read the weights, which may be a memory-mapped sidecar
        self.engine, self.ns, self.kernels = engine, engine.ns, engine.check_kernels(kernels)
        self.kv_cache = check_kv_cache(kv_cache)
        self.weight_format = engine.kernel_format(self.kernels)  # what the kernel set reads
        model = model.as_format(self.weight_format)  # itself when it already is in that format
        self.model, self.config = model, model.config
        self._arrays = {name: _f32(a) for name, a in model.weights.items()}  # no copy for float32
        self._arrays["rope.cos"], self._arrays["rope.sin"] = _f32(model.rope_cos), _f32(model.rope_sin)
        self.cpp = _call("model setup", self.ns.ModelWeights, _native_config(self.ns, model.config))
        for name, array in self._arrays.items():
            _call(f"binding '{name}'", self.cpp.bind, name, array, [int(d) for d in array.shape])
        # A bf16/q8 model's stored weights beside their float32 decoding (C++ keeps pointers: kept here).
        self._stored = {name: np.ascontiguousarray(a) for name, a in model.stored.items()}
        if self._stored:
            fmt = {"bf16": self.ns.WeightFormat.BF16, "q8": self.ns.WeightFormat.Q8}[model.weight_format]
            for name, array in self._stored.items():
                _call(f"binding the stored form of '{name}'", self.cpp.bind_stored, name, fmt, array, int(array.nbytes))
        _call("model check", self.cpp.check_complete)
        self.kernel_set = engine.make_kernels(kernels, self.cpp)
        self._workspaces: dict[tuple[int, int, int], object] = {}
        # Workspaces (and a decode's KV cache) are reused across calls: one caller at a time.
        self._lock = threading.RLock()
        self._what = f"forward ({self.kernels} kernels)"
        # The last untraced run's key, its call bound in C++ (BoundForward; None until the key repeats),
        # and the arrays it points into, kept alive here so that their ids cannot pass to other arrays.
        self._bound: tuple[tuple, Cpp, tuple] | None = None

    def check_inputs(
        self, input_ids: npt.ArrayLike | None, attention_mask: npt.ArrayLike | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Check ids and mask [B, S] (default: the model file's); return them as contiguous int64."""
        ids = self.model.input_ids if input_ids is None else np.asarray(input_ids)
        if attention_mask is None:
            mask = self.model.attention_mask if input_ids is None else np.ones(ids.shape[:2], np.int64)
        else:
            mask = np.asarray(attention_mask)
        if not np.issubdtype(ids.dtype, np.integer):
            raise UsageTypeError(f"input_ids must be integers, got {ids.dtype}")
        problem = input_problem(ids, mask, self.config.vocab_size)
        if problem:
            raise UsageError(problem)
        self.config.validate(seq_len=int(ids.shape[1]))
        return np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(mask, dtype=np.int64)

    def workspace(self, B: int, S: int, max_len: int | None = None) -> Cpp:
        """The workspace for this shape, made once and kept for the model's life (never evicted: run()'s
        bound call holds a raw pointer to it)."""
        key = (B, S, max_len or S)
        if key not in self._workspaces:
            ws = _call("workspace", self.ns.Workspace, self.cpp.config, B, S, max_len or S)
            ws.kv_format = self.ns.KVFormat.BF16 if self.kv_cache == "bf16" else self.ns.KVFormat.F32
            self._workspaces[key] = ws
        return self._workspaces[key]

    def run(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        logits: np.ndarray,
        recorder: Cpp = None,
        start: int = 0,
        workspace: Cpp = None,
        logits_to_keep: int = 0,
    ) -> None:
        """The bare call for timing: arrays already checked (see check_inputs) and logits preallocated
        ([B, L, vocab], L = kept_positions(S, logits_to_keep)). ``start``: tokens already in
        ``workspace``'s KV cache (decode)."""
        self.model.check_sidecar()  # a sidecar truncated under the model: an error here, not SIGBUS in C++
        with self._lock:
            # The same arrays as the last call (a timing loop): a call bound once, without converting ten
            # arguments each time. Bound from the second such call: a decode step's arrays are new each step.
            # (workspace=None always means the same workspace for the same shape of ids.)
            key = (
                id(ids),
                ids.shape,
                id(mask),
                mask.shape,
                id(logits),
                logits.shape,
                start,
                id(workspace),
                logits_to_keep,
            )
            bound = self._bound
            if recorder is None and bound is not None and bound[0] == key and bound[1] is not None:
                try:  # _call's lines, inline: this path is the tiny model's whole overhead (~1 us)
                    bound[1].run()
                except Exception as exc:
                    raise NativeError(f"C++ {self._what} failed: {exc}") from None
                return
            B, S = ids.shape
            ws = workspace if workspace is not None else self.workspace(B, S)
            inputs = (self.kernel_set, self.cpp, ids, mask, S, start, ws, logits)
            if recorder is not None:
                _call(self._what, self.ns.run_forward, *inputs, recorder, logits_to_keep)
            elif bound is None or bound[0] != key:
                self._bound = (key, None, (ids, mask, logits, ws))  # ws: BoundForward keeps a raw pointer
                _call(self._what, self.ns.run_forward, *inputs, _cppyy().nullptr, logits_to_keep)
            else:
                self._bound = (key, self.ns.BoundForward(*inputs, logits_to_keep), bound[2])
                _call(self._what, self._bound[1].run)

    def forward(
        self,
        input_ids: npt.ArrayLike | None = None,
        attention_mask: npt.ArrayLike | None = None,
        trace: bool = False,
        teacher: dict[str, np.ndarray] | None = None,
        logits_to_keep: int = 0,
    ) -> ForwardResult:
        """Logits and, with trace (or a teacher), every trace point.

        ``teacher``: trace point values that replace each op's output once recorded, so every op
        runs on exact inputs (teacher forcing); the trace then holds each op's own result.
        ``logits_to_keep``: as MiniMind's forward: 0 gives every position's logits [B, S, V], L the
        last L positions' [B, L, V] (lm_head runs on those rows only; the trace's lm_head too).
        """
        ids, mask = self.check_inputs(input_ids, attention_mask)
        B, S = ids.shape
        L = kept_positions(S, check_logits_to_keep(logits_to_keep))
        logits, guarded = _guarded_logits(B, L, self.config.vocab_size)
        recorder = self._recorder(trace, teacher, B, S, 0, logits_to_keep)
        self.run(ids, mask, logits, recorder, logits_to_keep=logits_to_keep)
        _check_guard(guarded, logits.size)
        return ForwardResult(
            logits=logits,
            trace=_read_trace(recorder, self.config, B, S, 0, self.kv_cache, logits_to_keep) if recorder else None,
        )

    def _recorder(
        self,
        trace: bool,
        teacher: dict[str, np.ndarray] | None,
        B: int,
        S: int,
        past_len: int,
        logits_to_keep: int = 0,
    ) -> Cpp:
        """A TraceRecorder holding the teacher's values (kept alive on it), or None for no trace."""
        if not trace and teacher is None:
            return None
        recorder, kept = self.ns.TraceRecorder(), []
        points = {p.name: p.shape for p in trace_points(self.config, B, S, past_len, self.kv_cache, logits_to_keep)}
        for name, value in (teacher or {}).items():
            if name not in points or tuple(np.shape(value)) != points[name]:
                raise UsageError(
                    f"teacher value '{name}' has shape {list(np.shape(value))}; "
                    f"the trace point's shape is {list(points.get(name, ()))}"
                )
            array = _f32(value)
            kept.append(array)
            recorder.set_teacher(name, array, int(array.size))
        recorder._kept = kept  # C++ holds pointers into these: alive as long as the recorder
        return recorder

    def generate(
        self,
        new_tokens: int,
        input_ids: npt.ArrayLike | None = None,
        attention_mask: npt.ArrayLike | None = None,
        after_prefill: Callable[[], object] | None = None,
        on_token: Callable[[int, np.ndarray], bool] | None = None,
    ) -> np.ndarray:
        """Greedy decoding with the KV cache: prefill the prompt, then one token per step; the new
        tokens [B, new_tokens]. ``after_prefill()`` is called once the prompt is processed;
        ``on_token(step, tokens [B, 1])`` after each choice: False stops the decode there (fewer tokens).
        Without either callback the whole loop runs in C++ (generate_timed): the same tokens, faster,
        in one call that holds the GIL until the last token (Ctrl-C waits for it; pass on_token to
        stream or to stop early)."""
        new_tokens = _check_new_tokens(new_tokens)
        if after_prefill is None and on_token is None and hasattr(self.ns, "generate_greedy"):
            return self.generate_timed(new_tokens, input_ids, attention_mask)[0]
        tokens: list[np.ndarray] = []

        def greedy(step: int, logits: np.ndarray, _trace: dict[str, np.ndarray] | None) -> np.ndarray | None:
            if step == 0 and after_prefill is not None:
                after_prefill()
            tokens.append(np.ascontiguousarray(logits[:, -1].argmax(-1)[:, None], dtype=np.int64))
            if on_token is not None and on_token(step, tokens[-1]) is False:
                return None
            return tokens[-1]

        self._decode(new_tokens, input_ids, attention_mask, greedy, prefill_logits=1)  # greedy reads the last
        return np.concatenate(tokens, axis=1)

    def generate_timed(
        self,
        new_tokens: int,
        input_ids: npt.ArrayLike | None = None,
        attention_mask: npt.ArrayLike | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """generate()'s greedy decoding in one C++ call (generate_greedy in kernel_set.hpp): the new
        tokens [B, new_tokens], and the seconds from the call's start to the end of each forward and
        its choice (the prefill first), timed in C++. The Python loop around each step (its
        callbacks) cost ~0.17 ms, 17% of a minimind2-small q8 decode step; this is what generate()
        runs without callbacks, and what bench times."""
        new_tokens = _check_new_tokens(new_tokens)
        if not hasattr(self.ns, "generate_greedy"):
            raise NativeError(
                f"the C++ in {self.engine.cpp_dir} has no generate_greedy (a copy of the headers older than it): "
                "generate() with a callback runs the Python loop instead"
            )
        ids, mask = self.check_inputs(input_ids, attention_mask)
        B, S = ids.shape
        self.config.validate(seq_len=S + new_tokens - 1)
        tokens = np.empty((B, new_tokens), np.int64)
        step_end = np.empty(new_tokens, np.float64)
        self.model.check_sidecar()  # a sidecar truncated under the model: an error here, not SIGBUS in C++
        with self._lock:  # the KV cache lives in the workspace from the prefill to the last step
            ws = self.workspace(B, S, S + new_tokens - 1)
            _call(
                f"generate ({self.kernels} kernels)",
                self.ns.generate_greedy,
                *(self.kernel_set, self.cpp, ids, mask, S, new_tokens, ws, tokens, step_end),
            )
        return tokens, step_end

    def decode_steps(
        self,
        feed: np.ndarray,
        input_ids: npt.ArrayLike | None = None,
        attention_mask: npt.ArrayLike | None = None,
        trace: bool = False,
        teachers: list[dict[str, np.ndarray]] | None = None,
    ) -> list[ForwardResult]:
        """Prefill, then feed the tokens of ``feed`` [B, N] one step at a time with the KV cache; one
        result per forward (prefill first), with traces and teachers as for forward()."""
        feed = np.ascontiguousarray(feed, dtype=np.int64)
        results: list[ForwardResult] = []

        def fed(step: int, logits: np.ndarray, points: dict[str, np.ndarray] | None) -> np.ndarray | None:
            results.append(ForwardResult(logits.copy(), points))
            return feed[:, step : step + 1] if step < feed.shape[1] else None

        self._decode(feed.shape[1] + 1, input_ids, attention_mask, fed, trace, teachers)
        return results

    def _decode(
        self,
        forwards: int,
        input_ids: npt.ArrayLike | None,
        attention_mask: npt.ArrayLike | None,
        next_token: NextToken,
        trace: bool = False,
        teachers: list[dict[str, np.ndarray]] | None = None,
        prefill_logits: int = 0,
    ) -> None:
        """Run up to ``forwards`` forwards over one KV cache: the prompt first, then each token that
        next_token(step, logits, trace or None) returns (None stops). ``prefill_logits``: the prompt's
        logits_to_keep (1 when only the last position's logits are read)."""
        ids, mask = self.check_inputs(input_ids, attention_mask)
        B, S = ids.shape
        if forwards < 1:
            raise UsageError(f"forwards={forwards}: need at least the prefill")
        self.config.validate(seq_len=S + forwards - 1)
        with self._lock:  # the KV cache lives in the workspace from the prefill to the last step
            self._decode_locked(forwards, ids, mask, next_token, trace, teachers, prefill_logits)

    def _decode_locked(
        self,
        forwards: int,
        ids: np.ndarray,
        mask: np.ndarray,
        next_token: NextToken,
        trace: bool,
        teachers: list[dict[str, np.ndarray]] | None,
        prefill_logits: int,
    ) -> None:
        B, prompt_len = ids.shape
        ws = self.workspace(B, prompt_len, prompt_len + forwards - 1)
        start = 0
        for step in range(forwards):
            S = ids.shape[1]  # new tokens this step: the prompt, then one
            keep = prefill_logits if step == 0 else 0
            logits, guarded = _guarded_logits(B, kept_positions(S, keep), self.config.vocab_size)
            recorder = self._recorder(trace, teachers[step] if teachers else None, B, S, start, keep)
            self.run(ids, mask, logits, recorder, start=start, workspace=ws, logits_to_keep=keep)
            _check_guard(guarded, logits.size)
            points = _read_trace(recorder, self.config, B, S, start, self.kv_cache, keep) if trace else None
            chosen = next_token(step, logits, points)
            start += S
            if chosen is None or step == forwards - 1:
                break
            ids = np.ascontiguousarray(chosen, dtype=np.int64)  # a column slice is not contiguous
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)


def _check_new_tokens(new_tokens: object) -> int:
    """generate()'s token count: an integer >= 1 (the prefill chooses the first)."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, (int, np.integer)):
        raise UsageTypeError(f"new_tokens must be an integer, got {type(new_tokens).__name__}")
    if new_tokens < 1:
        raise UsageError(f"new_tokens={new_tokens}: need at least 1 (the prefill's token)")
    return int(new_tokens)


_GUARD = 16
_SENTINEL = np.array([0x7FC0DEAD], dtype=np.uint32).view(np.float32)[0]  # a NaN payload no workspace guard uses


def _guarded_logits(B: int, S: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits [B, S, vocab] (S: the positions kept) inside a buffer with a guard tail. NaN-filled: a forward that never
    writes its output shows up as NaN, not as plausible zeros."""
    n = B * S * vocab
    buffer = np.full(n + _GUARD, np.nan, dtype=np.float32)
    buffer[n:] = _SENTINEL
    return buffer[:n].reshape(B, S, vocab), buffer


def _check_guard(buffer: np.ndarray, n: int) -> None:
    if buffer[n:].view(np.uint32).tolist() != [int(_SENTINEL.view(np.uint32))] * _GUARD:
        raise NativeError(f"out-of-bounds write: the forward wrote past the end of the logits ({n} floats)")


def _read_trace(
    recorder: Cpp,
    config: ModelConfig,
    B: int,
    S: int,
    past_len: int = 0,
    kv_cache: str = "f32",
    logits_to_keep: int = 0,
) -> dict[str, np.ndarray]:
    """Copy the recorded points out of C++, with the contract's dtypes (topk_idx is int64)."""
    dtypes = {p.name: p.dtype for p in trace_points(config, B, S, past_len, kv_cache, logits_to_keep)}
    out: dict[str, np.ndarray] = {}
    for i in range(recorder.size()):
        name, shape, n = str(recorder.name(i)), tuple(recorder.shape(i)), int(recorder.numel(i))
        view = recorder.data(i)
        view.reshape((n,))
        values = np.array(np.frombuffer(view, dtype=np.float32, count=n)).reshape(shape)
        out[name] = values.astype(np.int64) if dtypes.get(name) == "int64" else values
    return out
