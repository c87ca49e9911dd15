"""Microbenchmark of quantized_linear per format, written to benchmarks/results/kernels_<device>.md.

On CPU: the CPU path of each format (aten int4 weight-pack kernel or the dequantize fallback, see
docs/formats.md) against float32 F.linear and bfloat16 F.linear, a few Whisper-sized shapes.
On CUDA: the issue's matrix (M in 1, 4, 16, 64, 1500; Whisper and 4096 / 8192 square shapes)
against bf16 torch.matmul and torchao's int4 weight-only path when it imports; effective GB/s of
weight traffic (packed bytes incl. scales / time) and its fraction of the measured device
bandwidth (a large device-to-device copy).

    python -m benchmarks.bench_kernels            # CPU default: a couple of minutes
    python -m benchmarks.bench_kernels --quick    # smallest run (smoke test)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.machine import machine_line, machine_slug
from torch_myqasr.ops import quantize_weight, quantized_linear

RESULTS = Path(__file__).parent / "results"
CPU_FORMATS = ["int8", "int4", "int3", "int2", "int1", "nf4"]
GPU_FORMATS = ["int8", "int4", "int3", "int2", "int1", "nf4"]
CPU_SHAPES = [(384, 1536), (1536, 384), (1280, 1280)]  # (K, N): tiny.en fc1 / fc2, large-v3 attn
GPU_SHAPES = [(1280, 1280), (1280, 5120), (5120, 1280), (4096, 4096), (8192, 8192)]


def time_call(fn: Callable[[], torch.Tensor], min_time_s: float = 0.2, cuda: bool = False) -> float:
    """Seconds per call of ``fn`` over repeats lasting about ``min_time_s`` (after warm-up): the
    median on CUDA, the minimum on CPU (shared CPUs make every other statistic measure the load)."""
    fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: list[float] = []
    budget_end = time.perf_counter() + min_time_s
    while len(samples) < 5 or (time.perf_counter() < budget_end and len(samples) < 200):
        if cuda:
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] if cuda else samples[0]


def measured_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes / time), 1 GiB buffer."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), cuda=True)
    return 2 * src.numel() * 4 / t / 1e9


def bench_cpu(quick: bool) -> tuple[list[str], list[list[str]]]:
    """Rows for the CPU table: format, shape, M, times (us) and speed-ups against float32 / bf16."""
    header = ["format", "K x N", "M", "act", "path", "q (us)", "fp32 F.linear (us)", "bf16 F.linear (us)",
              "vs fp32", "vs bf16", "weight MB", "GB/s"]
    rows = []
    shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
    ms = [1, 16] if quick else [1, 16, 256]
    for k, n in shapes:
        w = torch.randn(n, k)
        for m in ms:
            x32 = torch.randn(m, k)
            xb = x32.bfloat16()
            wb = w.bfloat16()
            t32 = time_call(lambda: F.linear(x32, w))
            tb = time_call(lambda: F.linear(xb, wb))
            for fmt in CPU_FORMATS:
                qw = quantize_weight(w, fmt, group_size=64)
                for act, x in (("bf16", xb), ("fp32", x32)):
                    if act == "fp32" and m > 16:
                        continue  # the fp32 fallback dequantizes per call; one M shows its cost
                    qw.prepare_cpu()
                    path = "aten int4pack" if qw._cpu_packed is not None and act == "bf16" else "dequant+F.linear"
                    tq = time_call(lambda: quantized_linear(x, qw))
                    rows.append([fmt, f"{k}x{n}", str(m), act, path, f"{tq * 1e6:.0f}", f"{t32 * 1e6:.0f}",
                                 f"{tb * 1e6:.0f}", f"{t32 / tq:.2f}x", f"{tb / tq:.2f}x",
                                 f"{qw.nbytes / 1e6:.2f}", f"{qw.nbytes / tq / 1e9:.1f}"])
                    print(" | ".join(rows[-1]), flush=True)
    return header, rows


def bench_cuda(quick: bool) -> tuple[list[str], list[list[str]], str]:
    """Rows for the GPU table, plus a note line with the measured bandwidth."""
    peak = measured_bandwidth_gbs()
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_  # noqa: F401

        have_torchao = True
    except Exception:  # torchao absent or built for another torch
        have_torchao = False
    header = ["format", "K x N", "M", "q (us)", "bf16 matmul (us)", "speed-up", "GB/s", "% of peak",
              "torchao int4 (us)", "max rel err"]
    rows = []
    shapes = GPU_SHAPES[-1:] if quick else GPU_SHAPES
    ms = [1, 1500] if quick else [1, 4, 16, 64, 1500]
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda")
        wb = w.bfloat16()
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            tb = time_call(lambda: torch.matmul(x, wb.t()), cuda=True)
            tao = ""
            if have_torchao:
                try:
                    from torchao.quantization import Int4WeightOnlyConfig, quantize_

                    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                    lin.weight.data.copy_(wb)
                    quantize_(lin, Int4WeightOnlyConfig(group_size=64))
                    tao = f"{time_call(lambda: lin(x), cuda=True) * 1e6:.1f}"
                except Exception as e:  # record why instead of failing the whole run
                    tao = f"n/a ({type(e).__name__})"
            for fmt in GPU_FORMATS:
                qw = quantize_weight(w, fmt, group_size=64)
                y = quantized_linear(x, qw)
                ref = F.linear(x.float(), qw.dequantize(torch.float32))
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                tq = time_call(lambda: quantized_linear(x, qw), cuda=True)
                gbs = qw.nbytes / tq / 1e9
                rows.append([fmt, f"{k}x{n}", str(m), f"{tq * 1e6:.1f}", f"{tb * 1e6:.1f}", f"{tb / tq:.2f}x",
                             f"{gbs:.0f}", f"{100 * gbs / peak:.0f}%", tao, f"{err:.1e}"])
                print(" | ".join(rows[-1]), flush=True)
    return header, rows, f"Measured device bandwidth (1 GiB device copy): {peak:.0f} GB/s."


def to_markdown(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    """A markdown page: title, notes, one table."""
    lines = [f"# {title}", ""] + [f"{n}  " for n in notes] + ["", "| " + " | ".join(header) + " |",
                                                             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark for this machine's device and write the markdown table; returns its path."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, two M values (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="output file (default results/kernels_<device>.md)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    notes = [f"Machine: {machine_line()}", f"Command: python -m benchmarks.bench_kernels{' --quick' if args.quick else ''}",
             "Times per call: median on CUDA, minimum of repeats on CPU; weight MB / GB/s count the packed bytes incl. scales and zeros (group 64)."]
    if torch.cuda.is_available():
        header, rows, bw = bench_cuda(args.quick)
        notes.append(bw)
        title = "Low-bit dequant-matmul kernels (CUDA, bf16 activations)"
    else:
        header, rows = bench_cpu(args.quick)
        notes.append("CPU path: intB with bf16 activations runs aten's int4 weight-pack kernel "
                     "(int5..int8 as two nibble calls); fp32 activations and nf4 dequantize + F.linear.")
        title = "Low-bit quantized_linear on CPU"
    out = args.out or RESULTS / f"kernels_{machine_slug()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(title, header, rows, notes))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
