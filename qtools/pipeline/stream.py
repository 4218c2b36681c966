"""A model run layer-major from its files: peak memory is a unit's (a layer's, the embedding's)
worth plus the activations, whatever the model's size (docs/probe.md: 0.73 GB for a 1.29 GB
model, 0.82 GB at twice the depth).

mlx-lm's own model class is built from config.json without weights (its parameters are
lazy and never evaluated). Each decoder layer, the embedding and the output head is a
*unit*: when the model's own __call__ reaches it, its tensors are read from a tensor
source, renamed by mlx-lm's `sanitize` (Hub un-stacked experts -> switch_mlp), loaded
into the layer, optionally fake-quantized, applied to the whole batch, and dropped. So
the model's own code (masks, RoPE, caches, tied embeddings, logit scaling) runs
unchanged, any mlx-lm architecture with `model.layers` streams, and mlx-lm's generation
(BatchGenerator, one KV cache per layer) runs on it as on a loaded model: each call of the
model reads the weights once.

A tensor source has names(), info(name) (.dtype as a safetensors code, .shape) and
get(name) (the stored tensor as an evaluated mx.array); io.weights.MappedTensors serves a model
directory's memory-mapped safetensors files (io.weights.SafetensorsModel). sanitize sees
every name: the tensors of the unit being loaded are real, every other one is a lazy NaN
placeholder that is never evaluated (a unit whose weights depend on another unit's
tensors is found by its NaNs on first load, and refused).

Teacher-forced scoring of many precisions at once (`score`): the batch holds one copy of
every sequence per precision (float, then each bit-width); every unit reads its float
weights once and runs each copy at its precision (dequantize(quantize(w)) with the model's
own quant_predicate, as fakequant does), so one read of the model serves every bit-width.
The sequences are sorted by length and a layer runs on chunks of them, each cut to its
longest sequence: no chunk computes another's padding (attention is causal, so the padding
after a sequence never changes it). The last layer's output is kept; the head then runs per
chunk of sequences, the model's own top (final norm, head, logit scaling) replaying the kept
hidden states, so the (batch, length, vocab) logits never exist at once.
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import QtoolsError
from ..io.weights import MappedTensors, mx_dtype
from . import backend
from .fakequant import quant_plan, quantized_values

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
# Tokens per chunk of sequences a layer is applied to at once while scoring (bounds the attention).
CHUNK_TOKENS = 8192
# Tokens per chunk the head scores at once (at a 32k vocabulary: 32 MB of float32 log-probs).
HEAD_TOKENS = 256


class _Captured(Exception):
    """Raised by the last layer while scoring: its output is kept, the head runs per chunk later."""


class _Unit:
    """A module whose weights are read when it is called and dropped after."""

    def __init__(self, stream, path: str, module, kind: str, candidates: list):
        from mlx.utils import tree_flatten

        self.stream, self.path, self.module, self.kind = stream, path, module, kind
        self.candidates = candidates  # lists of source names to try, narrowest first
        self.skeleton = module.parameters()  # lazy, never evaluated: what the module holds between calls
        self.needed = {k for k, _ in tree_flatten(self.skeleton)}

        # MoE experts fake-quantized an expert at a time where they are multiplied (numpy's BLAS:
        # backend.set_fake_quant), never as a second copy of the stacked experts
        self.per_expert = {p: m for p, m in module.named_modules() if getattr(m, "fake_quant_per_expert", False)}
        self.checked = False
        self.last = False
        self.held = None  # while the head replays: {"base": float weights, "precision", "pairs"}

    def at(self, precision, base: dict) -> tuple[list, dict]:
        """(name, array) pairs of the unit at `precision` (None: float as stored; b: the values a
        b-bit model holds), in the compute dtype, evaluated; and {module path within the unit:
        (bits, group size)} of the MoE experts left float in the pairs, whose matmul computes those
        values an expert at a time (self.per_expert, backend.set_fake_quant)."""
        import mlx.core as mx

        s = self.stream
        out = dict(base)
        # an expert's values are computed from the stored dtype, then cast to float32 by its matmul:
        # as the whole tensor's are when the compute dtype is the stored one or float32
        per_expert = self.per_expert if s.compute_dtype is None or s.compute_dtype == mx.float32 else {}
        deferred = {}
        if precision is not None:
            pre, todo = self.path + ".", {}
            for path, (bits, gs) in s.plans[precision].items():
                if path == self.path or path.startswith(pre):  # the unit itself (the embedding) or inside it
                    sub = path[len(pre):] if path != self.path else ""
                    if sub in per_expert:
                        deferred[sub] = (bits, gs)
                        continue
                    name = f"{sub}.weight" if sub else "weight"
                    todo[name] = (base[name], bits, gs)
            out.update(quantized_values(todo))
        if s.compute_dtype is not None:
            keep = {f"{p}.weight" for p in per_expert}  # cast per expert by their matmul
            out = {k: (v.astype(s.compute_dtype) if _is_float(v) and k not in keep else v) for k, v in out.items()}
        pairs = list(out.items())
        mx.eval([v for _, v in pairs])
        return pairs, deferred

    def load(self, module, pairs: list, deferred: dict) -> None:
        """Load a precision's weights (at) into the unit's module."""
        module.load_weights(pairs, strict=False)
        for p, m in self.per_expert.items():
            backend.set_fake_quant(m, deferred.get(p))

    def run(self, method: str, orig, module, args, kwargs):
        """The module's own method on the batch, each precision's copy with its weights."""
        s = self.stream
        x = args[0]
        if s.mode == "replay":
            if self.kind == "layer":  # the layers were run: the last one hands over its kept output
                return s.replayed() if self.last else x
            if self.kind == "embed" and method == "__call__":
                import mlx.core as mx  # the input of layers that will not look at it

                return mx.zeros((*x.shape, module.weight.shape[-1]), dtype=s.compute_dtype or mx.float16)
        # the head scores chunk after chunk while replaying: its weights are kept between calls
        holding = s.mode == "replay"
        if holding and self.held is None:
            self.held = {"base": s.fetch(self)}
        base = self.held["base"] if holding else s.fetch(self)
        outs = []
        split = self.kind == "layer" and s.mode == "capture"
        try:
            for precision, a, b in s.groups(x.shape[0]):
                if holding and "pairs" in self.held and self.held["precision"] == precision:
                    pairs, deferred = self.held["pairs"]
                else:
                    module.update(self.skeleton)  # the previous precision's weights go first
                    if holding:
                        self.held.pop("pairs", None)
                    pairs, deferred = self.at(precision, base)
                    if holding:
                        self.held.update(precision=precision, pairs=(pairs, deferred))
                self.load(module, pairs, deferred)
                for c0, c1, w in s.chunks(a, b, x, split):
                    if (c0, c1, w) == (0, x.shape[0], x.shape[1] if x.ndim > 1 else None):
                        y = orig(module, *args, **kwargs)
                    else:
                        y = orig(module, x[c0:c1, :w], *[_cut(v, x, c0, c1, w) for v in args[1:]],
                                 **{k: _cut(v, x, c0, c1, w) for k, v in kwargs.items()})
                        y = _widen(y, x.shape[1]) if w is not None else y
                    if self.kind == "layer" or (self.kind == "embed" and method == "__call__"):
                        _eval_out(y, args[1:], kwargs)  # so this precision's weights can go now
                    outs.append(y)
                del pairs
        finally:
            module.update(self.skeleton)  # the weights go (a lazy output keeps what it needs)
            for m in self.per_expert.values():
                backend.set_fake_quant(m, None)
        del base
        if self.kind != "head" and s.mode != "replay":
            backend.release_freed_memory()  # without it resident memory grows layer by layer
        if len(outs) == 1:
            out = outs[0]
        else:
            import mlx.core as mx

            out = mx.concatenate(outs, axis=0)
        if self.kind == "layer" and s.mode == "capture":
            if s.on_layer is not None:
                s.on_layer()
            if self.last:
                s.captured = out
                raise _Captured
        return out


def _is_float(v) -> bool:
    import mlx.core as mx

    return mx.issubdtype(v.dtype, mx.floating)


def _cut(v, x, c0: int, c1: int, w: int | None = None):
    """An argument cut with the batch when it has the batch's leading dimension (a mask array),
    and to the chunk's width w when it spans the sequence in its last two (a causal mask)."""
    import mlx.core as mx

    if not isinstance(v, mx.array):
        return v
    if v.ndim >= 3 and v.shape[0] == x.shape[0]:
        v = v[c0:c1]
    if w is not None and v.ndim >= 2 and v.shape[-1] == v.shape[-2] == x.shape[1]:
        v = v[..., :w, :w]
    return v


def _widen(y, width: int):
    """A chunk's layer output, run on its sequences' own width, padded back to the batch's: the
    positions after every sequence of the chunk (zeros) are never read (attention is causal, and
    the chunk is cut to the same width at every layer)."""
    import mlx.core as mx

    if not isinstance(y, mx.array) or y.ndim < 2:
        raise QtoolsError(f"internal: a layer's output of type {type(y).__name__} cannot be cut to its chunk's width")
    if y.shape[1] == width:
        return y
    return mx.pad(y, [(0, 0), (0, width - y.shape[1])] + [(0, 0)] * (y.ndim - 2))


def _eval_out(y, args, kwargs) -> None:
    """Evaluate a layer's output and any cache it updated, so the layer's weights can go."""
    import mlx.core as mx

    arrays = [y] if isinstance(y, mx.array) else [v for v in (y if isinstance(y, (tuple, list)) else [])
                                                  if isinstance(v, mx.array)]
    for c in [*args, *kwargs.values()]:
        state = getattr(c, "state", None) if c is not None and not isinstance(c, (mx.array, str)) else None
        if state is not None:
            arrays.append(state)
    mx.eval(arrays)


_PATCHED: dict = {}


def _patch(module, unit: _Unit, methods: tuple) -> None:
    """Route the module's methods through its unit (its class swapped for a subclass, as
    backend.cpu_float32_experts does: parameter names and the module tree stay as they are)."""
    cls = type(module)
    key = (cls, methods)
    if key not in _PATCHED:
        ns = {}
        for m in methods:
            orig = getattr(cls, m)

            def method(self, *args, _m=m, _orig=orig, **kwargs):
                return self._qtools_unit.run(_m, _orig, self, args, kwargs)

            ns[m] = method
        _PATCHED[key] = type(f"Streamed{cls.__name__}", (cls,), ns)
    module.__class__ = _PATCHED[key]
    object.__setattr__(module, "_qtools_unit", unit)


class StreamedModel:
    """mlx-lm's model for a model directory, its units streamed from `source` (see module doc).

    net: the mlx-lm module to call (model(ids), mlx-lm's generation). compute_dtype: cast every
    weight (after fake quantization, in its stored dtype) to this dtype before computing, e.g.
    mx.float32; None computes in the stored dtype. blas: "auto" (numpy's where MLX links a
    reference BLAS: backend.blas_is_reference), "numpy" or "mlx".
    """

    def __init__(self, path, source=None, compute_dtype=None, group_size: int = 64, blas: str = "auto",
                 config: dict | None = None):
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.utils import load_config

        from ..compat import mlx_lm_model_classes

        self.path = Path(path)
        try:
            self.config = config if config is not None else load_config(self.path)  # a fused view's own
            if self.config.get("quantization") or self.config.get("quantization_config"):
                raise QtoolsError(f"{self.path} is quantized: a streamed model is a float one")
            model_cls, args_cls = mlx_lm_model_classes(self.config)
            net = model_cls(args_cls.from_dict(self.config))
        except QtoolsError:
            raise
        except Exception as exc:  # mlx-lm raises many kinds for an unknown or broken config
            raise QtoolsError(f"cannot build the model of {self.path}: {exc}") from None
        net.eval()
        self.net = net
        self.source = source if source is not None else MappedTensors(self.path)
        self.compute_dtype = compute_dtype
        self.group_size = group_size
        self.mode = "run"
        self.precisions = [None]
        self.plans: dict = {}
        self.on_layer = None  # called after each layer while scoring (progress)
        self.captured = None
        self._replay = None
        self._lengths = None  # while scoring: each sequence's length, in batch order (ascending)
        backend.cpu_float32_experts(net, lazy=True)  # MLX's CPU GatherMM: float32 only
        # MLX's Linux CPU wheels link a reference BLAS: a layer's matmuls go to numpy's instead.
        self.numpy_blas = blas == "numpy" or (blas == "auto" and backend.blas_is_reference())
        if self.numpy_blas:
            backend.numpy_blas_linears(net)

        self._placeholders = {}
        for name in self.source.names():
            info = self.source.info(name)
            dtype = mx_dtype(info.dtype)
            fill = float("nan") if mx.issubdtype(dtype, mx.floating) else 0
            self._placeholders[name] = mx.full(info.shape, fill, dtype=dtype)
        by_index: dict = {}
        outer = []
        for name in self._placeholders:
            m = _INDEX.search(name)
            (by_index.setdefault(int(m[1]), []) if m else outer).append(name)

        paths = {id(m): p for p, m in net.named_modules()}
        try:
            layers = list(net.layers)
        except Exception:
            raise QtoolsError(f"{self.path}: mlx-lm's {type(net).__module__} model has no `layers` to stream") from None
        self.units = []
        layer_paths = []
        for layer in layers:
            p = paths[id(layer)]
            m = _INDEX.search(p)
            unit = _Unit(self, p, layer, "layer", [by_index.get(int(m[1]), [])] if m else [outer])
            _patch(layer, unit, ("__call__",))
            self.units.append(unit)
            layer_paths.append(p + ".")
        if not self.units:
            raise QtoolsError(f"{self.path}: the model has no layers")
        self.units[-1].last = True

        def outside(p):
            return not any((p + ".").startswith(lp) for lp in layer_paths)

        # Outside the layers: the embedding and the head are streamed, the rest (norms) held.
        resident = []
        for p, module in net.named_modules():
            if not p or not outside(p) or module.children() and not hasattr(module, "to_quantized"):
                continue
            if not module.parameters():
                continue
            narrow = [n for n in outer if n.startswith(p + ".")]
            cands = [narrow, outer] if narrow and len(narrow) < len(outer) else [outer]
            if hasattr(module, "to_quantized") and "weight" in module:
                kind = "embed" if hasattr(module, "as_linear") else "head"
                unit = _Unit(self, p, module, kind, cands)
                _patch(module, unit, ("__call__", "as_linear") if kind == "embed" else ("__call__",))
                self.units.append(unit)
            else:
                resident.append(_Unit(self, p, module, "resident", cands))
        covered = [u.path + "." for u in [*self.units, *resident]]
        for name, _ in tree_flatten(net.parameters()):
            if not any(name.startswith(c) for c in covered):
                raise QtoolsError(f"{self.path}: cannot stream mlx-lm's {type(net).__module__} model: its "
                                  f"parameter {name} belongs to no layer, embedding or head")
        for unit in resident:  # read once, kept: tiny (norm weights)
            unit.module.load_weights(unit.at(None, self.fetch(unit))[0], strict=False)

    # -- reading
    def fetch(self, unit: _Unit) -> dict:
        """The unit's float weights as stored, read now: {name within the unit: evaluated array}."""
        import mlx.core as mx

        pre = unit.path + "."
        tried = []
        for names in unit.candidates:
            weights = dict(self._placeholders)
            for n in names:
                weights[n] = self.source.get(n)
            if hasattr(self.net, "sanitize"):
                weights = self.net.sanitize(weights)
            params = {k[len(pre):]: v for k, v in weights.items() if k.startswith(pre)}
            del weights
            missing = unit.needed - set(params)
            extra = set(params) - unit.needed
            if missing or extra:
                tried.append(f"{len(missing)} missing ({', '.join(sorted(missing)[:3])})" if missing else
                             f"{len(extra)} unexpected ({', '.join(sorted(extra)[:3])})")
                continue
            mx.eval(list(params.values()))
            if not unit.checked:
                bad = [k for k, v in params.items() if _is_float(v) and mx.any(mx.isnan(v)).item()]
                if bad:
                    tried.append(f"{bad[0]} depends on tensors outside it")
                    continue
                unit.checked = True
                unit.candidates = [names]
            return params
        raise QtoolsError(f"{self.path}: cannot stream {unit.path}: its weights from the model's files "
                          f"do not fit mlx-lm's {type(self.net).__module__} model ({'; '.join(tried)})")

    # -- batches and precisions
    def groups(self, batch: int) -> list:
        """(precision, first row, end row) of each precision's copy of the batch."""
        if self.mode == "replay":
            return [(self._replay[0], 0, batch)]
        n = len(self.precisions)
        if batch % n:
            raise QtoolsError(f"internal: a batch of {batch} rows is not {n} precisions' copies")
        per = batch // n
        return [(p, i * per, (i + 1) * per) for i, p in enumerate(self.precisions)]

    def chunks(self, a: int, b: int, x, split: bool) -> list:
        """(first row, end row, width or None) of the chunks rows a..b (one precision's copy) run in:
        while scoring, consecutive sequences (sorted by length) of at most CHUNK_TOKENS tokens, each
        chunk cut to its longest sequence, so no layer computes the padding of a longer one."""
        if not split or x.ndim < 2:
            return [(a, b, None)]
        lengths = self._lengths  # split only while scoring, which sets them
        out, c0 = [], a
        for r in range(a, b):  # lengths ascend: a chunk's width is its last sequence's length
            if r > c0 and (r - c0 + 1) * lengths[r - a] > CHUNK_TOKENS:
                out.append((c0, r, lengths[r - 1 - a]))
                c0 = r
        out.append((c0, b, lengths[b - 1 - a]))
        return out

    def replayed(self):
        rows, width = self._replay[1], self._replay[2]
        return self.captured[rows[0]:rows[1], :width]

    def set_precisions(self, precisions: list) -> None:
        """Which precisions a batch's copies run at: None is float, an int that many bits."""
        for p in precisions:
            if p is not None and p not in self.plans:
                self.plans[p] = quant_plan(self.net, p, self.group_size)
        self.precisions = list(precisions)

    # -- scoring
    def score(self, seqs, precisions: list, vocab_hint: int = 32768, progress: bool = False):
        """Teacher-forced log-probs of every (tokens, first scored position) at every precision,
        from one read of the weights: yields (precision index, sequence index, scored rows'
        log-probs as an mlx array, as numpy, their top token), precision by precision, each
        precision's sequences shortest first."""
        import mlx.core as mx
        import numpy as np

        from ..format import progress as progress_bar
        from .runner import batches, log_softmax

        n = len(seqs)
        width = max(len(t) for t, _ in seqs)
        order = sorted(range(n), key=lambda i: len(seqs[i][0]))  # by length: chunks cut to their own width
        ids = mx.array([seqs[i][0] + [0] * (width - len(seqs[i][0])) for i in order])
        self._lengths = [len(seqs[i][0]) for i in order]
        self.set_precisions(precisions)
        bar = progress_bar(None, f"layers x {len(precisions)} precisions", enabled=progress,
                           total=sum(u.kind == "layer" for u in self.units))
        self.on_layer = (lambda: bar.update(1)) if bar is not None else None
        self.mode, self.captured = "capture", None
        try:
            try:
                self.net(mx.concatenate([ids] * len(precisions), axis=0) if len(precisions) > 1 else ids)
            except _Captured:
                pass
            if self.captured is None:
                raise QtoolsError(f"{self.path}: the model's last layer was never reached")
            self.mode = "replay"
            indexed = [(*seqs[i], row, i) for row, i in enumerate(order)]  # (tokens, start, batch row, index)
            for k, precision in enumerate(precisions):
                for batch in batches(indexed, vocab_hint, HEAD_TOKENS):
                    lo, hi = batch[0][2], batch[-1][2] + 1
                    w = max(len(t) for t, *_ in batch)
                    self._replay = (precision, (k * n + lo, k * n + hi), w)
                    logp = log_softmax(self.net(ids[lo:hi, :w]))
                    mx.eval(logp)
                    for j, (tokens, start, _row, i) in enumerate(batch):
                        rows = logp[j, start:len(tokens) - 1]
                        yield k, i, rows, np.array(rows), np.array(mx.argmax(rows, axis=-1))
        finally:
            self.mode, self.captured, self._replay, self.on_layer = "run", None, None, None
            self._lengths = None
            self.precisions = [None]
            self._release_held()
            if bar is not None:
                bar.close()

    def _release_held(self) -> None:
        for u in self.units:
            u.held = None

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
