"""Benchmark PreNet against py4DSTEM's built-in classical methods on held-out simulated scans.

Prints the origin, ellipse and denoising tables (the full run is what
``prenet benchmark --out BENCHMARKS.md`` writes).

Run: python examples/benchmark.py [--fast]
"""

import sys

from py4dstem_prenet.evaluation.benchmark import BenchmarkConfig, prenet_methods, run_benchmark


def main(fast: bool = False) -> str:
    cfg = BenchmarkConfig(doses=(1e3, 1e5), scan_shape=(3, 3), n_scans=1, detector_shape=(64, 64),
                          sim_patterns=50) if fast else BenchmarkConfig()
    result = run_benchmark(cfg, prenet_methods(), progress=lambda m: print(f"[benchmark] {m}", file=sys.stderr))
    table = result.to_markdown()
    print(table)
    return table


if __name__ == "__main__":
    main(fast="--fast" in sys.argv)
