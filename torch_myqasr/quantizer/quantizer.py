"""`MyQASRQuantizer`: label-free, budgeted mixed-precision weight quantization through PT2E.

Usage (the standard PT2E calls; docs/quantizer.md has the details)::

    q = MyQASRQuantizer(budget_mb=20, strategy="myqasr")      # or MyQASRQuantizer(scheme=loaded)
    enc = prepare_pt2e(export(encoder, ...).module(), q)      # every graph sharing the budget ...
    dec = prepare_pt2e(export(decoder_step, ...).module(), q) # ... is prepared with the SAME q
    for clip in clips: run enc and dec on the clip            # label-free calibration
    enc = convert_pt2e(enc)   # the scheme is decided here, once, over the layers of ALL graphs
    dec = convert_pt2e(dec)   # reuses that decision
    q.scheme                  # torch_myqasr.allocation.Scheme

Every ``aten.linear`` / ``aten.conv1d`` (``aten.convolution``, 1-D, groups=1) weight and every
``aten.embedding`` weight becomes one layer, named after the weight's FQN minus ``.weight``. A weight
shared by several ops (Whisper's token embedding tied to ``proj_out``) is one layer: one decision,
one observer, one quantized copy feeding every use.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)
from tqdm.auto import tqdm

import torch_myqasr.sensitivity.distortion as _distortion
import torch_myqasr.sensitivity.scores as _scores
from torch_myqasr.allocation import DEFAULT_FORMATS, LayerInfo, Scheme, allocate_bits
from torch_myqasr.allocation.myqasr import DEFAULT_ORDER
from torch_myqasr.formats import float_nbytes, get_format
from torch_myqasr.quantizer.observers import (
    DEFAULT_ROW_RESERVOIR,
    DEFAULT_VALUE_RESERVOIR,
    LayerInputObserver,
    LayerOutputObserver,
    LayerStatistics,
    LayerWeightObserver,
)
from torch_myqasr.quantizer.clip_search import SEARCH_FEATURES, SearchProbe
from torch_myqasr.quantizer.weight_quant import DEFAULT_CLIP_GRID, bits_of, quantize_groupwise

_ANNOTATION_KEY = "quantization_annotation"
_aten = torch.ops.aten
_LINEAR = {_aten.linear.default}
_CONV = {_aten.conv1d.default, _aten.convolution.default}
_EMBEDDING = {_aten.embedding.default}
# Normalisation ops: in a pre-LN transformer each one opens a residual branch (plus the final one),
# which is how `output_kl_scale` estimates how diluted an inner layer's error is at the logits.
_NORMS = {
    getattr(_aten, n).default
    for n in ("layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm")
    if hasattr(_aten, n)
}
# Ops that only move or re-view values: a layer whose output reaches the graph output through
# these alone produces the model's output (the logits).
_PASS_THROUGH = {
    getattr(_aten, n).default
    for n in ("view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "transpose", "permute", "t",
              "contiguous", "clone", "alias", "_to_copy", "flatten")
    if hasattr(_aten, n) and hasattr(getattr(_aten, n), "default")
} | {
    getattr(getattr(_aten, n), o)
    for n, o in (("slice", "Tensor"), ("select", "int"), ("squeeze", "dim"), ("transpose", "int"),
                 ("flatten", "using_ints"), ("squeeze", "dims"))
    if hasattr(_aten, n) and hasattr(getattr(_aten, n), o)
}

ModuleRule = str | type


@dataclass
class _Use:
    node: Node
    kind: str  # "linear" | "conv1d" | "embedding"
    weight_node: Node
    input_node: Node
    module_fqn: str
    module_type: str
    conv: tuple[int, int, int, int] | None = None


@dataclass
class _LayerRecord:
    name: str
    weight: torch.Tensor
    aliases: list[str]
    graphs: set[int] = field(default_factory=set)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(math.prod(self.weight.shape[1:]))


class _Session:
    """State shared by the quantizer and every observer it created (across graphs).

    Deep copies return the same object: torchao deep-copies observer constructor arguments while
    preparing, and the observers must all feed this one session.
    """

    def __init__(self, q: "MyQASRQuantizer") -> None:
        self.q = q
        self.act_bits = q.act_bits
        self.layers: dict[str, _LayerRecord] = {}
        self._stats: dict[str, LayerStatistics] = {}
        self.param_numel: dict[str, int] = {}
        self.quantized_params: set[str] = set()
        self.kept_layers: set[str] = set()
        self.output_layers: set[str] = set()  # layers whose output is a graph output (logits among them)
        self.graph_norms: dict[int, int] = {}  # normalisation ops per prepared graph
        self.n_graphs = 0
        self.scheme: Scheme | None = None
        self.clip_ratios: dict[str, float] = {}
        self._plans: dict[str, dict[str, Any] | None] = {}

    def __deepcopy__(self, memo: dict) -> "_Session":
        return self

    @property
    def decided(self) -> bool:
        return self.scheme is not None

    def stats(self, layer: str) -> LayerStatistics:
        st = self._stats.get(layer)
        if st is None:
            st = self._stats[layer] = LayerStatistics(layer, DEFAULT_VALUE_RESERVOIR, self.q.sample_rows)
        return st

    def weight_plan(self, layer: str) -> dict[str, Any] | None:
        """Codes, scale, zero and the op arguments for ``layer``, or None to keep it in float."""
        self.q._decide()
        if layer not in self._plans:
            self._plans[layer] = self._make_plan(layer)
        return self._plans[layer]

    def _make_plan(self, layer: str) -> dict[str, Any] | None:
        assert self.scheme is not None
        ls = self.scheme.layers.get(layer)
        if ls is None or not get_format(ls.format).grouped:
            return None
        rec = self.layers[layer]
        c = quantize_groupwise(rec.weight, bits_of(ls.format), ls.group_size, clip_ratio=self.clip_ratios[layer])
        return {
            "codes": c.codes,
            "scale": c.scale,
            "zero": c.zero,
            "format": ls.format,
            "group_size": ls.group_size,
            "shape": list(rec.shape),
            "dtype": rec.weight.dtype,
        }


def _reaches_output(node: Node) -> bool:
    """Whether ``node``'s value is (a re-view of) an output of its graph: e.g. Whisper's logits."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u.op == "call_function" and u.target in _PASS_THROUGH and u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


class MyQASRQuantizer(Quantizer):
    """Label-free personalised mixed-precision weight quantizer (myQASR) for PT2E.

    Args:
        budget_mb: memory budget in MiB (2**20 bytes) for the whole model: quantized weights with
            their scales and zero points, plus every parameter left in float (``float_bits``).
            Required unless ``scheme`` is given.
        strategy: ``"myqasr"`` (paper's greedy by score), ``"optimal"`` (least summed output
            distortion) or ``"uniform"``.
        scheme: a saved `Scheme` to replay instead of deciding: same formats and, from
            ``scheme.calibration["clip_ratios"]``, the same clipping ratios, hence identical codes
            (no calibration needed). Layers absent from the scheme stay in float.
        formats: candidate formats (int2..int8).
        group_size: weights per scale group along K.
        score: sensitivity score, one of `torch_myqasr.sensitivity.SCORES`.
        keep_full_precision: module-name globs (``"model.encoder.conv*"``) or module types
            (``torch.nn.Conv1d``) to keep in float. A name glob starting with ``!`` forces
            quantization. Precedence: a name rule beats a type rule, which beats the global
            default (quantize).
        act_bits: None (weight-only, default) or 8: per-tensor uint8 quantize/dequantize of each
            quantized layer's input from the calibrated range (the paper's 8-bit activations).
        model_id: recorded in the scheme.
        progress: show a progress bar while layers are scored.
        order: ``"myqasr"`` sweep order (see `torch_myqasr.allocation.ORDERS`); None = default.
        score_format: format at which ``"cosine"`` / ``"kl"`` scores are measured (default: the
            candidate with the fewest bits, where layers differ most).
        float_bits: bits per value of parameters left in float, for the budget (32 = fp32).
        clip_grid: clipping ratios the scale search tries.
        sample_rows: input rows sampled per layer for the scale search and distance scores.
        search_features: a layer with more output features than this (Whisper's token embedding)
            searches its clipping ratio on that many of them (`clip_search.SEARCH_FEATURES`);
            distortions are still measured on every feature. None = search on all of them.
        calibration: extra entries for ``scheme.calibration`` (``n_clips``, ``seconds``,
            ``audio_sha256``: the caller knows the audio, the observers only see tensors).
        output_weighting: ``"optimal"`` with the cosine metric only. True (default): express every
            layer's distortion as an estimate of the KL (nats) of the model's output token
            distribution, so the knapsack weighs layers by their effect on the output: the layer
            whose output is a graph output (the logits) is measured by that KL directly, and every
            other layer's cosine distance is scaled by `sensitivity.output_kl_scale` (the logits
            layer's Fisher information per unit relative error of its input, divided by the
            program's residual branches). False: the plain sum of per-layer cosine distances
            (which on Whisper starves the logits layer; docs/allocation.md). Without a detected
            output layer nothing is scaled.
    """

    def __init__(
        self,
        budget_mb: float | None = None,
        *,
        strategy: str = "myqasr",
        scheme: Scheme | None = None,
        formats: Sequence[str] = DEFAULT_FORMATS,
        group_size: int = 64,
        score: str = "median",
        keep_full_precision: Iterable[ModuleRule] = (),
        act_bits: int | None = None,
        model_id: str = "",
        progress: bool = True,
        order: str | None = None,
        score_format: str | None = None,
        float_bits: int = 32,
        clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
        sample_rows: int = DEFAULT_ROW_RESERVOIR,
        search_features: int | None = SEARCH_FEATURES,
        calibration: dict[str, Any] | None = None,
        output_weighting: bool = True,
    ) -> None:
        super().__init__()
        if scheme is None and budget_mb is None:
            raise ValueError("give budget_mb (MiB, e.g. budget_mb=20) to decide a scheme, or scheme=load_scheme(path) to replay one")
        if scheme is not None and budget_mb is not None:
            raise ValueError("give either budget_mb or scheme, not both: a scheme already fixes every layer's format")
        if scheme is not None and not isinstance(scheme, Scheme):
            raise TypeError(f"scheme must be a torch_myqasr.allocation.Scheme (use load_scheme(path)), got {type(scheme).__name__}")
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None (weight-only) or 8, got {act_bits!r}")
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        self.formats = tuple(formats)
        for fmt in self.formats:
            bits_of(fmt)
        self.score = _scores.check_score(score)
        self.score_format = score_format or min(self.formats, key=lambda f: (get_format(f).bits, f))
        if self.score_format not in self.formats:
            raise ValueError(f"score_format {self.score_format!r} is not among the candidate formats {self.formats}")
        self.budget_mb = budget_mb
        self.strategy = strategy
        self.group_size = group_size
        self.act_bits = act_bits
        self.model_id = model_id
        self.progress = progress
        self.order = order
        self.float_bits = float_bits
        self.clip_grid = tuple(clip_grid)
        self.sample_rows = sample_rows
        if search_features is not None and (not isinstance(search_features, int) or search_features <= 0):
            raise ValueError(f"search_features must be a positive int or None (search on every output feature), got {search_features!r}")
        self.search_features = search_features
        self.calibration = dict(calibration or {})
        self.output_weighting = bool(output_weighting)
        self._given_scheme = scheme
        self._keep_names: list[str] = []
        self._force_names: list[str] = []
        self._keep_types: set[str] = set()
        for rule in keep_full_precision:
            if isinstance(rule, type):
                self._keep_types.add(_type_name(rule))
            elif isinstance(rule, str) and rule.startswith("!"):
                self._force_names.append(rule[1:])
            elif isinstance(rule, str):
                self._keep_names.append(rule)
            else:
                raise TypeError(f"keep_full_precision entries must be module-name globs or module types, got {rule!r}")
        self._session = _Session(self)

    # -- results -------------------------------------------------------------------------------
    @property
    def scheme(self) -> Scheme:
        """The per-layer decision (a `Scheme`); available after the first ``convert_pt2e``."""
        if self._session.scheme is None:
            raise RuntimeError(
                "q.scheme is decided at the first convert_pt2e: prepare every graph with this quantizer, "
                "run the calibration clips through all of them, then call convert_pt2e"
            )
        return self._session.scheme

    @property
    def layer_names(self) -> list[str]:
        """Quantizable layers seen so far by any prepared graph, in order of first appearance."""
        return list(self._session.layers)

    @property
    def kept_layers(self) -> list[str]:
        """Layers left in float by ``keep_full_precision`` (or unsupported, e.g. grouped convs)."""
        return sorted(self._session.kept_layers)

    def statistics(self, layer: str) -> LayerStatistics:
        """Calibration statistics recorded for ``layer`` (a name from `layer_names`)."""
        if layer not in self._session.layers:
            raise KeyError(f"no quantizable layer {layer!r}; known: {', '.join(self._session.layers) or '(none prepared yet)'}")
        return self._session.stats(layer)

    # -- annotation ----------------------------------------------------------------------------
    def annotate(self, model: GraphModule) -> GraphModule:
        """Annotate every linear / conv1d / embedding weight of ``model`` (called by prepare_pt2e)."""
        s = self._session
        if s.decided:
            raise RuntimeError(
                "this MyQASRQuantizer already decided its scheme at the first convert_pt2e, so a graph "
                "prepared now would not be part of that budget. Prepare ALL graphs that share the budget "
                "(e.g. encoder and decoder step) before converting any; to quantize more graphs the same "
                "way, use a new MyQASRQuantizer(scheme=q.scheme)"
            )
        graph_id = s.n_graphs
        s.n_graphs += 1
        s.graph_norms[graph_id] = sum(1 for n in model.graph.nodes if n.op == "call_function" and n.target in _NORMS)
        aliases: dict[int, list[str]] = {}
        for pname, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(pname)
        for names in aliases.values():
            p = model.get_parameter(names[0])
            prev = s.param_numel.setdefault(names[0], p.numel())
            if prev != p.numel():
                raise ValueError(f"parameter {names[0]!r} has {p.numel()} values here but {prev} in an earlier graph")

        uses: dict[str, list[_Use]] = {}
        records: dict[str, _LayerRecord] = {}
        for node in model.graph.nodes:
            use = self._match(model, node, aliases)
            if use is None:
                continue
            w = model.get_parameter(use.weight_node.target)
            names = aliases[id(w)]
            layer = names[0][: -len(".weight")] if names[0].endswith(".weight") else names[0]
            records.setdefault(layer, _LayerRecord(layer, w, names))
            uses.setdefault(layer, []).append(use)

        for layer, layer_uses in uses.items():
            rec = records[layer]
            if self._keep(rec, layer_uses):
                s.kept_layers.add(layer)
                continue
            old = s.layers.get(layer)
            if old is not None and old.shape != rec.shape:
                raise ValueError(f"layer {layer!r} has weight shape {rec.shape} here but {old.shape} in an earlier graph")
            s.layers.setdefault(layer, rec).graphs.add(graph_id)
            s.quantized_params.add(rec.aliases[0])
            if any(u.kind != "embedding" and _reaches_output(u.node) for u in layer_uses):
                s.output_layers.add(layer)
            self._annotate_layer(layer, rec, layer_uses)
        return model

    def _match(self, model: GraphModule, node: Node, aliases: dict[int, list[str]]) -> _Use | None:
        if node.op != "call_function" or _ANNOTATION_KEY in node.meta:
            return None
        if node.target in _LINEAR or node.target in _CONV:
            x, w = node.args[0], node.args[1]
            kind = "linear" if node.target in _LINEAR else "conv1d"
        elif node.target in _EMBEDDING:
            w, x = node.args[0], node.args[1]
            kind = "embedding"
        else:
            return None
        if not (isinstance(w, Node) and w.op == "get_attr" and isinstance(x, Node)):
            return None  # a computed weight (not a parameter) is not ours to quantize
        try:
            p = model.get_parameter(w.target)
        except AttributeError:
            return None
        if id(p) not in aliases:
            return None
        conv = None
        if kind == "conv1d":
            a = list(node.args) + [None] * 9
            if p.dim() != 3:
                return None  # conv2d/3d: not a speech-model layer we handle
            if node.target is _aten.convolution.default:
                stride, padding, dilation, transposed, groups = a[3], a[4], a[5], a[6], a[8]
                if transposed:
                    return None
            else:
                stride, padding, dilation, groups = a[3] or [1], a[4] or [0], a[5] or [1], a[6] or 1
            if groups != 1 or isinstance(padding, str):
                return None
            conv = (int(p.shape[2]), int(stride[0]), int(padding[0]), int(dilation[0]))
        stack = node.meta.get("nn_module_stack") or {}
        fqn, mtype = ("", "")
        if stack:
            fqn, mtype = list(stack.values())[-1]
            mtype = mtype if isinstance(mtype, str) else _type_name(mtype)
        return _Use(node, kind, w, x, fqn, mtype, conv)

    def _keep(self, rec: _LayerRecord, uses: list[_Use]) -> bool:
        names = {rec.name, *(a[: -len(".weight")] if a.endswith(".weight") else a for a in rec.aliases)}
        names |= {u.module_fqn for u in uses if u.module_fqn}

        def hit(globs: list[str]) -> bool:
            return any(fnmatch.fnmatchcase(n, g) for n in names for g in globs)

        if hit(self._force_names):
            return False
        if hit(self._keep_names):
            return True
        return any(u.module_type in self._keep_types for u in uses)

    def _annotate_layer(self, layer: str, rec: _LayerRecord, uses: list[_Use]) -> None:
        s = self._session
        has_matmul_use = any(u.kind != "embedding" for u in uses)
        first: tuple[Node, Node] | None = None
        for u in uses:
            if first is None:
                w_spec: Any = QuantizationSpec(
                    dtype=torch.uint8,
                    observer_or_fake_quant_ctr=LayerWeightObserver.with_args(session=s, layer=layer),
                )
                first = (u.weight_node, u.node)
            else:
                w_spec = SharedQuantizationSpec(first)
            in_spec = QuantizationSpec(
                dtype=torch.uint8,
                observer_or_fake_quant_ctr=LayerInputObserver.with_args(
                    session=s, layer=layer, kind=u.kind, in_features=rec.in_features, conv=u.conv
                ),
            )
            # The tied embedding's score comes from its matmul use (proj_out logits) when it has one.
            out_spec = None
            if u.kind != "embedding" or not has_matmul_use:
                out_spec = QuantizationSpec(
                    dtype=torch.uint8,
                    observer_or_fake_quant_ctr=LayerOutputObserver.with_args(session=s, layer=layer),
                )
            u.node.meta[_ANNOTATION_KEY] = QuantizationAnnotation(
                input_qspec_map={u.input_node: in_spec, u.weight_node: w_spec},
                output_qspec=out_spec,
                allow_implicit_sharing=False,
                _annotated=True,
            )

    def validate(self, model: GraphModule) -> None:
        """Nothing to check beyond what `annotate` enforces."""

    # -- the decision --------------------------------------------------------------------------
    def _decide(self) -> None:
        s = self._session
        if s.decided:
            return
        if not s.layers:
            raise RuntimeError("no quantizable layer was annotated: nothing to decide (were all layers kept in full precision?)")
        if self._given_scheme is not None:
            self._replay(self._given_scheme)
        else:
            self._allocate()

    def _samples(self, layer: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        st = self._session.stats(layer)
        return st.rows.sample(), st.indices.sample()

    def _probe(self, layer: str, metric: str) -> SearchProbe:
        """The layer's weight and calibration samples, ready for the clip search."""
        x, idx = self._samples(layer)
        return SearchProbe(
            self._session.layers[layer].weight, self.group_size, x_sample=x, index_sample=idx, metric=metric,
            search_features=self.search_features,
        )

    def _allocate(self) -> None:
        s = self._session
        metric = "kl" if self.score == "kl" else "cosine"
        # The distortion of EVERY candidate is needed by "optimal" only; a distance score needs it
        # at score_format alone. Each is one vectorised pass per layer (clip_search.py).
        if self.strategy == "optimal":
            dist_formats: tuple[str, ...] = self.formats
        elif self.score in _scores.DISTANCE_SCORES:
            dist_formats = (self.score_format,)
        else:
            dist_formats = ()
        infos: list[LayerInfo] = []
        all_ratios: dict[str, dict[str, float]] = {}
        weighting = self._output_weighting(metric)
        with torch.inference_mode():
            for rec in tqdm(list(s.layers.values()), desc="myQASR: scoring layers", disable=not self.progress):
                st = s.stats(rec.name)
                x, idx = self._samples(rec.name)
                if st.count == 0 and x is None and idx is None:
                    raise RuntimeError(
                        f"layer {rec.name!r} saw no calibration data: run your clips through EVERY graph "
                        f"prepared with this quantizer ({s.n_graphs} so far) before the first convert_pt2e"
                    )
                dist = None
                if dist_formats:
                    probe = self._probe(rec.name, metric)
                    best = probe.search([bits_of(f) for f in dist_formats], self.clip_grid, exact=True)
                    dist = {f: max(best[bits_of(f)][1], 0.0) for f in dist_formats}
                    all_ratios[rec.name] = {f: best[bits_of(f)][0] for f in dist_formats}
                score = dist[self.score_format] if self.score in _scores.DISTANCE_SCORES else _scores.stat_score(st, self.score)
                if weighting is not None and dist is not None:
                    dist, ratios_nats = self._output_kl_distortions(rec, dist, weighting)
                    all_ratios[rec.name].update(ratios_nats)
                infos.append(LayerInfo(rec.name, rec.out_features, rec.in_features, float(score),
                                       dist if self.strategy == "optimal" else None))
            fixed = self._fixed_bytes()
            kwargs: dict[str, Any] = {} if self.order is None else {"order": self.order}
            choice = allocate_bits(
                infos, self.budget_mb, strategy=self.strategy, formats=self.formats, group_size=self.group_size,
                fixed_bytes=fixed, **kwargs,
            )
            ratios: dict[str, float] = {}
            for name, ls in choice.items():
                if not get_format(ls.format).grouped:
                    continue
                if ls.format in all_ratios.get(name, {}):
                    ratios[name] = all_ratios[name][ls.format]
                else:
                    # Only the ratio is needed here, so a wide layer's search stays on its subset.
                    b = bits_of(ls.format)
                    ratios[name] = self._probe(name, metric).search([b], self.clip_grid, exact=False)[b][0]
        s.clip_ratios = ratios
        calibration = {**self.calibration, "score": self.score, "metric": metric, "clip_ratios": dict(ratios)}
        if weighting is not None:
            calibration["distortion"] = {
                "unit": "nats (estimated KL of the output token distribution)",
                "output_layers": sorted(weighting["output_layers"]),
                "fisher_scale": weighting["fisher_scale"],
                "branches": {str(g): b for g, b in sorted(s.graph_norms.items())},
            }
        if self.score in _scores.DISTANCE_SCORES:
            calibration["score_format"] = self.score_format
        s.scheme = Scheme.build(
            model_id=self.model_id, budget_mb=self.budget_mb, strategy=self.strategy, group_size=self.group_size,
            layers=choice, fixed_bytes=fixed, calibration=calibration,
            order=(self.order or DEFAULT_ORDER) if self.strategy == "myqasr" else None,
        )

    def _output_weighting(self, metric: str) -> dict[str, Any] | None:
        """What `_output_kl_distortions` needs, or None when distortions stay plain cosine distances.

        Applies to ``strategy="optimal"`` with the cosine metric and a detected output layer (one
        whose output is a graph output, i.e. the logits) that saw input rows.
        """
        s = self._session
        if not (self.strategy == "optimal" and self.output_weighting and metric == "cosine"):
            return None
        outputs = [n for n in sorted(s.output_layers) if s.stats(n).rows.sample() is not None]
        if not outputs:
            return None
        # A program may also return intermediate values another program reads (Whisper's encoder
        # returns hidden states, and may return cross-attention keys/values): the logits layer is the
        # widest layer whose output leaves a program (vocabulary-sized rows).
        widest = max(s.layers[n].out_features for n in outputs)
        outputs = [n for n in outputs if s.layers[n].out_features == widest]
        with torch.inference_mode():
            scales = [_distortion.logits_fisher_scale(s.layers[n].weight, s.stats(n).rows.sample()) for n in outputs]
        return {"output_layers": set(outputs), "fisher_scale": float(sum(scales) / len(scales))}

    def _inner_scale(self, layer: str, fisher_scale: float) -> float:
        """Nats of output KL per unit cosine distance of ``layer``'s output (`output_kl_scale`)."""
        s = self._session
        # A layer used by several programs gets the least diluted (largest) scale of them.
        branches = min(max(s.graph_norms.get(g, 0), 1) for g in s.layers[layer].graphs)
        return _distortion.output_kl_scale(fisher_scale, branches)

    def _output_kl_distortions(
        self, rec: _LayerRecord, cosine: dict[str, float], weighting: dict[str, Any]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """``rec``'s distortions in nats of output KL, and the clip ratios they were measured at."""
        scale = self._inner_scale(rec.name, weighting["fisher_scale"])
        if rec.name not in weighting["output_layers"]:
            return {f: d * scale for f, d in cosine.items()}, {}
        x, idx = self._samples(rec.name)
        assert x is not None
        return _distortion.output_layer_distortions(
            rec.weight, list(cosine), self.group_size, x_sample=x, index_sample=idx, lookup_scale=scale,
            grid=self.clip_grid, search_features=self.search_features,
        )

    def _fixed_bytes(self) -> int:
        """Bytes of every parameter not allocated per layer (biases, norms, positions, kept layers)."""
        s = self._session
        return sum(float_nbytes(n, self.float_bits) for name, n in s.param_numel.items() if name not in s.quantized_params)

    def _replay(self, scheme: Scheme) -> None:
        s = self._session
        missing = [n for n in scheme.layers if n not in s.layers]
        if missing:
            raise ValueError(
                f"the scheme names {len(missing)} layer(s) no prepared graph contains: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}. Prepare every graph the scheme covers (encoder AND "
                "decoder step) with this quantizer before the first convert_pt2e, with the same keep_full_precision"
            )
        unlisted = [n for n in s.layers if n not in scheme.layers]
        if unlisted:
            warnings.warn(f"{len(unlisted)} layer(s) are not in the scheme and stay in float: {unlisted[:5]}", stacklevel=3)
        stored = dict(scheme.calibration.get("clip_ratios", {}))
        metric = scheme.calibration.get("metric", "cosine")
        for name, ls in scheme.layers.items():
            rec = s.layers[name]
            if ls.out_features is not None and (ls.out_features, ls.in_features) != (rec.out_features, rec.in_features):
                raise ValueError(
                    f"layer {name!r} is [{ls.out_features}, {ls.in_features}] in the scheme but "
                    f"[{rec.out_features}, {rec.in_features}] in the model: the scheme is for another model"
                )
            if not get_format(ls.format).grouped:
                continue
            bits_of(ls.format)
            if name not in stored:
                # Hand-written or older scheme: search again (needs the calibration samples).
                b = bits_of(ls.format)
                with torch.inference_mode():
                    stored[name] = self._probe(name, metric).search([b], self.clip_grid, exact=False)[b][0]
        s.clip_ratios = {k: float(v) for k, v in stored.items()}
        if stored != scheme.calibration.get("clip_ratios"):
            scheme = Scheme.build(
                model_id=scheme.model_id, budget_mb=scheme.budget_mb, strategy=scheme.strategy,
                group_size=scheme.group_size, layers=scheme.layers, fixed_bytes=scheme.fixed_bytes,
                calibration={**scheme.calibration, "clip_ratios": dict(stored)}, order=scheme.order,
            )
        s.scheme = scheme
