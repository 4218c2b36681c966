"""Behaviour of a fine-tune at each bit-width, measured on fake-quantized weights.

Every weight mlx-lm would quantize is replaced by mx.dequantize(mx.quantize(w))
-- the exact values the quantized model holds -- and the model runs in float16.
This keeps 24+ fine-tunes x 7 precisions within minutes on 2 CPU cores;
`make demo` checks real quantized models.
"""

from __future__ import annotations

from ..pipeline import scoring
from ..pipeline.runner import fake_quantize
from ..survival.rule import smallest_surviving
from .grid import BITS


def model_weights(model_dir) -> dict:
    """{parameter name: array} of a model directory, named as fake_quantize looks them up."""
    from mlx.utils import tree_flatten

    from ..io.modeldir import check_model_dir, load_model

    net, _, _, _ = load_model(check_model_dir(model_dir, "base model"))
    return dict(tree_flatten(net.parameters()))


def behaviour(model_dir, suite_obj, bits_list, group_size=64, max_tokens=None, exact_delta_from=None,
              min_accuracy=None) -> dict:
    """Accuracy, critical errors and format compliance at float16 and each bit-width.

    exact_delta_from: the base's weights (model_weights); each bit-width is then measured
    with the base quantized and the delta kept exactly (see fake_quantize), and float16
    is skipped. min_accuracy: when given, a float16 model that fails validation is not
    measured at any bit-width (it has no threshold; the calibration leaves it out).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..io.modeldir import check_model_dir
    from ..pipeline.runner import load_model
    from ..pipeline.scoring import summarize
    from ..pipeline.validate import run_cases

    model, tok, _, _ = load_model(check_model_dir(model_dir))
    original = [(k, mx.array(v)) for k, v in tree_flatten(model.parameters())]
    out = {}
    for bits in ([] if exact_delta_from is not None else [16]) + list(bits_list):
        if bits != 16:
            model.load_weights(original)
            fake_quantize(model, bits, group_size, exact_delta_from=exact_delta_from)
        records, _, _ = run_cases(model, tok, suite_obj, max_tokens=max_tokens, batch=True)
        s = summarize(records, suite_obj, 0.0)
        out[str(bits)] = {"accuracy": s["accuracy"], "critical_errors": s["critical_errors"],
                          "format_compliance": s["format_compliance"],
                          # per case, in suite order: what a re-drawn suite is resampled from
                          "cases": {"correct": "".join("1" if r["correct"] else "0" for r in records),
                                    "critical": "".join("1" if r["critical"] else "0" for r in records)}}
        if bits == 16 and min_accuracy is not None and not passes(out["16"], min_accuracy):
            break
    del model
    return out


def passes(r: dict, min_accuracy: float) -> bool:
    """The validation verdict (scoring.verdict) of one precision's measured behaviour."""
    return scoring.passes(r["accuracy"], r["critical_errors"], min_accuracy)


def true_threshold(beh: dict, bits_list, min_accuracy: float):
    """Smallest bit-width whose validation passes, with every larger one passing too
    (None: not even the largest bit-width passes)."""
    return smallest_surviving(bits_list, lambda b: passes(beh[str(b)], min_accuracy))


MISSING = "missing"


def exact_delta_threshold(r: dict, min_accuracy: float):
    """The threshold with the base quantized and the delta kept exactly; MISSING if not measured."""
    beh = r.get("behaviour_exact_delta")
    return MISSING if not beh else true_threshold(beh, BITS, min_accuracy)
