"""llama.cpp's speed on the same models, for the README's table beside `celerinfer-lab bench`.

    python scripts/llama_cpp_bench.py --llama-bench PATH/llama-bench [--presets minimind2-small,minimind2]
        [--types f32,f16,q8_0] [--prompt 512] [--gen 128] [--threads 2] [--repeat 5]

Writes each preset's random model as GGUF (celerinfer_lab.gguf_export, llama.cpp's `llama`
architecture) in each type and runs llama-bench on it: prefill of --prompt tokens (pp) and decode of
--gen tokens (tg), tokens/s as llama-bench reports them (mean ± standard deviation over --repeat).
llama-bench is llama.cpp's own tool: build it from llama.cpp's source (README, "Reduced-precision
weights"); this script does not build it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import celerinfer_lab as cl
from celerinfer_lab.gguf_export import GGUF_TYPES, write_gguf


def run_llama_bench(binary: str, gguf: Path, args: argparse.Namespace) -> list[dict]:
    cmd = [binary, "-m", str(gguf), "-p", str(args.prompt), "-n", str(args.gen), "-t", str(args.threads)]
    cmd += ["-r", str(args.repeat), "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"llama-bench failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bench", required=True, help="the llama-bench binary")
    parser.add_argument("--presets", default="minimind2-small,minimind2")
    parser.add_argument("--types", default=",".join(GGUF_TYPES))
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'model':<16} {'type':<5} {'prefill tok/s':>18} {'decode tok/s':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            model = cl.generate_model(cl.preset(preset), batch_size=1, seq_len=4)
            for gguf_type in args.types.split(","):
                path = write_gguf(model, Path(tmp) / f"{preset}-{gguf_type}.gguf", gguf_type)
                rows = {("pp" if r["n_prompt"] else "tg"): r for r in run_llama_bench(args.llama_bench, path, args)}
                pp, tg = rows["pp"], rows["tg"]
                print(
                    f"{preset:<16} {gguf_type:<5} {pp['avg_ts']:>10.0f} ± {pp['stddev_ts']:<5.0f} "
                    f"{tg['avg_ts']:>8.1f} ± {tg['stddev_ts']:<5.1f}",
                    flush=True,
                )
                path.unlink()


if __name__ == "__main__":
    main()
