"""The time a CUDA-graph replay costs before any work: one replay of a graph of N dependent
one-element kernels (plain launches, no programmatic dependent launch), timed as `fp4moe bench`
times a layer: replays queued back to back (here behind a long kernel, since Python queues more
slowly than the GPU runs them), an event pair around each, the median after warm-up. The
one-kernel figure bounds from below what any decode call can measure, however few bytes it
reads (docs/PERF.md, decode: the floor of a T = 1 call).

Usage: python3 bench/graph_floor.py [--kernels 1,2,5] [--repeat 300]
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
    for _ in range(50):
        graph.replay()
    # a long kernel first, so the host queues every replay before the GPU reaches them (Python
    # takes longer to queue a replay than the GPU to run one)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    torch.cuda._sleep(100_000_000)
    queued = torch.cuda.Event()
    queued.record()
    pairs = []
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
        pairs.append((start, end))
    # every replay was queued while the long kernel ran (else later ones ran at the host's pace)
    in_time = not queued.query()
    torch.cuda.synchronize()
    if not in_time:
        raise SystemExit("graph_floor: the GPU caught up with the host; use a smaller --repeat")
    return statistics.median(s.elapsed_time(e) * 1000.0 for s, e in pairs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="1,2,5")
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    print("kernels  replay_us (median, replays back to back, CUDA events around each)")
    for n in (int(v) for v in args.kernels.split(",")):
        print(f"{n:7d}  {replay_us(n, args.repeat):9.2f}")


if __name__ == "__main__":
    main()
