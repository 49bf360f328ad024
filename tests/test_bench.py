"""The benchmark workflow runs and its numbers are sane (never that a time is below a bound)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from celerinfer_lab import load_native, preset
from celerinfer_lab.bench import Timing, plot_sweep, sweep, time_call


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One work folder for the bench runs: base_line_micro is built once, then rebuilt incrementally."""
    return tmp_path_factory.mktemp("bench-work")


# the original tool's positional arguments for the tiny default model: hidden layers heads kvh vocab seq batch
TINY_ARGS = ("64", "2", "8", "2", "128", "5", "2")


def test_bench_command_runs_and_writes_json(tmp_path, work):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "celerinfer_lab.cli",
            "bench",
            *TINY_ARGS,
            "--repeat",
            "3",
            "--warmup",
            "1",
            "--decode",
            "6",
            "--json",
            str(out),
            "--work-dir",
            str(work),
        ],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for words in (
        "PyTorch forward",
        "C++ via cppyy (fast)",
        "C++ standalone",
        "faster",
        "load, JSON only",
        "load, safetensors sidecar",
        "logits torch",
        "logits cpp",
        "max |cpp - torch|",
        "same tokens: True",
    ):
        assert words in r.stdout, words
    result = json.loads(out.read_text())
    for key in (
        "torch_forward_ms",
        "cpp_forward_ms",
        "standalone_forward_ms",
        "standalone_load_ms",
        "max_abs_diff",
        "torch_decode_tok_s",
        "cpp_decode_tok_s",
        "torch_forward_min_ms",
        "torch_forward_max_ms",
        "standalone_load_sidecar_ms",
        "python_load_json_ms",
        "python_load_sidecar_ms",
    ):
        assert key in result and result[key] > 0, key
    assert result["torch_forward_min_ms"] <= result["torch_forward_ms"] <= result["torch_forward_max_ms"]
    assert result["max_abs_diff"] < 1e-4 and result["decode_tokens_equal"] is True
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"] and result["machine"]["cpp_threads"] >= 1
    assert result["config"]["hidden_size"] == 64 and result["batch"] == 2 and result["seq_len"] == 5
    assert result["kernels"] == ["fast"] and list(result["kernel_sets"]) == ["fast"]  # --kernels defaults to fast


def test_bench_times_every_kernel_set(tmp_path, work):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "celerinfer_lab.cli",
            "bench",
            *TINY_ARGS,
            "--kernels",
            "all",
            "--repeat",
            "2",
            "--warmup",
            "1",
            "--decode",
            "4",
            "--json",
            str(out),
            "--work-dir",
            str(work),
        ],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("fast", "readable"):
        for words in (
            f"C++ via cppyy ({name})",
            f"C++ standalone ({name})",
            f"logits cpp ({name})",
            f"max |cpp - torch| ({name})",
            f"({name}): torch",
        ):
            assert words in r.stdout, words
    assert r.stdout.index("C++ via cppyy (fast)") < r.stdout.index("C++ via cppyy (readable)")  # fast first
    result = json.loads(out.read_text())
    sets = ["fast", "readable", "readable-bf16", "readable-q8", "bf16", "q8"]
    assert result["kernels"] == sets and list(result["kernel_sets"]) == sets
    assert result["decode_passes"] == 3 and len(result["decode_read_gbs_passes"]) == 3 and result["decode_read_gbs"] > 0
    assert "of the read bandwidth in the same passes" in r.stdout
    for name in ("bf16", "q8"):  # base_line_micro runs them on a file of their format; ratio to fast
        alone = [line for line in r.stdout.splitlines() if line.startswith(f"C++ standalone ({name})")]
        assert len(alone) == 1 and "faster" in alone[0]
        ratio = [line for line in r.stdout.splitlines() if line.startswith(f"decode {name} / fast: ")]
        assert len(ratio) == 1 and "median of 3 interleaved passes; per pass " in ratio[0], ratio
        assert (work / f"model_{name}.json").exists()
    for name, per_set in result["kernel_sets"].items():  # prefill in interleaved rounds: ratios to fast per round
        rounds = per_set["cpp_forward_vs_fast_rounds"]
        if name == "fast":
            assert rounds is None
            continue
        assert len(rounds) == 2 and all(x > 0 for x in rounds), name  # --repeat 2
        line = [x for x in r.stdout.splitlines() if x.startswith(f"prefill {name} / fast: ")]
        assert len(line) == 1 and f"(median of {len(rounds)} interleaved rounds; per round " in line[0], line
        assert f"{float(np.median(rounds)):.2f}x" in line[0]
    for name, per_set in result["kernel_sets"].items():
        reduced = per_set["weight_format"] != "f32"
        assert per_set["weight_format"] == {"bf16": "bf16", "q8": "q8"}.get(name.split("-")[-1], "f32"), name
        for key in ("cpp_forward_ms", "cpp_forward_min_ms", "cpp_forward_max_ms", "cpp_decode_tok_s"):
            assert per_set[key] > 0, (name, key)
        passes = per_set["cpp_decode_tok_s_passes"]  # the default 3 interleaved rounds; the rate is their median
        assert len(passes) == 3 and per_set["cpp_decode_tok_s"] == float(np.median(passes)), name
        assert per_set["decode_gbs"] > 0 and len(per_set["decode_of_read_bandwidth_passes"]) == 3, name
        if reduced:  # against float32 torch: what the precision costs, small on this model but not 0;
            # the standalone on the bf16/q8 file computes what cppyy does (the same kernels, the same weights)
            assert per_set["standalone_forward_ms"] > 0 and 0 < per_set["max_abs_diff"] < 0.5, name
            assert abs(per_set["standalone_max_abs_diff"] - per_set["max_abs_diff"]) < 1e-5, name
            continue
        for key in ("standalone_forward_ms", "standalone_load_ms"):
            assert per_set[key] > 0, (name, key)
        assert per_set["max_abs_diff"] < 1e-4 and per_set["standalone_max_abs_diff"] < 1e-4, name  # agrees with torch
        assert per_set["decode_tokens_equal"] is True, name
    for key in ("cpp_forward_ms", "standalone_forward_ms", "max_abs_diff", "cpp_decode_tok_s"):  # flat: the first set
        assert result[key] == result["kernel_sets"]["fast"][key], key


def test_forwards_are_timed_in_interleaved_rounds():
    """time_calls_interleaved warms every function up, then calls each once per round in turn;
    round_ratios pairs the samples of one round."""
    from celerinfer_lab.bench import Timing, round_ratios, time_calls_interleaved

    calls: list[str] = []
    timings = time_calls_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, 3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert [t.runs for t in timings.values()] == [3, 3] and all(len(t.samples_ms) == 3 for t in timings.values())
    base = Timing(10.0, 8.0, 12.0, 3, samples_ms=[8.0, 10.0, 12.0])
    other = Timing(5.0, 4.0, 6.0, 3, samples_ms=[4.0, 5.0, 12.0])
    assert round_ratios(base, other) == [2.0, 2.0, 1.0]


def test_decode_passes_interleave_every_decoder():
    """Each round runs every decoder in turn (after one warm-up each), so a ratio pairs rates taken on
    the same machine state: a drift between rounds moves both sides of a pass's ratio, not the ratio."""
    from celerinfer_lab.bench import interleaved_decode, pass_ratios

    calls: list[tuple[str, int]] = []
    machine = {"slowdown": 1.0}

    def decoder(name: str, ms_per_token: float):
        def run(new_tokens: int):
            calls.append((name, new_tokens))
            machine["slowdown"] *= 1.5 if name == "b" else 1.0  # the machine drifts after every b pass
            seconds = new_tokens * ms_per_token * machine["slowdown"] / 1e3
            return np.arange(new_tokens), seconds, [seconds * 1e3 / new_tokens] * (new_tokens - 1)

        return run

    steps: dict[str, list[float]] = {}
    rates, tokens = interleaved_decode({"a": decoder("a", 4.0), "b": decoder("b", 2.0)}, 8, 3, 8, steps)
    assert calls == [("a", 3), ("b", 3)] + [("a", 8), ("b", 8)] * 3
    assert len(rates["a"]) == len(rates["b"]) == 3 and rates["a"][0] > rates["a"][1] > rates["a"][2]  # drifted
    ratios = pass_ratios(rates, "b", "a")
    assert ratios == pytest.approx([2.0 / 1.5] * 3)  # within a round: only b's own drift, not the trend
    assert len(steps["a"]) == len(steps["b"]) == 3 * 7 and all(len(t) == 8 for t in tokens["a"])


def test_bench_rejects_bad_arguments():
    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "celerinfer_lab.cli", "bench", *a],
            capture_output=True,
            text=True,
        )

    r = run("64", "2", "8")
    assert r.returncode == 2 and "expected 7 numbers" in r.stderr
    r = run("64", "2", "8", "3", "128", "5", "2")
    assert r.returncode == 2 and "num_key_value_heads=3" in r.stderr
    r = run("--preset", "minimind2-small", *TINY_ARGS)
    assert r.returncode == 2 and "either --preset or the seven numbers" in r.stderr
    r = run("--kernels", "fastest", "--repeat", "1", "--warmup", "0")
    assert r.returncode == 2 and "unknown kernel set 'fastest'" in r.stderr and "readable, fast" in r.stderr
    r = run("--decode", "4", "--decode-passes", "0")
    assert r.returncode == 2 and "--decode-passes 0: must be 1 or more" in r.stderr
    from celerinfer_lab import ModelConfig
    from celerinfer_lab.bench import measure_bench
    from celerinfer_lab.errors import UsageError

    with pytest.raises(UsageError, match="decode_passes=0: the interleaved decode rounds"):  # before any work
        measure_bench(ModelConfig(), 1, 4, decode=4, decode_passes=0)
    r = run("--decode", "1")  # no step after the prefill's token: a rate of nothing (and ratios of 0 / 0)
    assert r.returncode == 2 and "decode=1: no decode step to time" in r.stderr


def test_time_call_times_the_call():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, repeat=5)
    assert len(calls) == 7 and timing.runs == 5 and 0 <= timing.min_ms <= timing.median_ms <= timing.max_ms
    assert timing.min_ms <= timing.q1_ms <= timing.median_ms <= timing.q3_ms <= timing.max_ms and timing.cores >= 1
    assert "IQR" in str(timing) and "5 runs" in str(timing)


def test_timing_says_noisy_from_spread_or_load():
    quiet = Timing(1.0, 0.9, 3.0, 20, 0.98, 1.05, load=0.5, cores=2)
    assert not quiet.noisy and "noisy" not in str(quiet) and quiet.spread == "IQR 0.98–1.05 ms"
    wide = Timing(1.0, 0.5, 3.0, 20, 0.8, 1.4, load=0.5, cores=2)  # IQR 60% of the median
    assert wide.noisy and "spread 60% of the median" in str(wide) and "noisy" in wide.short()
    loaded = Timing(1.0, 0.9, 1.1, 20, 0.99, 1.01, load=4.2, cores=2)
    assert loaded.noisy and "load 4.2 on 2 cores" in str(loaded)
    value, noisy = quiet.ratio(Timing(4.0, 3.9, 4.1, 20, 3.95, 4.05, load=0.5, cores=2))
    assert value == 4.0 and not noisy
    assert quiet.ratio(loaded)[1] and quiet.ratio_text(loaded).endswith("noisy")
    assert Timing(1.0, 0.5, 2.0, 3).spread.startswith("min–max")  # no quartiles: min-max


def test_sweep_and_plot():
    cases = [
        (
            f"h{h}",
            preset("minimind2-small", hidden_size=h, num_hidden_layers=1, vocab_size=256, intermediate_size=2 * h),
            1,
            16,
        )
        for h in (64, 128)
    ]
    table = sweep(cases, load_native(kernels="fast"), warmup=1, repeat=2)
    assert list(table.index) == ["h64", "h128"] and (table[["torch_ms", "cpp_ms"]] > 0).all().all()
    assert np.allclose(table["speedup"], table["torch_ms"] / table["cpp_ms"])
    assert {"torch_q1_ms", "torch_q3_ms", "cpp_q1_ms", "cpp_q3_ms", "noisy"} <= set(table.columns)
    fig = plot_sweep(table)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.get_lines()) == 2
    bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bands) == 2  # one spread band per side, not single points


def test_a_bench_on_one_thread_puts_torch_threads_back(tmp_path, native):
    """--threads is for the bench's run only: torch's thread count and the C++ pool's are process-wide,
    and left at 1 they slowed every later forward of the session (and torch's changed its float32 sums)."""
    import torch

    from celerinfer_lab import ModelConfig
    from celerinfer_lab.bench import measure_bench

    torch.set_num_threads(2)
    native.set_threads(2)
    result = measure_bench(ModelConfig(), 1, 4, threads=1, repeat=1, warmup=0, work_dir=tmp_path, standalone=False)
    assert result.record["machine"]["torch_threads"] == 1 and result.record["machine"]["cpp_threads"] == 1
    assert torch.get_num_threads() == 2 and native.threads == 2
