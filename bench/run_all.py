"""Run every benchmark in one go and print their tables (make bench).

Each script measures its own ratios side by side in one run; absolute times
are not comparable between runs on these noisy machines. The GPU benchmark
(bench_gpu.py) runs only where CUDA is available.
"""
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = [
    ("stimuli pass vs bare forward; memory vs pool size", ["bench_stimuli.py"]),
    ("neuron and image embedding", ["bench_embedding.py"]),
    ("importance and reversion", ["bench_importance.py", "--threads", "1"]),
    ("distributed stimuli scaling", ["bench_distributed.py"]),
]


def main():
    import torch

    if torch.cuda.is_available():
        SCRIPTS.append(("GPU stimuli pass (VGG16)", ["bench_gpu.py"]))
    extra = [p for p in (HERE / "bench_explorer.py",) if p.exists()]
    for p in extra:
        SCRIPTS.append(("explorer first paint and patch latency", [p.name]))
    for title, cmd in SCRIPTS:
        print(f"\n=== {title} ({' '.join(cmd)}) ===", flush=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        print(f"[{cmd[0]}: exit {r.returncode}, {time.perf_counter() - t:.0f} s]", flush=True)
    print("\n=== end-to-end: conceptevo demo --quick ===", flush=True)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "conceptevo.cli", "demo", "--quick", "--out", "/tmp/conceptevo-bench-demo", "--no-progress"])
    print(f"[demo --quick: exit {r.returncode}, {time.perf_counter() - t:.0f} s]")


if __name__ == "__main__":
    main()
