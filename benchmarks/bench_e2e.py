"""End-to-end CPU transcription latency, real-time factor, peak memory and model bytes per deployment.

    python benchmarks/bench_e2e.py                       # tiny.en, 3 LibriVox test clips
    python benchmarks/bench_e2e.py --model base
    python benchmarks/bench_e2e.py --quick               # 1 clip, 1 repeat, for iteration

Configurations (each in its own subprocess, benchmarks/e2e_worker.py, so ru_maxrss is its own):

- fp32 eager / compiled: `export_whisper(model, max_cache_len=pipeline.MAX_CACHE_LEN)` programs'
  ``.module()`` driven by `greedy_decode`; compiled = both modules through ``torch.compile`` (inductor).
- bf16 eager / compiled: the same from the model cast to bfloat16, with bfloat16 features.
- artifact bf16 eager / compiled: the personalised low-bit model as deployed: `quantize_whisper`
  (calibrated on the corpus speaker 'slt', formats int8 + int4, budget halfway between the uniform
  int4 and int8 sizes), `save_lowered_artifact`, then in the worker only
  `load_artifact(dir, compute_dtype=torch.bfloat16)` (aten int4 layout, bfloat16 matmuls).
- artifact exact eager: the same artifact with ``compute_dtype=None`` (portable path, dequantizes every
  weight on every call): one clip, at most ``--exact-tokens`` new tokens, under a time limit.

Per configuration: one warm-up decode of the first clip (the compile happens there; reported
separately), then ``--repeats`` passes over the clips at batch 1 (best pass per clip), then one batch of
all clips (after its own warm-up). ms/token = decode wall seconds (encoder included) / generated
tokens; RTF = decode wall seconds / audio seconds. Tokens are compared with fp32 eager's, clip by clip.

Writes benchmarks/results/e2e_<model>_<machine>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402

from benchmarks.machine import describe_machine, machine_line, machine_slug  # noqa: E402
from torch_myqasr.atomic import atomic_open, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORKER = Path(__file__).resolve().parent / "e2e_worker.py"
MIB = 2**20

# (name, worker config, compile)
CONFIGS = [
    ("fp32 eager", "fp32", False),
    ("fp32 compiled", "fp32", True),
    ("bf16 eager", "bf16", False),
    ("bf16 compiled", "bf16", True),
    ("artifact bf16-kernels eager", "artifact-bf16", False),
    ("artifact bf16-kernels compiled", "artifact-bf16", True),
    ("artifact AOTInductor package", "artifact-aoti", False),
    ("artifact exact (compute_dtype=None) eager", "artifact-exact", False),
]


def prepare(args, work: Path) -> dict:
    """Features of the test clips (saved for the workers) and the personalised artifact."""
    from torch_myqasr.allocation import budget_for_bits, uniform_size_mb
    from torch_myqasr.audio import load_dataset_audio, open_dataset
    from torch_myqasr.corpus import corpus_manifest
    from torch_myqasr.evaluation.transcribe import SAMPLE_RATE, featurize, max_new_tokens_for
    from torch_myqasr.models import load_whisper
    from torch_myqasr.pipeline import layer_inventory, quantize_whisper, save_lowered_artifact

    info: dict = {}
    bundle = load_whisper(args.model)
    pairs = list(load_dataset_audio(open_dataset(corpus_manifest("test")).filter(speakers=[args.speaker])))
    pairs = pairs[: args.clips]
    audios = [a for _, a in pairs]
    seconds = [len(a) / SAMPLE_RATE for a in audios]
    caps = [max_new_tokens_for(s) for s in seconds]
    clips = [featurize(bundle, [a]) for a in audios]
    torch.save({"clips": clips, "batch": featurize(bundle, audios), "caps": caps, "seconds": seconds},
               work / "features.pt")
    info.update(clip_ids=[u.id for u, _ in pairs], audio_seconds=seconds, caps=caps,
                references=[u.text for u, _ in pairs])

    calib = [a for _, a in load_dataset_audio(open_dataset(corpus_manifest("calib")).filter(speakers=[args.calib_speaker]))]
    calib = calib[: args.calib_clips]
    t = time.perf_counter()
    inventory = layer_inventory(bundle, calib[0])
    u4, u8 = uniform_size_mb(inventory, "int4"), uniform_size_mb(inventory, "int8")
    budget = args.budget if args.budget is not None else math.floor((u4 + u8) / 2 * 1000) / 1000
    info.update(uniform_int4_mib=u4, uniform_int8_mib=u8, fp32_mib=inventory.size_mb, budget_mib=budget,
                budget_for_bits_6=budget_for_bits(inventory, 6.0), budget_for_bits_6_5=budget_for_bits(inventory, 6.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = quantize_whisper(bundle, calib, budget_mb=budget, formats=("int8", "int4"), progress=False)
    t_aoti = time.perf_counter()
    save_lowered_artifact(qw, work / "quantized", aot_inductor=args.aot_inductor)
    info["artifact_save_s"] = time.perf_counter() - t_aoti  # AOTInductor compilation included when asked
    info["aot_inductor"] = args.aot_inductor
    from torch_myqasr.allocation import bit_histogram

    info.update(scheme_size_mib=qw.scheme.size_mb, scheme_formats=bit_histogram(qw.scheme),
                quantize_s=time.perf_counter() - t, calib_clips=len(calib))
    info["artifact_disk_bytes"] = sum(f.stat().st_size for f in (work / "quantized" / "artifact").rglob("*") if f.is_file())
    return info


def run_worker(spec: dict, work: Path, timeout: float) -> dict:
    name = f"{spec['config']}{'-compiled' if spec['compile'] else ''}"
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(WORKER), str(spec_path), str(out_path)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over the {timeout:.0f} s time limit for this configuration"}
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stderr or "")[-3000:]
        return {"skipped": f"worker exited {proc.returncode}", "traceback": tail}
    res = json.loads(out_path.read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def _same(a: list[int], ref: list[int], prefix: bool) -> bool:
    return a == (ref[: len(a)] if prefix else ref)


def summarise(rows: list[dict]) -> None:
    base = next((r for r in rows if r["name"] == "fp32 eager" and "skipped" not in r), None)
    for r in sorted(rows, key=lambda r: r["name"] != "fp32 eager"):
        if "skipped" in r:
            continue
        r["ms_per_token"] = 1000 * r["decode_s"] / max(1, r["n_tokens"])
        r["rtf"] = r["decode_s"] / sum(r["audio_seconds"])
        if base and "ms_per_token" in base:
            prefix = r["config"] == "artifact-exact"
            r["identical"] = sum(_same(t, b, prefix) for t, b in zip(r["tokens"], base["tokens"]))
            # the exact path decodes fewer tokens of one clip: compare per token
            r["speedup"] = base["ms_per_token"] / r["ms_per_token"]
            if "batch_decode_s" in r and "batch_decode_s" in base:
                r["batch_speedup"] = base["batch_decode_s"] / r["batch_decode_s"]


def to_markdown(res: dict, cmd: str) -> str:
    p = res["prepare"]
    lines = [
        f"# End-to-end CPU transcription: Whisper {res['model']} (benchmarks/bench_e2e.py)",
        "",
        f"Machine: {machine_line()}  ",
        f"Command: `{cmd}`  ",
        f"Date: {res['date']} UTC. 1-min load average {res['load_before']:.1f} before, {res['load_after']:.1f} after the run "
        f"(on {os.cpu_count()} cores; other jobs inflate absolute times: compare the ratios within one run).",
        "",
        f"Clips: {len(p['clip_ids'])} corpus test clips of speaker '{res['speaker']}' ({', '.join(p['clip_ids'])}), "
        f"{sum(p['audio_seconds']):.1f} s of audio, new-token caps {p['caps']} (max_new_tokens_for). "
        f"Batch 1, {res['repeats']} pass(es) over the clips, best pass per clip; {res['machine']['torch_threads'] if not res['threads'] else res['threads']} torch threads; encoder included in every time.",
        "",
        f"Personalised model: `quantize_whisper` calibrated on {p['calib_clips']} unlabelled '{res['calib_speaker']}' clips, "
        f"formats int8 + int4, budget {p['budget_mib']:.3f} MiB (halfway between uniform int4 {p['uniform_int4_mib']:.3f} and "
        f"uniform int8 {p['uniform_int8_mib']:.3f} MiB; fp32 {p['fp32_mib']:.3f} MiB), scheme {p['scheme_size_mib']:.3f} MiB "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(p['scheme_formats'].items()))}); quantize + save {p['quantize_s']:.0f} s. "
        f"Artifact on disk {p['artifact_disk_bytes'] / MIB:.2f} MiB"
        + (f" (with AOTInductor packages; writing it took {p['artifact_save_s']:.0f} s)." if p.get('aot_inductor') else "."),
        "",
        "| config | weights MiB (resident) | peak RSS MiB | RSS after decode MiB | warm-up s | ms/token | RTF | speed-up vs fp32 eager | tokens identical to fp32 eager | tokens | batch-of-all s (speed-up) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | | | | | | | |")
            continue
        w = f"{r['weights_bytes'] / MIB:.2f}"
        if "module_bytes" in r:
            w += f" ({r['module_bytes'] / MIB:.2f} all buffers)"
        warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else "-"
        if "batch_warmup_s" in r:
            warm += f" (+{r['batch_warmup_s']:.1f} batch)"
        batch = f"{r['batch_decode_s']:.2f}" if "batch_decode_s" in r else "-"
        if "batch_speedup" in r:
            batch += f" ({r['batch_speedup']:.2f}x)"
        ident = f"{r['identical']}/{r['n_clips']}" if "identical" in r else "-"
        if r["config"] == "artifact-exact":
            ident += " (prefix)"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(f"| {r['name']} | {w} | {r['peak_rss_mib']:.0f} | {r['rss_end_mib']:.0f} | {warm} | "
                     f"{r['ms_per_token']:.1f} | {r['rtf']:.3f} | {sp} | {ident} | {r['n_tokens']} | {batch} |")
    arts = [r for r in res["rows"] if r["config"].startswith("artifact") and "skipped" not in r]
    lines += [
        "",
        "Notes:",
        "- weights MiB: exported fp32 / bf16 = every parameter and buffer of the two programs (`lowering.module_bytes`); "
        "artifact = `lowering.quantized_weight_bytes` of encoder + decoder step (the packed low-bit weights as held in "
        "memory), with `module_bytes` (everything: packed weights, fp32 biases, norms, positions) in brackets.",
    ]
    for r in arts[:1]:
        lines.append(f"- scheme: `size_bytes` {r['scheme_size_bytes']:,} B = {r['scheme_size_bytes'] / MIB:.3f} MiB, "
                     f"budget {r['scheme_budget_mb']:.3f} MiB.")
    lines += [
        "- peak RSS = the peak resident set (VmHWM) of the configuration's own process. Not `ru_maxrss`: Linux copies the forked "
        "child's pre-exec high-water mark (the parent benchmark holding the fp32 model) into it at exec, so every worker read the "
        "same value (kept in the JSON as `ru_maxrss_mib`). fp32 / bf16 processes load the Hugging Face model "
        "and export it (part of their peak); artifact processes load only the artifact and precomputed features. "
        "Compiled processes include inductor's compile-time memory.",
        "- warm-up: the first decode of clip 1 (torch.compile compiles the encoder and the decoder step for T=2 and "
        "T=1 here); (+batch) is the first decode at the batch size of all clips (recompiles for a dynamic batch).",
        "- ms/token and RTF are at batch 1; the last column decodes all clips as one batch (cap = the largest clip cap).",
    ]
    for r in res["rows"]:
        if r["config"] == "artifact-exact" and "skipped" not in r:
            lines.append(f"- artifact exact: {r['n_clips']} clip, at most {res['exact_tokens']} new tokens, no warm-up "
                         "(nothing to compile); tokens compared with the same-length prefix of fp32 eager's; speed-up "
                         "is per token (fp32 eager ms/token / its ms/token); its RTF is for a truncated transcript.")
        if "skipped" in r:
            lines.append(f"- {r['name']} skipped: {r['skipped']}")
        if "batch_error" in r:
            lines.append(f"- {r['name']}: batch of all clips failed: {r['batch_error'][:300]}")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "skipped" not in r]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = [r["name"].replace(" (compute_dtype=None)", "") for r in rows]
    vals = [r["ms_per_token"] for r in rows]
    bars = ax.barh(names[::-1], vals[::-1], color=["#4c72b0" if "artifact" not in n else "#dd8452" for n in names[::-1]])
    for b, v in zip(bars, vals[::-1]):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.0f}", va="center", fontsize=8)
    if max(vals) / max(1e-9, min(vals)) > 30:
        ax.set_xscale("log")
    ax.set_xlabel("ms per generated token, batch 1, encoder included (shared 2-core CPU)")
    ax.set_title(f"Whisper {res['model']}: end-to-end greedy decoding on CPU")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny.en", help="tiny.en or base")
    p.add_argument("--speaker", default="librivox", help="corpus test speaker whose clips are decoded")
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="passes over the clips (best per clip)")
    p.add_argument("--calib-speaker", default="slt")
    p.add_argument("--calib-clips", type=int, default=8)
    p.add_argument("--budget", type=float, default=None, help="MiB; default halfway between uniform int4 and int8")
    p.add_argument("--exact-tokens", type=int, default=12, help="new-token cap of the exact artifact path (1 clip)")
    p.add_argument("--exact-timeout", type=float, default=150.0, help="seconds before the exact path is skipped")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per other configuration")
    p.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(c[0] for c in CONFIGS))
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    p.add_argument("--no-batch", action="store_true")
    p.add_argument("--no-aot-inductor", dest="aot_inductor", action="store_false",
                   help="skip the AOTInductor packages (their compilation takes minutes)")
    p.add_argument("--quick", action="store_true", help="1 clip, 1 pass, 4 calibration clips")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.clips, args.repeats, args.calib_clips = 1, 1, 4
    cmd = "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:])
    wanted = [c for c in CONFIGS if args.configs is None or c[0] in args.configs.split(",")]
    if not args.aot_inductor:
        wanted = [c for c in wanted if c[1] != "artifact-aoti"]
    res = {"model": args.model, "machine": describe_machine(), "command": cmd, "speaker": args.speaker,
           "calib_speaker": args.calib_speaker, "repeats": args.repeats, "exact_tokens": args.exact_tokens,
           "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_before": os.getloadavg()[0],
           "shared_machine": True, "threads": args.threads, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        res["prepare"] = prepare(args, work)
        print(f"prepared in {time.perf_counter() - t:.0f} s: {json.dumps(res['prepare'])}", flush=True)
        for name, config, compiled in wanted:
            exact = config == "artifact-exact"
            spec = {"config": config, "compile": compiled, "model": args.model, "features": str(work / "features.pt"),
                    "artifact": str(work / "quantized" / "artifact"), "repeats": 1 if exact else args.repeats,
                    "batch": not args.no_batch and not exact, "max_clips": 1 if exact else None,
                    "token_cap": args.exact_tokens if exact else None, "no_warmup": exact,
                    "threads": args.threads}
            r = run_worker(spec, work, args.exact_timeout if exact else args.timeout)
            r.update(name=name, config=config, compile=compiled)
            res["rows"].append(r)
            short = {k: v for k, v in r.items()
                     if k not in ("tokens", "batch_tokens", "clip_all_seconds", "traceback", "batch_traceback")}
            print(name, json.dumps(short), flush=True)
            if "traceback" in r:
                print(r["traceback"], flush=True)
    res["load_after"] = os.getloadavg()[0]
    summarise(res["rows"])
    md = to_markdown(res, cmd)
    print(md)
    if args.no_write:
        return
    slug = args.model.replace(".", "-").replace("/", "-")
    stem = RESULTS / f"e2e_{slug}_{machine_slug()}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_suffix(".md"), md)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(res, indent=1, default=str))
    plot(res, stem.with_suffix(".png"))
    print("wrote", stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
