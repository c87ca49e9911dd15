"""One configuration of benchmarks/bench_e2e.py, in its own process so that its peak RSS is its own.

    python benchmarks/e2e_worker.py SPEC.json OUT.json

SPEC (written by bench_e2e.py): ``config`` (fp32 | bf16 | artifact-bf16 | artifact-aoti | artifact-exact), ``compile``
(bool), ``model``, ``features`` (a ``torch.save`` file: per-clip ``[1, n_mels, 3000]`` float32 features,
their caps and seconds, and the batch of all clips), ``artifact`` (folder, for artifact-*),
``repeats``, ``batch`` (bool), ``max_clips`` and ``token_cap`` (the exact path: at most this many
clips and new tokens). OUT: timings, token lists, weight bytes, ru_maxrss, or ``skipped`` + reason.

The artifact configurations import no model: they read precomputed features and load only the
artifact, so their peak is the deployment's. The fp32 / bf16 ones load the Hugging Face model and
export it (the exported programs share its storage), which is part of their peak.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402


def _rss_mib() -> float:
    """Current resident set (VmRSS) in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    """Peak resident set of this process's own address space (VmHWM), MiB.

    Not ``ru_maxrss``: Linux carries the pre-exec high-water mark of the forked child (a copy of the
    parent benchmark, which holds the fp32 model) into ``ru_maxrss`` at exec, so every worker would
    report the parent's peak. VmHWM belongs to the mm created at exec.
    """
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _build_exported(spec: dict):
    """(encoder, decoder_step, options, max_cache_len, weight bytes dict, dtype) from the fp32/bf16 model."""
    from torch_myqasr.export import decoding_options, export_whisper
    from torch_myqasr.lowering import module_bytes
    from torch_myqasr.models import load_whisper
    from torch_myqasr.pipeline import MAX_CACHE_LEN

    bundle = load_whisper(spec["model"])
    dtype = torch.bfloat16 if spec["config"] == "bf16" else torch.float32
    model = bundle.model.to(dtype)  # in place: this process holds no fp32 copy beside it
    options = decoding_options(model)
    ew = export_whisper(model, max_cache_len=MAX_CACHE_LEN)
    enc, dec = ew.encoder.module(), ew.decoder_step.module()
    nbytes = {"weights_bytes": module_bytes(enc) + module_bytes(dec)}
    del bundle, model, ew
    gc.collect()
    return enc, dec, options, MAX_CACHE_LEN, nbytes, dtype


def _build_artifact(spec: dict):
    from torch_myqasr.artifact import load_artifact
    from torch_myqasr.lowering import module_bytes, quantized_weight_bytes

    if spec["config"] == "artifact-aoti":  # weights live inside the compiled library: sizes from the manifest
        art = load_artifact(spec["artifact"], aot_inductor=True)
        nbytes = {"weights_bytes": art.manifest["quantized_weight_bytes"], "scheme_size_bytes": art.scheme.size_bytes,
                  "scheme_budget_mb": art.scheme.budget_mb}
        return art.encoder, art.decoder_step, art.decoding_options(), art.max_cache_len, nbytes, torch.float32
    compute = torch.bfloat16 if spec["config"] == "artifact-bf16" else None
    art = load_artifact(spec["artifact"], compute_dtype=compute)
    nbytes = {
        "weights_bytes": quantized_weight_bytes(art.encoder) + quantized_weight_bytes(art.decoder_step),
        "module_bytes": module_bytes(art.encoder) + module_bytes(art.decoder_step),
        "scheme_size_bytes": art.scheme.size_bytes,
        "scheme_budget_mb": art.scheme.budget_mb,
    }
    return art.encoder, art.decoder_step, art.decoding_options(), art.max_cache_len, nbytes, torch.float32


def run(spec: dict) -> dict:
    from torch_myqasr.export import greedy_decode

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    out: dict = {"config": spec["config"], "compile": spec["compile"], "threads": torch.get_num_threads()}
    try:
        build = _build_artifact if spec["config"].startswith("artifact") else _build_exported
        enc, dec, options, cache_len, nbytes, dtype = build(spec)
    except Exception as e:  # e.g. export of a bf16 model: reported, not fatal
        out.update(skipped=f"build failed: {type(e).__name__}: {e}", traceback=traceback.format_exc())
        return out
    out.update(nbytes)
    out["load_s"] = time.perf_counter() - t0
    out["rss_after_load_mib"] = _rss_mib()
    if spec["compile"]:
        enc, dec = torch.compile(enc), torch.compile(dec)

    data = torch.load(spec["features"])
    n = min(len(data["clips"]), spec.get("max_clips") or len(data["clips"]))
    feats = [f.to(dtype) for f in data["clips"][:n]]
    caps = [min(c, spec["token_cap"]) if spec.get("token_cap") else c for c in data["caps"][:n]]
    seconds = data["seconds"][:n]

    def decode(x: torch.Tensor, cap: int) -> list[list[int]]:
        opts = dataclasses.replace(options, max_new_tokens=cap)
        return greedy_decode(enc, dec, x, opts, max_cache_len=cache_len)

    with torch.inference_mode():
        if spec["repeats"] > 0 and not spec.get("no_warmup"):
            t = time.perf_counter()
            decode(feats[0], caps[0])  # torch.compile compiles here (encoder; decoder step for T=2 and T=1)
            out["warmup_s"] = time.perf_counter() - t
        per_clip: list[list[float]] = [[] for _ in range(n)]
        tokens: list[list[int]] = [[] for _ in range(n)]
        for _ in range(max(1, spec["repeats"])):
            for i in range(n):
                t = time.perf_counter()
                tokens[i] = decode(feats[i], caps[i])[0]
                per_clip[i].append(time.perf_counter() - t)
        med = [min(v) for v in per_clip]  # best of the passes: the least disturbed by other jobs
        out.update(
            clip_seconds=med, clip_all_seconds=per_clip, tokens=tokens, caps=caps, audio_seconds=seconds,
            decode_s=sum(med), n_tokens=sum(len(t) for t in tokens), n_clips=n,
        )
        if spec.get("batch") and n > 1:
            xb, cap = data["batch"].to(dtype), max(caps)
            try:
                t = time.perf_counter()
                decode(xb, cap)  # warm-up at this batch size (a recompile for dynamic batch)
                out["batch_warmup_s"] = time.perf_counter() - t
                t = time.perf_counter()
                bt = decode(xb, cap)
                out["batch_decode_s"] = time.perf_counter() - t
                out["batch_tokens"] = bt
                out["batch_n_tokens"] = sum(len(x) for x in bt)
            except Exception as e:
                out["batch_error"] = f"{type(e).__name__}: {e}"
                out["batch_traceback"] = traceback.format_exc()
    out["rss_end_mib"] = _rss_mib()
    out["peak_rss_mib"] = _peak_mib()
    out["ru_maxrss_mib"] = _ru_maxrss_mib()
    out["total_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    res = run(spec)
    Path(sys.argv[2]).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
