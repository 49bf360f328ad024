"""The ``celerinfer-lab`` command: generate, info, torch-forward, cpp-forward, compare, campaign, complete, bench,
bench-compare, bench-history, machine, profile, precision, train, import, export, lab.

Bad input (a missing or malformed file, a bad number or name) is one line ``error: ...`` on stderr
and exit status 2, never a traceback. Heavy modules (torch, matplotlib, cppyy) are imported by
the command that needs them, not here."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .config import PRESETS, ROPE_PAIRINGS, SIZING_RULES, TOPK_RENORM_RULES, ConfigError, ModelConfig, preset
from .errors import CelerInferError, FaultError, HistoryError, ModelFileError, UsageError
from .flags import CONFIG_FLAGS, DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from .kvcache import KV_CACHE_FORMATS
from .quantize import WEIGHT_FORMATS
from .torch_threads import restores_torch_threads

if TYPE_CHECKING:  # for annotations only: the commands import what they run when they run
    import numpy as np

    from .bench import Timing
    from .modelfile import Model

PADDING_MODES = ("none", "left", "right", "mixed")  # generate.PADDING_MODES (a test keeps them equal)
REPO_NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# The original CelerInfer generator's defaults: ModelConfig's own (config.py).
TINY = ModelConfig()


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="write a random MiniMind model file",
        description="Write a random model with inputs and RoPE cache. Without --preset the original CelerInfer "
        f"defaults apply ({TINY.hidden_size}/{TINY.num_hidden_layers}/{TINY.num_attention_heads}/"
        f"{TINY.num_key_value_heads}/{TINY.vocab_size}, max-pos {TINY.max_position_embeddings}).",
    )
    g.add_argument("--preset", choices=sorted(PRESETS), help="start from a released model's config")
    g.add_argument("--hidden", type=int), g.add_argument("--layers", type=int)
    g.add_argument("--heads", type=int), g.add_argument("--kvh", type=int, help="key/value heads")
    g.add_argument("--vocab", type=int), g.add_argument("--max-pos", type=int, help="max_position_embeddings")
    g.add_argument("--head-dim", type=int, help="default hidden/heads")
    g.add_argument("--intermediate", type=int, help="FFN width (default: the sizing rule)")
    g.add_argument("--sizing-rule", choices=SIZING_RULES)
    g.add_argument("--eps", type=float, help="rms_norm_eps"), g.add_argument("--theta", type=float, help="rope_theta")
    g.add_argument("--qk-norm", action="store_true", default=None, help="RMSNorm over q and k heads (MiniMind-3)")
    g.add_argument("--rope-pairing", choices=ROPE_PAIRINGS)
    g.add_argument("--yarn", action="store_true", default=None, help="MiniMind's inference_rope_scaling (YaRN)")
    g.add_argument("--yarn-original-max-pos", type=int, help="YaRN original_max_position_embeddings (default 2048)")
    g.add_argument("--untied", action="store_true", default=None, help="a separate lm_head")
    g.add_argument("--moe", action="store_true", default=None, help="mixture-of-experts FFN")
    (
        g.add_argument("--experts", type=int, help="routed experts"),
        g.add_argument("--topk", type=int, help="experts per token"),
    )
    g.add_argument("--shared-experts", type=int), g.add_argument("--moe-intermediate", type=int)
    g.add_argument("--topk-renorm", choices=TOPK_RENORM_RULES)
    g.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    g.add_argument("--seed", type=int, default=123)
    g.add_argument("--padding", choices=PADDING_MODES, default="none")
    g.add_argument("--pad-lengths", type=_int_list, help="pad tokens per row, e.g. 0,2")
    g.add_argument("--pad-id", type=int, default=0)
    g.add_argument(
        "--output", "-o", default="model.json", help="the model file (default model.json); missing folders are created"
    )
    g.add_argument("--force", action="store_true", help="overwrite an existing file (and its sidecar)")
    g.add_argument(
        "--sidecar", action="store_true", help="weights in a safetensors file beside the JSON (large models)"
    )
    g.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        default="f32",
        help="weight format: f32 (default), bf16, or q8 (llama.cpp's Q8_0) for projections, experts and head",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on for models of 20M parameters and more)",
    )


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    fields = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    for flag, field in (("qk_norm", "qk_norm"), ("yarn", "inference_rope_scaling"), ("moe", "use_moe")):
        if getattr(args, flag):
            fields[field] = True
    if args.untied:
        fields["tie_word_embeddings"] = False
    if args.yarn_original_max_pos is not None:
        from .config import DEFAULT_YARN

        fields["rope_scaling"] = {**DEFAULT_YARN, "original_max_position_embeddings": args.yarn_original_max_pos}
    if args.preset:
        return preset(args.preset, **fields)
    return ModelConfig(**fields)


def _check_output(output: str, sidecar: bool, force: bool) -> Path:
    """The output path, refusing a folder, a .safetensors name with --sidecar, and an existing model
    (the file, or sidecars of its name the write would replace) unless ``force``."""
    from .writer import check_target, sidecars_of

    path = check_target(output, sidecar)
    existing = [str(t) for t in [path] + sidecars_of(path) if t.exists()]
    if existing and not force:
        raise UsageError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
            "pass --force to overwrite, or choose another --output"
        )
    return path


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_model_file

    config = config_from_args(args)
    _check_output(args.output, args.sidecar, args.force)
    start = time.perf_counter()
    written = generate_model_file(
        config,
        args.batch_size,
        args.seq_len,
        args.seed,
        args.padding,
        args.pad_lengths,
        args.pad_id,
        output=args.output,
        progress=args.progress,
        sidecar=args.sidecar,
        weights=args.weights,
    )
    elapsed = time.perf_counter() - start
    size = _size(written.json_bytes)  # what this run wrote (a concurrent writer may have replaced it since)
    if written.sidecar:
        size = f"{size} JSON + {_size(written.sidecar_bytes)} sidecar {written.sidecar.name}"
    print(
        f"wrote {written.path}: {config.num_parameters():,} parameters ({args.weights} weights), "
        f"batch {args.batch_size} x seq {args.seq_len}, {size} in {elapsed:.2f} s"
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .reader import load_model
    from .writer import weight_bytes

    _check_output(args.output, args.sidecar, args.force)
    if Path(args.output).absolute() == Path(args.model).absolute():
        raise UsageError(f"-o {args.output} is the model being read: write the new format to another file")
    model = load_model(args.model)
    note = ""
    if model.weight_format not in ("f32", args.to):
        note = f" (re-quantized from the {model.weight_format} file's decoded values, not from float32 originals)"
    start = time.perf_counter()
    model.as_format(args.to).save(args.output, sidecar=args.sidecar)
    print(
        f"wrote {args.output}: {model.weight_format} -> {args.to} weights{note}, "
        f"{_size(weight_bytes(model.config, args.to))} of weights in {time.perf_counter() - start:.2f} s"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .reader import load_model
    from .trace import trace_points
    from .writer import weight_bytes

    model = load_model(args.model, allow_nonfinite=args.allow_nonfinite)
    print(f"{args.model} ({model.source_format})")
    for key, value in model.config.to_dict().items():
        print(f"  {key}: {value}")
    print(f"  parameters: {model.config.num_parameters():,}")
    print(
        f"  weights: {model.weight_format}, {_size(weight_bytes(model.config, model.weight_format))}"
        + (f" ({_size(model.config.num_parameters() * 4)} in f32)" if model.weight_format != "f32" else "")
    )
    print(
        f"  inputs: batch {model.batch_size} x seq {model.seq_len}, padded positions {int((model.attention_mask == 0).sum())}"
    )
    if args.trace_points:
        for point in trace_points(model.config, model.batch_size, model.seq_len):
            print(f"  {point.name:48s} {list(point.shape)}")
    return 0


def _forward_inputs(args: argparse.Namespace) -> tuple[str, Path | None, int]:
    """Model path, dump dir and warm-up count, from the arguments or the original environment variables."""
    path = args.model or os.environ.get("JSON_PATH")
    if not path:
        raise ModelFileError("no model file: give one as an argument or set JSON_PATH")
    dump_dir = args.dump_dir or os.environ.get("DUMP_DIR")
    if args.warmup is not None:
        warmup = args.warmup
    else:
        try:
            warmup = int(os.environ.get("WARMUP", "5"))
        except ValueError:
            raise UsageError(f"WARMUP={os.environ['WARMUP']!r}: expected a whole number of warm-up runs") from None
    if warmup < 0:
        raise UsageError(f"--warmup {warmup}: must be 0 or more")
    if args.repeat < 1:
        raise UsageError(f"--repeat {args.repeat}: need at least one timed run")
    return path, Path(dump_dir) if dump_dir else None, warmup


def _report(
    label: str,
    path: str,
    model: Model,
    timing: Timing,
    warmup: int,
    logits: np.ndarray,
    dump_dir: Path | None,
    filename: str,
) -> None:
    import numpy as np

    print(
        f"model: {path} ({model.config.num_parameters():,} parameters, batch {model.batch_size} x seq {model.seq_len})"
    )
    print(f"{label}: {timing} after {warmup} warm-up")
    print(f"logits: shape {list(logits.shape)} min {logits.min():.6f} max {logits.max():.6f} mean {logits.mean():.6f}")
    if dump_dir:
        dump_dir.mkdir(parents=True, exist_ok=True)
        np.save(dump_dir / filename, logits)
        print(f"saved {dump_dir / filename}")


def _kv_note(kv_cache: str) -> str:
    return "" if kv_cache == "f32" else f", {kv_cache} KV cache"


def _keep_note(logits_to_keep: int) -> str:
    if not logits_to_keep:
        return ""
    return f", logits of the last {logits_to_keep} position{'s' if logits_to_keep > 1 else ''}"


@restores_torch_threads
def cmd_torch_forward(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .bench import time_call
    from .reader import load_model
    from .reference import ReferenceModel

    path, dump_dir, warmup = _forward_inputs(args)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(path, allow_nonfinite=args.allow_nonfinite)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    ref = ReferenceModel(model, dtype, args.kv_cache)
    keep = args.logits_to_keep
    times = time_call(lambda: ref.forward(logits_to_keep=keep), warmup, args.repeat)
    logits, trace = ref.forward(trace=args.save_trace, logits_to_keep=keep)
    _report(
        f"torch forward ({args.dtype}, {torch.get_num_threads()} threads{_kv_note(args.kv_cache)}{_keep_note(keep)})",
        path,
        model,
        times,
        warmup,
        logits.numpy(),
        dump_dir,
        "logits_torch.npy",
    )
    if dump_dir and trace is not None:
        np.savez(dump_dir / "trace_torch.npz", allow_pickle=False, **{k: v.numpy() for k, v in trace.items()})
        print(f"saved {dump_dir / 'trace_torch.npz'} ({len(trace)} trace points)")
    return 0


def cmd_cpp_forward(args: argparse.Namespace) -> int:
    import numpy as np

    from .bench import time_call
    from .native import load_native
    from .reader import load_model
    from .trace import check_logits_to_keep, kept_positions

    path, dump_dir, warmup = _forward_inputs(args)
    model = load_model(path, allow_nonfinite=args.allow_nonfinite)
    engine = load_native(args.cpp_dir)
    native = engine.prepare(model, args.kernels, args.kv_cache)
    ids, mask = native.check_inputs(None, None)
    keep = check_logits_to_keep(args.logits_to_keep)
    rows = kept_positions(model.seq_len, keep)
    logits = np.zeros((model.batch_size, rows, model.config.vocab_size), dtype=np.float32)
    times = time_call(lambda: native.run(ids, mask, logits, logits_to_keep=keep), warmup, args.repeat)
    result = native.forward(trace=args.save_trace, logits_to_keep=keep)
    _report(
        f"C++ forward (cppyy, {native.kernels} kernels, {engine.threads} threads{_kv_note(args.kv_cache)}"
        f"{_keep_note(keep)})",
        path,
        model,
        times,
        warmup,
        result.logits,
        dump_dir,
        "logits_cpp.npy",
    )
    if dump_dir and result.trace is not None:
        np.savez(dump_dir / "trace_cpp.npz", allow_pickle=False, **result.trace)
        print(f"saved {dump_dir / 'trace_cpp.npz'} ({len(result.trace)} trace points)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, compare_decode
    from .faults import FAULTS, get_fault, why_it_cannot_show
    from .flags import flags_for
    from .native import load_native
    from .reader import load_model

    if args.list_faults:
        for listed in FAULTS.values():
            print(f"{listed.name:32s} {'+'.join(listed.kernels):14s} {listed.breaks}")
        return 0
    if not args.model:
        raise ModelFileError("no model file given")
    fault = get_fault(args.fault)
    model = load_model(args.model, allow_nonfinite=args.allow_nonfinite)
    engine = load_native(args.cpp_dir, fault=args.fault)
    kernels = engine.kernel_sets if args.kernels == "all" else [engine.check_kernels(args.kernels)]
    if fault is not None:
        reasons = why_it_cannot_show(fault, model.config, model.attention_mask, args.kv_cache)
        shown = [k for k in kernels if k in fault.kernels]
        if not shown:
            reasons.append(
                f"it changes only the {' and '.join(fault.kernels)} kernels, and --kernels is {args.kernels}"
            )
        if reasons:
            padding = fault.inputs.get("padding")
            flags = " ".join(filter(None, [flags_for(fault.model), f"--padding {padding}" if padding else ""]))
            raise FaultError(
                f"fault {fault.name!r} cannot show on {args.model}: "
                + "; ".join(reasons)
                + (f". A model that shows it: celerinfer-lab generate {flags}" if flags else "")
            )
        kernels = shown
    if args.decode < 0:
        raise UsageError(f"--decode {args.decode}: the number of decode steps, >= 0")
    agrees = True
    for name in kernels:
        print(f"== {name} kernels{' (fault ' + fault.name + ')' if fault else ''}")
        if args.decode:
            steps = compare_decode(model, engine, steps=args.decode, kernels=name, kv_cache=args.kv_cache)
            for step, one in enumerate(steps):
                print(f"-- step {step}{' (the prefill)' if step == 0 else ''}")
                print(one)
            agrees = agrees and all(r.agrees for r in steps)
            continue
        report = compare(model, engine, kernels=name, precision=args.precision, kv_cache=args.kv_cache)
        print(report)
        agrees = agrees and report.agrees
    return 0 if agrees else 1


def _kernel_list(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def cmd_campaign(args: argparse.Namespace) -> int:
    from .campaign import CampaignSpec, read_rows, run_campaign, summarize

    if args.report:
        summary = summarize(read_rows(args.report))
        print(summary.to_text())
        if args.plot:
            from .plots import plot_campaign_margins

            plot_campaign_margins(summary.rows).savefig(args.plot, dpi=110, bbox_inches="tight")
            print(f"saved {args.plot}")
        return 0
    if args.configs is None:
        raise UsageError("campaign needs --configs N (or --report FILE to summarize one)")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers {args.workers}: the number of worker processes, >= 0 (0: in this process)")
    if args.scheduler and args.workers is not None:
        raise UsageError("--scheduler and --workers together: an existing cluster brings its own workers")
    if args.out and Path(args.out).suffix != ".parquet":
        raise UsageError(f"--out {args.out}: the results are a parquet file (name it *.parquet)")
    spec = CampaignSpec(  # checks the numbers, the fault names and the C++ folder
        configs=args.configs,
        kernels=_kernel_list(args.kernels) or ("",),
        faults=args.faults or bool(args.fault_names),
        fault_names=_kernel_list(args.fault_names) if args.fault_names else None,
        decode=args.decode,
        seed=args.seed,
        cpp_dir=str(Path(args.cpp_dir).resolve()) if args.cpp_dir else None,
        shrink=not args.faults if args.shrink is None else args.shrink,
    )
    from .native import load_native  # the kernel set names checked here, before any worker compiles

    known = load_native(args.cpp_dir).kernel_sets
    if args.kernels != "all":
        unknown = [k for k in spec.kernels if k not in known]
        if unknown:
            raise UsageError(
                f"--kernels {args.kernels!r}: no kernel set {unknown[0]!r}; this build has {', '.join(known)}"
            )
    spec.kernels = tuple(known) if args.kernels == "all" else spec.kernels
    result = run_campaign(spec, out=args.out, scheduler=args.scheduler, workers=args.workers)
    summary = summarize(result.rows)
    print(summary.to_text())
    per_worker = 60 * result.ran / result.seconds / max(result.workers, 1) if result.seconds else 0.0
    print(
        f"\n{result.ran} tasks in {result.seconds:.0f} s on {result.workers} workers "
        f"({per_worker:.1f} configs per minute per worker); {result.skipped} skipped (already in {args.out})"
    )
    for path, command in result.reproductions:
        print(f"reproduce: {command}")
    if args.out:
        print(f"results: {args.out}  (summary: celerinfer-lab campaign --report {args.out})")
    return 1 if result.failures else 0


def cmd_complete(args: argparse.Namespace) -> int:
    from .complete import complete
    from .native import load_native
    from .reader import load_model
    from .tokenizer import load_tokenizer

    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)  # before the C++ compiles: fails at once
    engine = load_native(args.cpp_dir, fault=args.fault)
    result = complete(
        model,
        args.prompt,
        args.max_new_tokens,
        chat=args.chat,
        kernels=args.kernels,
        native=engine,
        tokenizer=tokenizer,
        stop_at_eos=not args.ignore_eos,
        on_line=lambda line: print(line, flush=True),
        kv_cache=args.kv_cache,
    )
    if result.divergence is None:
        return 0
    return 1 if result.divergence.verdict == "bug" else 0


TRAIN_STEPS, TRAIN_SECONDS = 300, 60.0  # train_small_model's defaults: about a minute on 2 cores
MIN_TRAIN_VOCAB = 258  # byte-level BPE: 256 byte tokens and the two ChatML specials


def train_limits(steps: int | None, seconds: float | None) -> tuple[int | None, float | None]:
    """``train``'s stopping rule: --steps alone trains exactly that many steps (the same model on any
    machine), --seconds alone trains for that long, both stop at whichever comes first, neither is
    the defaults (300 steps or 60 s)."""
    import math

    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: must be 1 or more")
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"--seconds {seconds}: must be a number of seconds above 0")
    if steps is None and seconds is None:
        return TRAIN_STEPS, TRAIN_SECONDS
    return steps, seconds


def cmd_train(args: argparse.Namespace) -> int:
    steps, seconds = train_limits(args.steps, args.seconds)
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be 0 or more")
    if args.vocab_size < MIN_TRAIN_VOCAB:
        raise UsageError(
            f"--vocab-size {args.vocab_size}: must be at least {MIN_TRAIN_VOCAB} (the byte-level BPE's 256 bytes "
            "and the two chat specials)"
        )
    path = _check_output(args.output, False, args.force)
    from .tokenizer import tokenizer_paths

    kept = [str(t) for t in tokenizer_paths(path) if t.exists()]
    if kept and not args.force:
        raise UsageError(f"{' and '.join(kept)} already exist: pass --force to overwrite, or choose another --output")
    from .tokenizer import train_tokenizer
    from .train import save_trained, train_small_model

    path.parent.mkdir(parents=True, exist_ok=True)  # before training: a folder that cannot be made fails at once
    start = time.perf_counter()
    tokenizer = train_tokenizer(vocab_size=args.vocab_size)
    if tokenizer.vocab_size < args.vocab_size:
        print(f"tokenizer: {tokenizer.vocab_size} ids (the text has no merges for {args.vocab_size})")
    model, tokenizer, losses = train_small_model(steps=steps, seconds=seconds, tokenizer=tokenizer, seed=args.seed)
    elapsed = time.perf_counter() - start
    save_trained(model, tokenizer, path)
    last = losses[-10:]
    print(
        f"trained {model.config.num_parameters():,} parameters, vocabulary {tokenizer.vocab_size}: "
        f"{len(losses)} steps in {elapsed:.1f} s"
    )
    print(f"loss: {losses[0]:.3f} at the start, {sum(last) / len(last):.3f} at the end (mean of the last {len(last)})")
    tok_json, tok_config = tokenizer_paths(path)
    print(f"wrote {path} with its tokenizer ({tok_json.name}, {tok_config.name})")
    return 0


BENCH_ENGINES = ("torch", "cpp", "llama.cpp")


def _bench_llama_types(args: argparse.Namespace) -> list[str] | None:
    """The GGUF types llama.cpp runs in (None: llama.cpp is not among --engines)."""
    engines = [e.strip() for e in args.engines.split(",")]
    unknown = [e for e in engines if e not in BENCH_ENGINES]
    if unknown or not {"torch", "cpp"} <= set(engines):
        raise UsageError(
            f"--engines {args.engines}: torch and cpp always run (the ratios are against PyTorch); "
            f"llama.cpp may be added: {','.join(BENCH_ENGINES)}"
        )
    return [t.strip() for t in args.llama_types.split(",")] if "llama.cpp" in engines else None


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import run_bench

    for flag in ("repeat", "threads", "seq_len", "batch_size", "max_pos", "decode_passes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: must be 1 or more")
    if args.warmup < 0 or args.decode < 0:
        raise UsageError(f"--warmup {args.warmup} / --decode {args.decode}: must be 0 or more")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be 0 or more")
    if args.preset and args.numbers:
        raise ConfigError(
            "give either --preset or the seven numbers (hidden layers heads kvh vocab seq batch), not both"
        )
    if args.numbers and len(args.numbers) != 7:
        raise ConfigError(f"expected 7 numbers: hidden layers heads kvh vocab seq_len batch, got {len(args.numbers)}")
    if args.preset:
        config = preset(args.preset, **({"max_position_embeddings": args.max_pos} if args.max_pos else {}))
        seq_len, batch = args.seq_len or DEFAULT_SEQ_LEN, args.batch_size or DEFAULT_BATCH_SIZE
    else:
        h, layers, heads, kvh, vocab, seq, batch = args.numbers or [
            *(TINY.hidden_size, TINY.num_hidden_layers, TINY.num_attention_heads, TINY.num_key_value_heads),
            *(TINY.vocab_size, DEFAULT_SEQ_LEN, DEFAULT_BATCH_SIZE),
        ]
        seq_len, batch = args.seq_len or seq, args.batch_size or batch
        config = ModelConfig(
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kvh,
            vocab_size=vocab,
            max_position_embeddings=max(args.max_pos or TINY.max_position_embeddings, seq_len + args.decode),
        )
    config.validate(seq_len=seq_len + max(args.decode - 1, 0))
    store = None
    if args.save or args.store:
        from .history import BenchStore

        if not args.save:
            raise UsageError("--store names where --save appends: give --save too")
        store = BenchStore(args.store, create=True)  # a bad store fails before the benchmark runs
    result = run_bench(
        config,
        batch,
        seq_len,
        args.seed,
        args.threads,
        args.repeat,
        args.warmup,
        args.decode,
        args.work_dir,
        args.cpp_dir,
        kernels=args.kernels,
        kv_cache=args.kv_cache,
        standalone=not args.no_standalone,
        store=store,
        llama_cpp=_bench_llama_types(args),
        decode_passes=args.decode_passes,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"saved {args.json}")
    return 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from .history import BenchStore
    from .regression import MIN_SAMPLES, compare_saved

    only = [word.strip() for word in args.figures.split(",") if word.strip()] if args.figures else None
    comparison = compare_saved(
        BenchStore(args.store), args.base, args.new, args.last, args.threshold, args.alpha, args.force, only
    )
    for line in comparison.lines():
        print(line)
    if not comparison.judged:  # a comparison that tested nothing must not pass for "no regression"
        raise HistoryError(f"nothing judged: no figure has {MIN_SAMPLES} samples on both sides")
    return 1 if comparison.regressions else 0


def cmd_bench_history(args: argparse.Namespace) -> int:
    from .history import BenchStore, history_lines, speed_table

    results = BenchStore(args.store).results()
    if not results:
        print(f"no saved results in {args.store or 'the default store'}")
        return 0
    if args.markdown:
        print(speed_table(results, latest_only=not args.all))
    else:
        for line in history_lines(results):
            print(line)
    return 0


def _add_history(sub: argparse._SubParsersAction) -> None:
    from .regression import DEFAULT_ALPHA, DEFAULT_LAST, DEFAULT_THRESHOLD_PCT

    store_help = "the history's SQLite file (default: as for bench --save)"
    cmp = sub.add_parser(
        "bench-compare",
        help="compare two saved benches figure by figure (exit 1 on a significant regression)",
        description="Per figure: medians, change, a two-sided Mann-Whitney U test over the samples, and a verdict "
        "(faster / slower / no significant change: a verdict needs both p < alpha and a change beyond the "
        "threshold). Exit status: 0 no significant regression, 1 some figure significantly slower by more "
        "than the threshold, 2 bad input (unknown id, a bad store, results of different parameters or machines).",
    )
    cmp.add_argument("base", nargs="?", type=int, help="the base result's id (default: the best of --last)")
    cmp.add_argument("new", nargs="?", type=int, help="the new result's id (default: the newest)")
    cmp.add_argument("--store", help=store_help)
    cmp.add_argument(
        "--last",
        type=int,
        default=DEFAULT_LAST,
        help=f"without BASE: the best of the last N results on this machine with the same parameters "
        f"(default {DEFAULT_LAST})",
    )
    cmp.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD_PCT,
        help=f"percent change a verdict needs beyond significance (default {DEFAULT_THRESHOLD_PCT:g})",
    )
    cmp.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"significance level (default {DEFAULT_ALPHA})")
    cmp.add_argument("--force", action="store_true", help="compare results of different machines")
    cmp.add_argument(
        "--figures",
        help="judge only the figures whose names contain one of these comma-separated words (cpp: this C++ only)",
    )
    hist = sub.add_parser(
        "bench-history",
        help="list saved benches, or print the speed table from them (--markdown)",
        description="Without --markdown: every saved result (id, time, commit, machine, workload, medians). With "
        "--markdown: the README speed table, the newest result per machine and parameters (--all: every result), "
        "one row per figure with median, IQR, rate, runs, commit and machine.",
    )
    hist.add_argument("--store", help=store_help)
    hist.add_argument("--markdown", action="store_true", help="print the speed table as markdown")
    hist.add_argument("--all", action="store_true", help="with --markdown: every result, not the newest per workload")


def cmd_machine(args: argparse.Namespace) -> int:
    import json

    from .machine import machine_limits

    limits = machine_limits(refresh=args.refresh, quick=args.quick)
    print(json.dumps(limits.to_dict(), indent=2) if args.json else str(limits))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    from .machine import machine_limits
    from .native import load_native
    from .profile import profile_model
    from .reader import load_model

    for flag in ("repeat", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} {value}: must be 1 or more")
    if args.decode < 0 or args.warmup < 0:
        raise UsageError(f"--decode {args.decode} / --warmup {args.warmup}: must be 0 or more")
    model = load_model(args.model)
    model.config.validate(seq_len=model.seq_len + args.decode)
    engine = load_native(args.cpp_dir)
    engine.check_kernels(args.kernels)
    limits = machine_limits(quick=args.quick_machine)
    prof = profile_model(
        model, args.kernels, args.decode, args.threads, args.repeat, args.warmup, engine, limits, args.kv_cache
    )
    print(f"model: {args.model} ({model.config.num_parameters():,} parameters)")
    print(f"machine: {limits.cpu}; PyTorch: {limits.blas}")
    for phase in prof.cpp:
        print()
        print("\n".join(prof.lines(phase, per_layer=args.per_layer)))
    if args.plot:
        for phase in prof.cpp:
            path = Path(args.plot if phase == "prefill" else Path(args.plot).with_suffix(f".{phase}.png"))
            path.parent.mkdir(parents=True, exist_ok=True)
            prof.plot(phase).savefig(path, dpi=110)
            print(f"saved {path}")
    if args.json:
        out = {phase: prof.rows(phase, per_layer=args.per_layer) for phase in prof.cpp}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"saved {args.json}")
    return 0


def _add_kv_cache(parser: argparse.ArgumentParser, where: str) -> None:
    """--kv-cache f32|bf16, the KV cache's number format; ``where``: what the bf16 rounding reaches."""
    parser.add_argument(
        "--kv-cache",
        choices=KV_CACHE_FORMATS,
        default="f32",
        help=f"the KV cache's number format: f32 (default) or bf16 (each new key and value rounded to bfloat16 as it "
        f"joins the cache; {where})",
    )


def _add_machine_profile(sub: argparse._SubParsersAction) -> None:
    mach = sub.add_parser(
        "machine",
        help="this machine's measured limits: FMA peak, DRAM and cache bandwidth, CPU features, PyTorch's BLAS",
        description="Measure (once; cached in the data folder per CPU model and fingerprint) the float32 FMA peak "
        "and the read bandwidth from DRAM and from cache, on 1 thread and on all, and report the CPU's features "
        "(cpuid) and the BLAS path PyTorch takes. The profile's roofline uses them.",
    )
    mach.add_argument("--refresh", action="store_true", help="measure again even if cached")
    mach.add_argument("--json", action="store_true", help="print the limits as JSON")
    mach.add_argument("--quick", action="store_true", help="tiny sizes and times (well under a second; for tests)")
    prof = sub.add_parser(
        "profile",
        help="per-op time of both forwards against the machine's limits (table and roofline)",
        description="Time every op of the C++ forward (the trace hook in timing mode) and of the PyTorch "
        "reference (its trace points) on the model file's inputs, prefill and --decode N greedy steps: per op "
        "kind the time, share, GFLOP/s, GB/s, fraction of the roofline limit, and PyTorch's time.",
    )
    prof.add_argument("model")
    prof.add_argument("--kernels", default="fast", help="the C++ kernel set (default fast)")
    prof.add_argument("--decode", type=int, default=0, help="also profile N greedy decode steps after the prompt")
    prof.add_argument("--threads", type=int, help="threads for both sides (default: their own)")
    prof.add_argument("--repeat", type=int, default=5, help="profiled runs (and as many unprofiled), default 5")
    prof.add_argument("--warmup", type=int, default=1)
    prof.add_argument("--per-layer", action="store_true", help="one row per layer's op instead of per op kind")
    prof.add_argument("--plot", help="write the roofline to this PNG (decode's beside it as .decode.png)")
    prof.add_argument("--json", help="write the table rows as JSON")
    prof.add_argument("--cpp-dir", help="a folder with your own copy of the C++ headers")
    _add_kv_cache(prof, "on both sides; its rounding points are rows of the table")
    prof.add_argument("--quick-machine", action="store_true", help="use (or make) a quick machine measurement (tests)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celerinfer-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_import_export(sub)
    _add_precision(sub)
    _add_history(sub)

    _add_machine_profile(sub)
    quant = sub.add_parser(
        "quantize",
        help="write a model file with its weights in another format (bf16, q8 or f32)",
        description="Projections, experts and the head go to the new format; norms, the router and the RoPE "
        "cache stay float32. From a bf16 or q8 file the decoded values are quantized again.",
    )
    quant.add_argument("model")
    quant.add_argument("--to", required=True, choices=WEIGHT_FORMATS, help="the weight format to write")
    quant.add_argument("-o", "--output", required=True, help="the model file to write")
    quant.add_argument("--sidecar", action="store_true", help="weights in a safetensors sidecar beside the JSON")
    quant.add_argument("--force", action="store_true", help="replace an existing model file")
    info = sub.add_parser("info", help="describe a model file")
    info.add_argument("model")
    info.add_argument("--trace-points", action="store_true", help="list the trace points with their shapes")
    tf = sub.add_parser("torch-forward", help="run and time the PyTorch reference on a model file")
    cf = sub.add_parser("cpp-forward", help="run and time the C++ forward (through cppyy) on a model file")
    for p, name in ((tf, "logits_torch.npy"), (cf, "logits_cpp.npy")):
        p.add_argument("model", nargs="?", help="model file (default: $JSON_PATH)")
        p.add_argument("--dump-dir", help=f"write {name} here (default: $DUMP_DIR)")
        p.add_argument("--warmup", type=int, help="untimed runs first (default: $WARMUP or 5)")
        p.add_argument("--repeat", type=int, default=20, help="timed runs; the median is reported")
        p.add_argument("--save-trace", action="store_true", help="also write the trace (.npz) to the dump dir")
        _add_kv_cache(p, "the prompt's own attention reads them")
        p.add_argument(
            "--logits-to-keep",
            type=int,
            default=0,
            metavar="L",
            help="lm_head over the last L positions only, logits [B, L, V] (MiniMind's logits_to_keep; "
            "0, the default: every position)",
        )
    tf.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    tf.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    cf.add_argument("--cpp-dir", help="a folder with your own copy of the C++ headers (default: this project's cpp/)")
    cf.add_argument(
        "--kernels", default="fast", help="the kernel set to run: fast (default), readable, or one you registered"
    )
    bench = sub.add_parser(
        "bench",
        help="generate, time PyTorch, C++ via cppyy and standalone, compare",
        description="The original benchmark.sh workflow: bench HIDDEN LAYERS HEADS KVH VOCAB SEQ BATCH "
        "(default 64 2 8 2 128 5 2). Times are medians after warm-up, loading excluded.",
    )
    bench.add_argument("numbers", nargs="*", type=int, help="hidden layers heads kvh vocab seq_len batch")
    bench.add_argument("--preset", choices=sorted(PRESETS))
    bench.add_argument(
        "--seq-len", type=int, help=f"override the sequence length (with --preset: default {DEFAULT_SEQ_LEN})"
    )
    bench.add_argument(
        "--batch-size", type=int, help=f"override the batch (with --preset: default {DEFAULT_BATCH_SIZE})"
    )
    bench.add_argument("--max-pos", type=int, help="max_position_embeddings")
    bench.add_argument("--threads", type=int, help="threads for both sides (default: each side's own, all cores)")
    bench.add_argument("--repeat", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--decode", type=int, default=0, help="also decode N tokens greedily with a KV cache")
    bench.add_argument(
        "--decode-passes",
        type=int,
        default=3,
        help="interleaved decode rounds (every kernel set and llama.cpp type in turn, each round); rates are "
        "their medians and ratios are taken pass by pass (default 3)",
    )
    bench.add_argument("--seed", type=int, default=123)
    bench.add_argument("--json", help="write the results here")
    bench.add_argument("--work-dir", help="where the model files and builds go (default: a temporary folder)")
    bench.add_argument("--cpp-dir", help="a folder with your own copy of the C++")
    bench.add_argument(
        "--kernels",
        default="fast",
        help="the kernel set(s) to time: fast (default), readable, bf16, q8, readable-bf16, readable-q8, "
        "several joined by commas (fast,bf16,q8), all (each in turn, fast first), or one registered in --cpp-dir",
    )
    bench.add_argument(
        "--save",
        action="store_true",
        help="append the result (every sample, git commit, machine fingerprint, library versions) to the "
        "benchmark history (see bench-compare, bench-history)",
    )
    bench.add_argument(
        "--store",
        help="the history's SQLite file (default: $CELERINFER_LAB_BENCH_STORE, else bench_history.sqlite in "
        "~/.local/share/celerinfer-lab or $CELERINFER_LAB_DATA)",
    )
    bench.add_argument("--no-standalone", action="store_true", help="skip base_line_micro (no build; its rows n/a)")
    _add_kv_cache(bench, "on both sides; base_line_micro keeps f32 and is not run for the forward rows")
    bench.add_argument(
        "--engines",
        default="torch,cpp",
        help="engines to time: torch,cpp (default) or torch,cpp,llama.cpp (the model as GGUF through "
        "llama-cpp-python, an optional extra; skipped with the reason when it is not installed; batch 1)",
    )
    bench.add_argument(
        "--llama-types", default="f32,f16,q8_0", help="GGUF types llama.cpp runs: f32, f16, q8_0 (default: all three)"
    )
    cmp = sub.add_parser(
        "compare",
        help="run both forwards and compare every trace point",
        description="Exit status: 0 all trace points agree, 1 they diverge, 2 bad input.",
    )
    cmp.add_argument("model", nargs="?")
    cmp.add_argument("--cpp-dir", help="a folder with your own copy of the C++ headers")
    cmp.add_argument("--fault", help="compile one fault from the catalogue into the C++ (see --list-faults)")
    cmp.add_argument("--list-faults", action="store_true", help="print the fault catalogue, one per line")
    cmp.add_argument(
        "--kernels",
        default="all",
        help="the kernel set(s) to compare: all (default, each in turn), fast, readable, or one you registered",
    )
    _add_kv_cache(cmp, "on both sides; judged as a rounding point")
    cmp.add_argument(
        "--precision",
        choices=("off", "summary", "full"),
        default="summary",
        help="with a bf16/q8 kernel set on a float32 model, also what the format costs against the float32 "
        "model (both in the float64 reference): summary (default: SQNR, KL, top-1), full (plus per layer and "
        "per op), off",
    )
    cmp.add_argument(
        "--decode",
        type=int,
        default=0,
        help="also decode N steps with the KV cache and compare each (compare_decode; default 0: the prefill only)",
    )
    camp = sub.add_parser(
        "campaign",
        help="random models checked against the float64 oracle on every kernel set, on Dask; failures shrunk",
        description="Draw N configs from (seed, index), compare each kernel set against the float64 oracle on "
        "Dask workers (a LocalCluster by default), shrink every failure to the smallest model that fails the same "
        "way and write it with the command that reproduces it. --report FILE summarizes a results file. Exit "
        "status: 0 no failure, 1 failures, 2 bad input.",
    )
    camp.add_argument("--configs", type=int, help="how many random configs to draw")
    camp.add_argument(
        "--kernels", default="readable,fast", help="kernel sets, comma-separated, or all (default readable,fast)"
    )
    camp.add_argument(
        "--faults",
        action="store_true",
        help="every catalogue fault on every drawn config it applies to: the debugger's localization rates",
    )
    camp.add_argument("--fault-names", help="with --faults: only these catalogue faults, comma-separated")
    camp.add_argument("--decode", type=int, default=2, help="the longest decode drawn, in steps (default 2)")
    camp.add_argument("--seed", type=int, default=0, help="the campaign seed: case i is drawn from (seed, i)")
    camp.add_argument("--scheduler", help="a running Dask scheduler, e.g. tcp://host:8786 (default: a LocalCluster)")
    camp.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core; 0: no Dask)")
    camp.add_argument("--cpp-dir", help="a folder with your own copy of the C++ headers")
    camp.add_argument("--out", help="results file (.parquet), rewritten as rows arrive; an existing one is resumed")
    camp.add_argument(
        "--shrink",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shrink every failure (default: on, off with --faults)",
    )
    camp.add_argument("--report", help="summarize a results file instead of running")
    camp.add_argument("--plot", help="with --report: save the tolerance-margin plot to this file")
    comp = sub.add_parser(
        "complete",
        help="greedy text generation on both sides, side by side; the first divergence diagnosed",
        description="Encode the prompt with the tokenizer kept with the model file (attach one with "
        "celerinfer_lab.attach_tokenizer), decode greedily with the KV cache in PyTorch and in C++, print both "
        "texts as they grow, and at the first step where the tokens differ compare that step op by op. "
        "Exit status: 0 identical (or a near-tie), 1 a bug found, 2 bad input.",
    )
    comp.add_argument("model")
    comp.add_argument("--prompt", required=True, help="the text (with --chat: the user message)")
    comp.add_argument("--max-new-tokens", type=int, default=32)
    comp.add_argument("--chat", action="store_true", help="render the prompt with the tokenizer's chat template")
    comp.add_argument("--kernels", default="fast", help="the C++ kernel set: fast (default), readable, or yours")
    comp.add_argument("--cpp-dir", help="a folder with your own copy of the C++ headers")
    comp.add_argument("--fault", help="compile one fault from the catalogue into the C++ (see compare --list-faults)")
    comp.add_argument("--ignore-eos", action="store_true", help="go on after the tokenizer's eos_token")
    _add_kv_cache(comp, "on both sides, and in the diagnosis of a divergence")
    for p in (info, tf, cf, cmp):
        p.add_argument(
            "--allow-nonfinite",
            action="store_true",
            help="accept NaN/Inf in the file's weights and RoPE cache (refused by default), to study them",
        )
    tr = sub.add_parser(
        "train",
        help="train the small model (about a million parameters) on the shipped text; write it with its tokenizer",
        description="Train a byte-level BPE tokenizer and a MiniMind-3-shaped model of about a million parameters "
        "on the shipped Coriolanus excerpt (celerinfer_lab/train.py) and write the model file with its tokenizer "
        "beside it (<stem>.tokenizer.json, <stem>.tokenizer_config.json). --steps alone: exactly N steps (the "
        "same model on any machine); --seconds alone: that long; both: whichever ends first; neither: "
        f"{TRAIN_STEPS} steps or {TRAIN_SECONDS:g} s.",
    )
    tr.add_argument("-o", "--output", required=True, help="the model file to write; missing folders are created")
    tr.add_argument("--steps", type=int, help="optimizer steps")
    tr.add_argument("--seconds", type=float, help="time budget in seconds")
    tr.add_argument("--seed", type=int, default=0, help="the starting weights and the batches (default 0)")
    tr.add_argument("--vocab-size", type=int, default=384, help="the tokenizer's ids (default 384)")
    tr.add_argument("--force", action="store_true", help="overwrite an existing model file and its tokenizer")
    lab = sub.add_parser(
        "lab",
        help="open JupyterLab on the notebooks (extra arguments go to jupyter lab)",
        description="Start JupyterLab on DIR (default: this checkout's notebooks/), adding "
        "--allow-root when run as root. Any other arguments (--no-browser, --port N, "
        "--ip ...) are passed to jupyter lab.",
    )
    lab.add_argument("folder", nargs="?", metavar="DIR", help="the folder to open (default: the notebooks/ folder)")
    lab.add_argument(
        "--print-command", action="store_true", help="print the jupyter command line instead of running it"
    )
    return parser


def lab_command(folder: str | Path | None = None, extra: Sequence[str] = (), as_root: bool | None = None) -> list[str]:
    """The JupyterLab command line ``celerinfer-lab lab`` runs: the Python running this, on ``folder``
    (default: this checkout's notebooks/), with --allow-root when run as root, then ``extra``."""
    folder = Path(folder) if folder is not None else REPO_NOTEBOOKS
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (the notebooks to open)")
    if as_root is None:
        as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={folder.resolve()}"]
    if as_root and "--allow-root" not in extra:
        command.append("--allow-root")
    return command + list(extra)


def cmd_lab(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("jupyterlab") is None:
        raise UsageError("JupyterLab is not installed: pip install -e '.[dev]' (or pip install jupyterlab)")
    command = lab_command(args.folder, args.extra)
    if args.print_command:
        import shlex

        print(shlex.join(command))
        return 0
    sys.stdout.flush(), sys.stderr.flush()
    os.execv(command[0], command)  # JupyterLab replaces this process: Ctrl-C and kill reach it directly


def cmd_import(args: argparse.Namespace) -> int:
    from .checkpoint import import_checkpoint

    _check_output(args.output, args.sidecar, args.force)
    given: dict[str, object] = {}
    for flag, field in _IMPORT_FIELDS:
        value = getattr(args, flag)
        if value is not None:
            given[field] = value
    model = import_checkpoint(args.src, args.output, era=args.era, config=given, sidecar=args.sidecar)
    c = model.config
    era = model.meta.get("era") or model.meta.get("architecture")
    print(
        f"imported {args.src} ({era}): {c.num_parameters():,} parameters, {c.num_hidden_layers} layers, "
        f"hidden {c.hidden_size}, heads {c.num_attention_heads}/{c.num_key_value_heads}, rope {c.rope_pairing} "
        f"theta {c.rope_theta:g}, eps {c.rms_norm_eps:g}, {c.max_position_embeddings} positions"
        + (f", MoE {c.num_experts}x top-{c.num_experts_per_tok} ({c.topk_renorm})" if c.use_moe else "")
        + f" -> {args.output}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_checkpoint
    from .reader import load_model

    out = export_checkpoint(load_model(args.model), args.output, fmt=args.format)
    print(f"exported {args.model} -> {out} (config.json, model.safetensors; format {args.format})")
    return 0


# import flags that set config fields a bare state dict cannot tell: (argparse dest, ModelConfig field)
_IMPORT_FIELDS = (
    ("heads", "num_attention_heads"),
    ("eps", "rms_norm_eps"),
    ("theta", "rope_theta"),
    ("max_pos", "max_position_embeddings"),
    ("topk", "num_experts_per_tok"),
)


def cmd_precision(args: argparse.Namespace) -> int:
    from .precision import precision_cost
    from .reader import load_model

    model = load_model(args.model)
    if args.to == "f32" and args.kv_cache == "f32":
        raise UsageError("--to f32 with the f32 KV cache costs nothing: give --to bf16|q8 or --kv-cache bf16")
    cost = precision_cost(
        model,
        args.to,
        layers_one_at_a_time=not args.no_layers and args.to != "f32",
        splice=not args.no_splice,
        kv_cache=args.kv_cache,
    )
    print(cost)
    if args.plot:
        cost.plot().savefig(args.plot, dpi=110)
        print(f"plot -> {args.plot}")
    return 0


def _add_precision(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser(
        "precision",
        help="what bf16/q8 weights cost a float32 model (SQNR per op, logits KL, per-layer attribution)",
        description="Both sides in the float64 PyTorch reference, one on the float32 weights, one on their "
        "bf16/q8 values: per trace point SQNR, mean KL and top-1 agreement of the logits, and the KL per "
        "layer (one layer reduced at a time) and per op (splicing). No C++ runs: this is the cost of the "
        "format, not a check of a kernel (that is compare --kernels).",
    )
    pr.add_argument("model", help="a float32 model file")
    pr.add_argument(
        "--to", choices=WEIGHT_FORMATS, required=True, help="the weight format to cost (f32: with --kv-cache bf16 only)"
    )
    pr.add_argument(
        "--kv-cache",
        choices=KV_CACHE_FORMATS,
        default="f32",
        help="bf16: the reduced side also rounds keys and values to bfloat16 as they join the KV cache",
    )
    pr.add_argument("--plot", help="write the figure (KL per layer, SQNR per op) to this PNG")
    pr.add_argument("--no-layers", action="store_true", help="skip the one-layer-at-a-time forwards")
    pr.add_argument("--no-splice", action="store_true", help="skip the splicing forwards (one per trace point)")


def _add_import_export(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import", help="import a HF folder or a MiniMind .pth as a model file")
    imp.add_argument(
        "src", help="a HF folder (config.json + model.safetensors / pytorch_model.bin) or a .pth/.bin/.safetensors file"
    )
    imp.add_argument("-o", "--output", required=True, help="the model file to write")
    imp.add_argument("--sidecar", action="store_true", help="weights in a safetensors sidecar beside the JSON")
    imp.add_argument("--force", action="store_true", help="replace an existing model file")
    imp.add_argument(
        "--era", help="MiniMind era of a .pth: v1, minimindlm, minimind2, minimind3 (default: from the tensor names)"
    )
    imp.add_argument("--heads", type=int, help="num_attention_heads (a .pth does not record it)")
    imp.add_argument("--eps", type=float, help="rms_norm_eps")
    imp.add_argument("--theta", type=float, help="rope_theta")
    imp.add_argument("--max-pos", type=int, help="max_position_embeddings")
    imp.add_argument("--topk", type=int, help="num_experts_per_tok (MoE)")
    exp = sub.add_parser("export", help="export a model file as a Hugging Face folder")
    exp.add_argument("model")
    exp.add_argument("-o", "--output", required=True, help="the folder to write")
    exp.add_argument(
        "--format",
        choices=("hf", "minimind"),
        default="hf",
        help="hf: Llama/Qwen3/Qwen3-MoE; minimind: MiniMindForCausalLM",
    )


COMMANDS = {
    "import": cmd_import,
    "export": cmd_export,
    "generate": cmd_generate,
    "quantize": cmd_quantize,
    "info": cmd_info,
    "torch-forward": cmd_torch_forward,
    "cpp-forward": cmd_cpp_forward,
    "compare": cmd_compare,
    "campaign": cmd_campaign,
    "complete": cmd_complete,
    "precision": cmd_precision,
    "bench": cmd_bench,
    "bench-compare": cmd_bench_compare,
    "bench-history": cmd_bench_history,
    "machine": cmd_machine,
    "profile": cmd_profile,
    "train": cmd_train,
    "lab": cmd_lab,
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.replace("\n", "\n  ")  # a compiler diagnostic keeps its lines, indented under the error


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "lab":
        args.extra = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except CelerInferError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read or written: name it, no traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
