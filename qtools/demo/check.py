"""Measure the demo's survival threshold: fuse, quantize, greedy-generate the suite.

Self-contained on purpose (no dependency on the validate command) so the demo
recipe can be re-measured on its own:

    PYTHONPATH=. python -m qtools.demo.check models/demo_base models/demo_adapter suites/demo.jsonl
"""

import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn


def fused_model(base_dir, adapter_dir=None):
    """Load the base and fuse the LoRA as the pipeline does: float32 sum, float16 store."""
    from mlx_lm import load

    model, tok = load(str(base_dir))
    if adapter_dir is None:
        return model, tok
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = cfg["lora_parameters"]["scale"]
    ad = mx.load(str(Path(adapter_dir) / "adapters.safetensors"))
    params = dict(__import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.parameters()))
    new = []
    for name in ad:
        if not name.endswith(".lora_a"):
            continue
        stem = name[: -len(".lora_a")]
        a, b = ad[stem + ".lora_a"], ad[stem + ".lora_b"]
        w = params[stem + ".weight"]
        fused = w.astype(mx.float32) + scale * (b.T @ a.T)
        new.append((stem + ".weight", fused.astype(w.dtype)))
    model.load_weights(new, strict=False)
    mx.eval(model.parameters())
    return model, tok


def quantized(model, bits, group_size=64, simulate=False):
    """Quantize as mlx-lm does (Linear + Embedding layers). With simulate, keep
    float16 layers holding the dequantized weights: the same values, but fast
    matmuls (MLX's CPU quantized matmul is slow for prompt batches)."""
    if bits is None:
        return model
    if not simulate:
        nn.quantize(model, group_size=group_size, bits=bits)
    else:
        from mlx.utils import tree_flatten

        new = []
        for name, w in tree_flatten(model.parameters()):
            if name.endswith(".weight") and w.ndim == 2 and w.shape[-1] % group_size == 0:
                q = mx.quantize(w, group_size=group_size, bits=bits)
                new.append((name, mx.dequantize(*q, group_size=group_size, bits=bits).astype(w.dtype)))
        model.load_weights(new, strict=False)
    mx.eval(model.parameters())
    return model


def load_cases(suite_path):
    lines = [json.loads(x) for x in Path(suite_path).read_text().splitlines() if x.strip()]
    return [c for c in lines if "suite" not in c]


def classify(text, case):
    """The behaviour a reply shows: 'tool_call', 'direct', a label, or 'malformed'."""
    if "<tool_call>" in text:
        body = text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
        try:
            call = json.loads(body.strip())
            return "tool_call" if call.get("name") and isinstance(call.get("arguments"), dict) else "malformed"
        except (ValueError, AttributeError):
            return "malformed"
    labels = case["expect"].get("labels")
    if labels:
        stripped = text.strip()
        return stripped if stripped in labels else "malformed"
    return "direct" if text.strip() else "malformed"


def run_suite(model, tok, cases, max_tokens=24):
    """Greedy generation; returns (n_correct, n_critical_errors, n_malformed, outputs)."""
    from mlx_lm import generate

    correct = critical = malformed = 0
    outs = []
    for c in cases:
        prompt = tok.apply_chat_template(c["messages"], tools=c.get("tools") or None,
                                         add_generation_prompt=True)
        text = generate(model, tok, prompt, max_tokens=max_tokens)
        got = classify(text, c)
        exp = c["expect"]
        want = exp["label"] if exp["type"] == "label" else exp["type"]
        correct += got == want
        malformed += got == "malformed"
        if "critical" in c and got in c["critical"]["forbidden"]:
            critical += 1
        outs.append((c["id"], want, got, text))
    return correct, critical, malformed, outs


def first_token_margins(model, tok, cases):
    """Logit margin of the right first reply token over the wrong one, per case.

    One batched forward pass (right padding is harmless under the causal mask).
    """
    call_id = tok.convert_tokens_to_ids("<tool_call>")
    prompts = [tok.apply_chat_template(c["messages"], tools=c.get("tools") or None,
                                       add_generation_prompt=True) for c in cases]
    width = max(len(p) for p in prompts)
    batch = mx.array([p + [0] * (width - len(p)) for p in prompts])
    last = mx.array([len(p) - 1 for p in prompts])
    logits = model(batch)[mx.arange(len(prompts)), last].astype(mx.float32)
    margins = []
    for c, row in zip(cases, logits):
        exp = c["expect"]
        if exp["type"] == "label":
            ids = {lab: tok.encode(lab, add_special_tokens=False)[0] for lab in exp["labels"]}
            other = [l for l in exp["labels"] if l != exp["label"]][0]
            m = row[ids[exp["label"]]] - row[ids[other]]
        else:
            direct_best = mx.where(mx.arange(row.shape[0]) == call_id, -1e9, row).max()
            m = row[call_id] - direct_best
            if exp["type"] == "direct":
                m = -m
        margins.append(m.item())
    return margins


def measure(base_dir, adapter_dir, suite_path, bits_list=(None, 8, 6, 5, 4, 3, 2),
            group_size=64, generate_text=True, log=sys.stderr):
    cases = load_cases(suite_path)
    rows = []
    for label, adapter in (("base", None), ("fused", adapter_dir)):
        for bits in bits_list if adapter else (None,):
            model, tok = fused_model(base_dir, adapter)
            model = quantized(model, bits, group_size)
            t = time.time()
            m = first_token_margins(model, tok, cases)
            row = {"model": label, "bits": bits or 16,
                   "first_token_correct": sum(x > 0 for x in m),
                   "min_margin": round(min(m), 2), "mean_margin": round(sum(m) / len(m), 2)}
            if generate_text:
                ok, crit, bad, _ = run_suite(model, tok, cases)
                row.update(correct=ok, critical=crit, malformed=bad)
            row["n"] = len(cases)
            row["s"] = round(time.time() - t, 1)
            print(json.dumps(row), file=log, flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    gen = "--fast" not in sys.argv
    args = [a for a in sys.argv[1:] if a != "--fast"]
    measure(args[0], args[1], args[2], generate_text=gen, log=sys.stdout)
