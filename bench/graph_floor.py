"""The time a CUDA-graph replay costs before any work: one replay of a graph of N dependent
one-element kernels, timed as `fp4moe bench` times a layer (CUDA events around each replay,
median after warm-up). It bounds from below what a decode call of N kernels can measure, however
few bytes it reads (docs/PERF.md, decode: the floor of a T = 1 call).

Usage: python3 bench/graph_floor.py [--kernels 1,2,5] [--repeat 500]
"""
import argparse
import statistics

import torch


def replay_us(kernels, repeat):
    x = torch.zeros(1, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            for _ in range(kernels):
                x.add_(1.0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(kernels):
            x.add_(1.0)
    times = []
    for i in range(repeat + 50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 50:
            times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="1,2,5")
    ap.add_argument("--repeat", type=int, default=500)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    print("kernels  replay_us (median, CUDA events around each replay)")
    for n in (int(v) for v in args.kernels.split(",")):
        print(f"{n:7d}  {replay_us(n, args.repeat):9.2f}")


if __name__ == "__main__":
    main()
