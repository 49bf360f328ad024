"""Measure how close a correct C++ forward comes to the debugger's tolerance.

Runs compare() over random configs from the property grid (celerinfer_lab.testing.model_cases, the
strategy tests/test_native.py and tests/test_fast.py draw from) and prints, for
accumulated and isolated errors, the distribution of  error / max(floor, MIN_FLOOR)  -- the debugger
calls a point divergent above FACTOR (10). Re-run it after changing a kernel: the margin is
FACTOR / the largest ratio.

    python scripts/tolerance_margin.py [EXAMPLES] [--kernels fast] [--kv-cache bf16]    (default 300)

With --kernels bf16 or q8, each random float32 model is quantized in memory and the kernel judged
against float64 on the same reduced weights (compare's precision-matched oracle). With --kv-cache
bf16 the keys and values are rounded as they join the cache on both sides, and the script also
prints the false alarms (configs whose report does not agree) and how many cached values the C++
rounded to the other bf16 neighbour than the oracle would (the flips the rounding-point rule admits).
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="?", type=int, default=300, help="random configs to try (default 300)")
    parser.add_argument("--kernels", default="fast", help="the kernel set to judge (default fast)")
    parser.add_argument("--kv-cache", default="f32", choices=("f32", "bf16"), help="the KV cache format (default f32)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error(f"examples={args.examples}: need at least 1")

    import numpy as np
    from hypothesis import HealthCheck, given, settings

    from celerinfer_lab.compare import FACTOR, MIN_FLOOR, compare
    from celerinfer_lab.kvcache import CACHE_PRE, round_bf16
    from celerinfer_lab.native import load_native
    from celerinfer_lab.testing import model_cases

    native = load_native()
    native.check_kernels(args.kernels)
    rows = []
    alarms: list[str] = []
    flips = [0, 0]  # cached values where the oracle adopted the C++'s other neighbour; values compared

    @settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(model=model_cases())
    def measure(model):
        report = compare(model, native, kernels=args.kernels, precision="off", kv_cache=args.kv_cache)
        if not report.agrees:
            alarms.append(f"{model.config.to_dict()} {report.culprit or report.first_divergent}")
        for name, cached in report.runs.get("oracle_acc", {}).items():
            suffix = ".".join(name.split(".")[3:])
            if suffix in CACHE_PRE:  # a flip adopted: the oracle holds other than its own RNE
                pre = report.runs["oracle_acc"][name[: -len(suffix)] + CACHE_PRE[suffix]].reshape(cached.shape)
                flips[0] += int((round_bf16(pre) != cached).sum())
                flips[1] += cached.size
        for p in report.points:
            if not p.name.endswith("topk_idx"):
                rows.append((p.rel_l2 / max(p.floor, MIN_FLOOR), p.own_rel_l2 / max(p.own_floor, MIN_FLOOR), p.name))

    measure()
    acc, own = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    print(f"{args.kernels}: {len(rows)} trace points from {args.examples} configs; divergent above {FACTOR:g}")
    for q in (50, 99, 99.9, 100):
        print(f"  percentile {q:5}: accumulated {np.percentile(acc, q):6.2f}   isolated {np.percentile(own, q):6.2f}")
    print(f"margin: {FACTOR / max(acc.max(), own.max()):.1f}x")
    print(f"false alarms (reports that do not agree): {len(alarms)} of {args.examples}")
    for alarm in alarms[:5]:
        print("  " + alarm)
    if args.kv_cache == "bf16":
        print(
            f"admissible flips adopted (the C++ rounded to the other neighbour): {flips[0]} of {flips[1]} cached values"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
