"""Measure how close a correct C++ forward comes to the debugger's tolerance.

Runs compare() over random configs from the property grid (celerinfer_lab.testing.model_cases, the
strategy tests/test_native.py and tests/test_fast.py draw from) and prints, for
accumulated and isolated errors, the distribution of  error / max(floor, MIN_FLOOR)  -- the debugger
calls a point divergent above FACTOR (10). Re-run it after changing a kernel: the margin is
FACTOR / the largest ratio.

    python scripts/tolerance_margin.py [EXAMPLES] [--kernels fast]    (default 300; --help for this text)

With --kernels bf16 or q8, each random float32 model is quantized in memory and the kernel judged
against float64 on the same reduced weights (compare's precision-matched oracle).
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="?", type=int, default=300, help="random configs to try (default 300)")
    parser.add_argument("--kernels", default="fast", help="the kernel set to judge (default fast)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error(f"examples={args.examples}: need at least 1")

    import numpy as np
    from hypothesis import HealthCheck, given, settings

    from celerinfer_lab.compare import FACTOR, MIN_FLOOR, compare
    from celerinfer_lab.native import load_native
    from celerinfer_lab.testing import model_cases

    native = load_native()
    native.check_kernels(args.kernels)
    rows = []

    @settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(model=model_cases())
    def measure(model):
        for p in compare(model, native, kernels=args.kernels, precision="off").points:
            if not p.name.endswith("topk_idx"):
                rows.append((p.rel_l2 / max(p.floor, MIN_FLOOR), p.own_rel_l2 / max(p.own_floor, MIN_FLOOR), p.name))

    measure()
    acc, own = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    print(f"{args.kernels}: {len(rows)} trace points from {args.examples} configs; divergent above {FACTOR:g}")
    for q in (50, 99, 99.9, 100):
        print(f"  percentile {q:5}: accumulated {np.percentile(acc, q):6.2f}   isolated {np.percentile(own, q):6.2f}")
    print(f"margin: {FACTOR / max(acc.max(), own.max()):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
