"""Label-free calibration observers for `MyQASRQuantizer`.

Three observer kinds per quantizable layer, all inserted by ``prepare_pt2e``:

- `LayerOutputObserver` on the layer's output: running median / max / mean / std of ``|output|``
  (`LayerStatistics`). The median is estimated from a fixed-size RESERVOIR SAMPLE of ``|output|``
  (uniform over everything seen, deterministically seeded per layer); it is exact while fewer
  values than the reservoir holds have been seen. Max, mean and std are exact running values.
- `LayerInputObserver` on the layer's input: a bounded reservoir of input ROWS (linear: rows of
  [*, K]; conv1d: unfolded patches [*, I*k]; embedding: token ids) for the scale search and the
  output-distance scores, plus the running min / max for optional 8-bit activation quantization.
- `LayerWeightObserver` on the weight: records nothing; at ``convert_pt2e`` it asks the shared
  session for the layer's decision and replaces itself with
  ``get_attr(codes), get_attr(scale), get_attr(zero) -> myqasr::dequantize_groupwise``.

The observers hold a reference to a shared session (the quantizer's state), so every graph
prepared with one quantizer feeds one set of per-layer statistics.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Protocol, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import ObserverBase

from torch_myqasr.quantizer.dequant_op import dequantize_groupwise_op  # noqa: F401  (registers the op)

DEFAULT_VALUE_RESERVOIR = 65536
"""|output| values kept per layer for the median (about 0.4% rank error at the median)."""

DEFAULT_ROW_RESERVOIR = 256
"""Input rows kept per layer for the scale search and output-distance scores."""


def stable_seed(name: str) -> int:
    """A seed derived from ``name`` that is the same in every process (unlike ``hash``)."""
    return zlib.crc32(name.encode("utf-8"))


RowGetter = Callable[[Union[slice, torch.Tensor]], torch.Tensor]
"""Returns the rows at a slice or at int64 positions of a stream batch (materialised on demand)."""


class ReservoirSampler:
    """Uniform fixed-size sample of the rows of every tensor passed to `add` (bottom-k random keys).

    Every row seen gets an independent U(0, 1) key and the sample is the ``capacity`` rows with
    the smallest keys: a uniform sample without replacement of everything seen. Once the sample is
    full with largest key ``t``, a new row can only enter with a key below ``t``, so per batch of
    ``n`` rows only ``Binomial(n, t)`` entrants are drawn (positions uniform, keys U(0, t)) instead
    of one random number per row: cost O(capacity + entrants), not O(rows seen), and only the
    entrants' rows are ever materialised (`add_lazy`). ``t`` falls like ``capacity / seen``. A
    batch larger than the sample draws its ``capacity`` smallest keys directly (`_merge_large`).

    Deterministic: the same sequence of `add` calls with the same seed gives the same sample. While
    fewer rows than ``capacity`` have been seen, the sample is all of them in arrival order.
    """

    def __init__(self, capacity: int, seed: int) -> None:
        if capacity <= 0:
            raise ValueError(f"reservoir capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._buf: torch.Tensor | None = None
        self._keys = torch.empty(capacity, dtype=torch.float64)
        self._filled = 0

    def add(self, rows: torch.Tensor) -> None:
        """Offer every row of ``rows`` ([n, ...]) to the sample."""
        rows = rows.detach()
        self.add_lazy(rows.shape[0], rows.__getitem__)

    def add_lazy(self, n: int, get_rows: RowGetter) -> None:
        """Offer ``n`` rows that ``get_rows(slice or positions)`` materialises on demand."""
        if n == 0:
            return
        take = min(self.capacity - self._filled, n)
        if take > 0:
            first = get_rows(slice(0, take)).cpu()
            if self._buf is None:
                self._buf = first.new_empty((self.capacity, *first.shape[1:]))
            self._check(first)
            self._buf[self._filled : self._filled + take] = first
            self._keys[self._filled : self._filled + take] = torch.rand(take, generator=self._gen, dtype=torch.float64)
            self._filled += take
        rest = n - take
        if rest > self.capacity:
            self._merge_large(take, n, get_rows)
        elif rest > 0:
            self._merge(take, n, get_rows)
        self.seen += n

    def _merge(self, lo: int, hi: int, get_rows: RowGetter) -> None:
        """Let rows ``lo .. hi`` of the batch into the full sample (bottom-k keys, see class doc)."""
        t = float(self._keys.max())
        k = int(torch.binomial(torch.tensor([float(hi - lo)], dtype=torch.float64),
                               torch.tensor([t], dtype=torch.float64), generator=self._gen))
        if k > 0:
            new_keys = torch.rand(k, generator=self._gen, dtype=torch.float64) * t
            self._admit(lo + self._positions(hi - lo, k), new_keys, get_rows)

    def _merge_large(self, lo: int, hi: int, get_rows: RowGetter) -> None:
        """Like `_merge` for more than ``capacity`` rows, in O(capacity) whatever their number.

        Only the ``capacity`` smallest of the batch's keys can matter. Those are the first order
        statistics of ``m = hi - lo`` uniforms: ``U_(i) = S_i / (S_capacity + G)`` with ``S`` the
        running sums of Exp(1) draws and ``G ~ Gamma(m - capacity + 1)`` (exact); they sit at a
        uniformly random set of ``capacity`` distinct positions.
        """
        m, c = hi - lo, self.capacity
        s = torch.cumsum(-torch.log1p(-torch.rand(c, generator=self._gen, dtype=torch.float64)), 0)
        gamma_seed = int(torch.randint(2**62, (1,), generator=self._gen))
        g = float(np.random.Generator(np.random.PCG64(gamma_seed)).gamma(m - c + 1))
        keys = s / (float(s[-1]) + g)  # ascending
        k = int(torch.searchsorted(keys, float(self._keys.max())))  # only keys below the sample's max can enter
        if k > 0:
            self._admit(lo + self._positions(m, k), keys[:k], get_rows)

    def _admit(self, pos: torch.Tensor, new_keys: torch.Tensor, get_rows: RowGetter) -> None:
        """Keep the ``capacity`` smallest keys of (sample, entrants); entrants take the evicted slots."""
        assert self._buf is not None
        thr = torch.cat([self._keys, new_keys]).kthvalue(self.capacity).values
        evict = (self._keys > thr).nonzero().flatten()
        enter = (new_keys <= thr).nonzero().flatten()
        m = min(evict.numel(), enter.numel())  # equal unless keys tie (probability ~0)
        evict, enter = evict[:m], enter[:m]
        rows = get_rows(pos[enter]).cpu()  # only the entrants are materialised
        self._check(rows)
        self._keys[evict] = new_keys[enter]
        self._buf[evict] = rows

    def _positions(self, n: int, k: int) -> torch.Tensor:
        """``k`` distinct positions drawn uniformly from ``range(n)`` (int64, any order)."""
        if 4 * k >= n:
            return torch.randperm(n, generator=self._gen)[:k]
        pos = torch.empty(0, dtype=torch.int64)
        while pos.numel() < k:  # collisions are rare when k << n: one round, almost always
            pos = torch.unique(torch.cat([pos, torch.randint(n, (k + k // 8 + 8,), generator=self._gen)]))
        # unique() sorts: keep a random k of them, not the smallest k
        return pos[torch.randperm(pos.numel(), generator=self._gen)[:k]]

    def _check(self, rows: torch.Tensor) -> None:
        assert self._buf is not None
        if rows.shape[1:] != self._buf.shape[1:] or rows.dtype != self._buf.dtype:
            raise ValueError(
                f"reservoir rows changed shape/dtype: {tuple(self._buf.shape[1:])} {self._buf.dtype} "
                f"then {tuple(rows.shape[1:])} {rows.dtype}"
            )

    def sample(self) -> torch.Tensor | None:
        """The current sample ([min(seen, capacity), ...]), or None if nothing was seen."""
        return None if self._buf is None else self._buf[: self._filled]


class LayerStatistics:
    """Running label-free statistics of one layer's outputs and a sample of its inputs."""

    def __init__(self, name: str, value_capacity: int = DEFAULT_VALUE_RESERVOIR, row_capacity: int = DEFAULT_ROW_RESERVOIR):
        self.name = name
        self.count = 0
        self.sum = 0.0
        self.sum_sq = 0.0
        self.max_abs = 0.0
        self.calls = 0
        seed = stable_seed(name)
        self.values = ReservoirSampler(value_capacity, seed)
        self.rows = ReservoirSampler(row_capacity, seed + 1)
        self.indices = ReservoirSampler(row_capacity, seed + 2)
        self.in_min = float("inf")
        self.in_max = float("-inf")

    # -- outputs -------------------------------------------------------------------------------
    def update_output(self, y: torch.Tensor) -> None:
        """Fold one output tensor of the layer into the |output| statistics."""
        flat = y.detach().reshape(-1)
        if flat.numel() == 0:
            return
        if flat.dtype != torch.float32:
            flat = flat.float()
        self.calls += 1
        self.count += flat.numel()
        # Float64 accumulation straight from float32 (no float64 copy of the tensor).
        self.sum += float(flat.abs().sum(dtype=torch.float64))
        self.sum_sq += float((flat * flat).sum(dtype=torch.float64))
        lo, hi = torch.aminmax(flat)
        self.max_abs = max(self.max_abs, float(hi), -float(lo))
        # Only the values that enter the reservoir are materialised (and made absolute).
        self.values.add_lazy(flat.numel(), lambda at: flat[at].abs())

    @property
    def mean_abs(self) -> float:
        """Mean of |output| over every value seen."""
        return self.sum / self.count if self.count else float("nan")

    @property
    def std_abs(self) -> float:
        """Population standard deviation of |output| over every value seen."""
        if not self.count:
            return float("nan")
        m = self.mean_abs
        return max(self.sum_sq / self.count - m * m, 0.0) ** 0.5

    @property
    def median_abs(self) -> float:
        """Median of |output|: exact while ``count <= value reservoir``, else the sample's median
        (numpy's convention: the mean of the two middle values for an even count)."""
        s = self.values.sample()
        return float("nan") if s is None else float(np.median(s.numpy()))

    # -- inputs --------------------------------------------------------------------------------
    def update_input_rows(self, rows: torch.Tensor) -> None:
        """Offer input rows [n, K] to the row sample and update the input range."""
        rows = rows.detach()
        if rows.numel():
            self.update_input_range(rows)
        self.rows.add_lazy(rows.shape[0], lambda at: rows[at].float())

    def update_input_range(self, x: torch.Tensor) -> None:
        """Widen the recorded input range [in_min, in_max] to cover ``x`` (for 8-bit activations)."""
        lo, hi = torch.aminmax(x.detach())
        self.in_min = min(self.in_min, float(lo))
        self.in_max = max(self.in_max, float(hi))

    def update_indices(self, ids: torch.Tensor) -> None:
        """Offer embedding token ids to the id sample."""
        self.indices.add(ids.detach().reshape(-1).long())


class CalibrationSession(Protocol):
    """What the observers need from the quantizer's shared state."""

    act_bits: int | None

    def stats(self, layer: str) -> LayerStatistics: ...

    def weight_plan(self, layer: str) -> dict[str, Any] | None: ...


def conv1d_patches(x: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Unfold a Conv1d input [B, I, L] (or [I, L]) into rows [B*L_out, I*kernel] such that
    ``F.linear(rows, w.reshape(O, I*kernel))`` equals the convolution (bias aside)."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    cols = F.unfold(x.unsqueeze(2), (1, kernel), dilation=(1, dilation), padding=(0, padding), stride=(1, stride))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def conv1d_patch_rows(x: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, RowGetter]:
    """The number of `conv1d_patches` rows of ``x`` and a function returning any of them.

    Row ``p`` is the patch of batch ``p // L_out`` at output time ``p % L_out``; the getter builds
    only the rows asked for, with the layout of `conv1d_patches` ([I*kernel], channel-major).
    """
    if x.dim() == 2:
        x = x.unsqueeze(0)
    b, i, length = x.shape
    l_out = (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    xp = F.pad(x.float(), (padding, padding)).transpose(1, 2)  # [B, L_padded, I]
    taps = torch.arange(kernel) * dilation

    def get(at: slice | torch.Tensor) -> torch.Tensor:
        pos = torch.arange(b * l_out)[at] if isinstance(at, slice) else at
        bi, t = pos // l_out, pos % l_out
        cols = t.unsqueeze(1) * stride + taps  # [n, kernel]
        patches = xp[bi.unsqueeze(1), cols]  # [n, kernel, I]
        return patches.transpose(1, 2).reshape(-1, i * kernel)

    return b * l_out, get


class _MyQASRObserver(ObserverBase):
    """Common part: a layer name and the shared session; passes its input through unchanged."""

    def __init__(self, dtype: torch.dtype = torch.uint8, *, session: CalibrationSession, layer: str, **kwargs: Any):
        super().__init__(dtype=dtype)
        # Plain attribute (not a submodule / buffer): the session is shared, never copied.
        self.__dict__["session"] = session
        self.layer = layer

    def calculate_qparams(self):  # pragma: no cover - convert() is used instead
        raise NotImplementedError("myQASR observers insert their own nodes in convert()")

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}"

    @staticmethod
    def _remove(model: GraphModule, node: Node) -> None:
        node.replace_all_uses_with(node.args[0])
        model.graph.erase_node(node)


class LayerOutputObserver(_MyQASRObserver):
    """Records |output| statistics of one layer (median / max / mean / std)."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.session.stats(self.layer).update_output(y)
        return y

    def convert(self, model: GraphModule, observer_node: Node) -> None:
        """Statistics only: the node is removed."""
        self._remove(model, observer_node)


class LayerInputObserver(_MyQASRObserver):
    """Samples input rows (or token ids) of one layer; optional 8-bit activation q/dq at convert.

    Args:
        kind: ``"linear"``, ``"conv1d"`` or ``"embedding"`` (what the input feeds).
        in_features: K of the layer's weight matrix (rows are reshaped to [-1, K]).
        conv: ``(kernel, stride, padding, dilation)`` for ``kind == "conv1d"``.
    """

    def __init__(self, dtype: torch.dtype = torch.uint8, *, session: CalibrationSession, layer: str,
                 kind: str = "linear", in_features: int = 0, conv: tuple[int, int, int, int] | None = None, **kwargs: Any):
        super().__init__(dtype, session=session, layer=layer)
        self.kind = kind
        self.in_features = in_features
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.session.stats(self.layer)
        if self.kind == "embedding":
            st.update_indices(x)
        elif self.kind == "conv1d":
            assert self.conv is not None
            # Only the sampled patches are unfolded; the range is that of x (zero padding cannot
            # widen it: the activation range always includes 0).
            xs = x.detach()
            if xs.numel():
                st.update_input_range(xs)
            n, get = conv1d_patch_rows(xs, *self.conv)
            st.rows.add_lazy(n, get)
        else:
            st.update_input_rows(x.detach().reshape(-1, self.in_features))
        return x

    def convert(self, model: GraphModule, observer_node: Node) -> None:
        """Remove the node, or with ``act_bits == 8`` replace it by per-tensor uint8 q/dq."""
        bits = self.session.act_bits
        st = self.session.stats(self.layer)
        if not bits or self.kind == "embedding" or st.in_min > st.in_max:
            self._remove(model, observer_node)
            return
        qmax = 2**bits - 1
        lo, hi = min(st.in_min, 0.0), max(st.in_max, 0.0)
        scale = max((hi - lo) / qmax, 1e-8)
        zp = int(min(max(round(-lo / scale), 0), qmax))
        args = (observer_node.args[0], scale, zp, 0, qmax, torch.uint8)
        with model.graph.inserting_before(observer_node):
            q = model.graph.call_function(torch.ops.quantized_decomposed.quantize_per_tensor.default, args)
            dq = model.graph.call_function(
                torch.ops.quantized_decomposed.dequantize_per_tensor.default, (q, scale, zp, 0, qmax, torch.uint8)
            )
        observer_node.replace_all_uses_with(dq)
        model.graph.erase_node(observer_node)


class LayerWeightObserver(_MyQASRObserver):
    """Marks one layer's weight; at convert it becomes codes + scale + zero -> dequantize op."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def convert(self, model: GraphModule, observer_node: Node) -> None:
        """Apply the session's decision for this layer (made at the first convert over all graphs)."""
        plan = self.session.weight_plan(self.layer)
        w_node = observer_node.args[0]
        if plan is None:  # kept in full precision by the scheme
            self._remove(model, observer_node)
            return
        safe = self.layer.replace(".", "_")
        attrs = {part: f"{safe}_myqasr_{part}" for part in ("codes", "scale", "zero")}
        # A tied weight reached through two graph inputs converts twice in one graph: reuse the
        # buffers (and the dequantize node) the first conversion made, so there is ONE copy.
        existing = [n for n in model.graph.nodes if n.op == "call_function" and n.target is torch.ops.myqasr.dequantize_groupwise.default
                    and n.meta.get("myqasr_layer") == self.layer]
        if existing:
            observer_node.replace_all_uses_with(existing[0])
            model.graph.erase_node(observer_node)
            return
        for part, attr in attrs.items():
            if hasattr(model, attr):
                raise RuntimeError(
                    f"cannot add buffer {attr!r} for layer {self.layer!r}: the model already has an "
                    "attribute of that name (was this graph converted twice?)"
                )
            model.register_buffer(attr, plan[part])
        with model.graph.inserting_before(observer_node):
            nodes = [model.graph.get_attr(attrs[p]) for p in ("codes", "scale", "zero")]
            dq = model.graph.call_function(
                torch.ops.myqasr.dequantize_groupwise.default,
                (*nodes, plan["format"], plan["group_size"], list(plan["shape"]), plan["dtype"]),
            )
        dq.meta["myqasr_layer"] = self.layer
        if isinstance(w_node, Node) and "val" in w_node.meta:
            dq.meta["val"] = w_node.meta["val"]
        observer_node.replace_all_uses_with(dq)
        model.graph.erase_node(observer_node)
