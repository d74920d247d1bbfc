"""Run every benchmark in one go and print their tables (make bench).

Each script measures its own ratios side by side in one run; absolute times
are not comparable between runs on these noisy machines. The GPU benchmark
(bench_gpu.py) runs only where CUDA is available. Ends with the end-to-end
times of `conceptevo demo --quick` and of the full `conceptevo demo`
(``--skip-full-demo`` leaves the latter out: about 5 minutes on 2 cores).
"""
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = [
    ("stimuli pass vs bare forward; memory vs pool size", ["bench_stimuli.py"]),
    ("stimuli pass over token-shaped units (vit_tiny) vs bare forward", ["bench_tokens.py", "--threads", "1"]),
    ("stimuli pass on the text demo's language model vs bare forward", ["bench_tokens.py", "--model", "lm_tiny", "--threads", "1"]),
    ("neuron and image embedding", ["bench_embedding.py"]),
    ("fidelity of the space against epochs and schedule (planted concepts)", ["bench_fidelity.py", "--quick"]),
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
    demos = [["--quick"]] + ([] if "--skip-full-demo" in sys.argv else [[]])
    for flags in demos:
        name = " ".join(["conceptevo demo", *flags])
        print(f"\n=== end-to-end: {name} ===", flush=True)
        out = Path("/tmp") / ("conceptevo-bench-demo" + "".join(f.strip("-") for f in flags))
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "conceptevo.cli", "demo", *flags, "--out", str(out), "--no-progress"])
        print(f"[{name}: exit {r.returncode}, {time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
