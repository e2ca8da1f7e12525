"""Time and peak memory of layer_balanced selection over 2,850 x 32 x 4,096 random scores, streamed.

    python benchmarks/bench_select.py [--samples 2850] [--chunk 50] [--threads 1]

Each measurement runs in a fresh subprocess and reads its peak resident memory (ru_maxrss). The scores
are generated chunk by chunk inside the measured process (the whole array, 1.5 GB in float32, never
exists); a second run that only generates the chunks gives the cost to subtract.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LAYERS, HIDDEN = 32, 4096


def child(mode: str, samples: int, chunk: int, q: float, threads: int) -> None:
    import torch

    from loki.select import select_positions

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)

    def chunks():
        for start in range(0, samples, chunk):
            yield torch.randn(min(chunk, samples - start), LAYERS, HIDDEN, generator=generator)

    start = time.perf_counter()
    if mode == "select":
        positions = select_positions(chunks(), q)
        assert [len(layer) for layer in positions] == [int(q * HIDDEN)] * LAYERS
    else:
        for _ in chunks():
            pass
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib}))


def measure(mode: str, args) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--samples", str(args.samples), "--chunk", str(args.chunk),
               "--q", str(args.q), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["select", "generate"])
    parser.add_argument("--samples", type=int, default=2850)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--q", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.samples, args.chunk, args.q, args.threads)
        return
    generate = measure("generate", args)
    select = measure("select", args)
    whole_gib = args.samples * LAYERS * HIDDEN * 4 / 2**30
    print(f"\n{args.samples} x {LAYERS} x {HIDDEN} random float32 scores ({whole_gib:.2f} GiB if held whole), "
          f"chunks of {args.chunk} samples, q={args.q}, torch threads {args.threads}, CPU.\n")
    print("| run | wall seconds | peak RSS (MiB) |")
    print("|---|---:|---:|")
    print(f"| generate chunks only | {generate['seconds']:.1f} | {generate['peak_mib']:.0f} |")
    print(f"| generate + layer_balanced selection | {select['seconds']:.1f} | {select['peak_mib']:.0f} |")
    # Peak RSS includes the torch runtime; both runs hold one chunk at a time, so compare the totals.
    print(f"| selection alone (time difference) | {select['seconds'] - generate['seconds']:.1f} | - |")


if __name__ == "__main__":
    main()
