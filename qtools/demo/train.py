"""Train the demo base model and its LoRA adapter with mlx-lm's own tuner.

Base: a tiny Qwen3 pretrained (all weights, float32) on the demo format with
soft object-class labels (data.BASE_PRIORS): it ranks the objects right but
answers wrong for the tool and VETO classes. Then one input channel in every
64-group of each projection gets an outlier gain (`add_outlier_channels`),
folded in without changing the function, as trained LLMs have outlier
features: the quantization step of every group is set by its outlier.
Adapter: standard mlx-lm LoRA (`linear_to_lora_layers` + `trainer.train`) at
a fine-tuning learning rate, on deterministic object labels: it only moves the
decision boundary, so its delta is a tenth of the 4-bit step or less.
The calibration study also builds qwen3_moe bases (arch="qwen3_moe": Qwen3-30B-A3B's
architecture, tiny), saved as the Hub ships them (layout="hub") when asked.
"""

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from .. import QtoolsError
from . import data
from .model import adapter_config, build_model, layout_of, qwen3_config, qwen3_moe_config, save_model_dir
from .tokenizer import build_tokenizer

# The demo's recipe; its measured thresholds are in qtools/demo/__init__.py.
# The adapter stops early, just after the object cue for the safety review
# is learned, so its margin there is thin.
BASE = dict(hidden_size=128, num_layers=4, intermediate_size=256, seed=0,
            iters=250, batch_size=16, lr=3e-3, outlier_gain=24.0)
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ALL_LINEAR = ATTENTION + MLP
ADAPTER = dict(rank=8, scale=4.0, keys=ALL_LINEAR, num_layers=4, iters=100, batch_size=16,
               lr=2e-4, seed=0)
# LoRA keys of a qwen3_moe layer: the router is a plain Linear; the experts' projections are
# stacked SwitchLinear layers (mlx-lm's linear_to_lora_layers makes them LoRASwitchLinear).
MOE_ATTN_ROUTER = ATTENTION + ("mlp.gate",)
MOE_EXPERTS = ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj")
MOE_ALL = MOE_ATTN_ROUTER + MOE_EXPERTS
# Base architectures (model_type -> config builder) and the dtype each layout is saved in: the
# Hub ships Qwen3 (dense and MoE) in bfloat16; the demo's mlx layout is float16.
ARCHS = {"qwen3": qwen3_config, "qwen3_moe": qwen3_moe_config}
LAYOUT_DTYPE = {"mlx": "float16", "hub": "bfloat16"}


def encode_examples(tok, examples):
    """(tokens, prompt_length) pairs: only the assistant reply is trained on."""
    out = []
    for ex in examples:
        tools = ex.get("tools") or None
        full = tok.apply_chat_template(ex["messages"], tools=tools, tokenize=False)
        prompt = tok.apply_chat_template(ex["messages"][:-1], tools=tools,
                                         add_generation_prompt=True, tokenize=False)
        out.append((tok.encode(full, add_special_tokens=False),
                    len(tok.encode(prompt, add_special_tokens=False))))
    return out


def iterate_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
    """Like mlx-lm's, but pads to the batch's longest sequence (ours are ~30 tokens)."""
    rng = np.random.default_rng(0 if seed is None else seed)
    n = len(dataset)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            batch = [dataset[j] for j in order[i:i + batch_size]]
            width = max(len(t) for t, _ in batch)
            arr = np.zeros((batch_size, width), np.int32)
            for r, (t, _) in enumerate(batch):
                arr[r, :len(t)] = t
            lengths = [(off, len(t)) for t, off in batch]
            yield mx.array(arr), mx.array(lengths)
        if not loop:
            break


def _train(model, examples_tok, iters, batch_size, lr, seed, warmup=0, save_every=None, save_dir=None):
    from mlx_lm.tuner.trainer import TrainingArgs, train

    from ..compat import mlx_lm_plain_console

    mx.random.seed(seed)
    if warmup:
        sched = optim.join_schedules([optim.linear_schedule(lr / 10, lr, warmup),
                                      optim.cosine_decay(lr, iters - warmup, lr / 10)], [warmup])
    else:
        sched = lr
    opt = optim.Adam(learning_rate=sched)
    with tempfile.TemporaryDirectory() as tmp:
        # Checkpoints (save_every) are for re-measuring the recipe only.
        args = TrainingArgs(batch_size=batch_size, iters=iters, steps_per_report=max(1, iters // 4),
                            steps_per_eval=10**9, steps_per_save=save_every or 10**9,
                            max_seq_length=256,
                            adapter_file=str(Path(save_dir or tmp) / "adapters.safetensors"))
        # mlx-lm's trainer reports on stdout; qtools keeps stdout for results.
        with contextlib.redirect_stdout(sys.stderr), mlx_lm_plain_console(sys.stderr):
            train(model, opt, examples_tok, args=args,
                  iterate_batches=lambda **kw: iterate_batches(**kw, seed=seed))


def add_outlier_channels(model, config, gain, seed, group_size=64):
    """Give one input channel per `group_size` group of every projection a weight
    `gain` times larger, without changing the model's function.

    Trained LLMs have a few outlier feature channels; their weights set the range,
    hence the quantization step, of every group they fall in. A briefly trained
    tiny model has none, so its step is small and its quantization noise mild.
    The gain is folded in exactly: q/k/v and gate/up columns are multiplied where
    the preceding RMSNorm weight is divided; o_proj columns where the matching
    v_proj rows are divided; down_proj columns where the matching up_proj rows are.
    A qwen3_moe layer's router reads the same normed hidden state as its experts, so
    its columns get the hidden gain too (same logits, same top-k), and each expert
    gets its own intermediate channels.
    """
    if gain == 1.0:
        return model
    rng = np.random.default_rng(seed + 100)
    hidden = config["hidden_size"]
    hd, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def gains(n):
        g = np.ones(n, np.float32)
        g[[start + rng.integers(group_size) for start in range(0, n, group_size)]] = gain
        return mx.array(g)

    g_hidden = gains(hidden)  # the same hidden channels in every layer, as in LLMs
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layer.input_layernorm.weight = layer.input_layernorm.weight / g_hidden
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight = lin.weight * g_hidden[None, :]
        layer.post_attention_layernorm.weight = layer.post_attention_layernorm.weight / g_hidden
        if hasattr(mlp, "switch_mlp"):  # a sparse MoE block: weights (experts, out, in)
            mlp.gate.weight = mlp.gate.weight * g_hidden[None, :]
            experts = mlp.switch_mlp
            for lin in (experts.gate_proj, experts.up_proj):
                lin.weight = lin.weight * g_hidden[None, None, :]
            n_experts, inter = experts.up_proj.weight.shape[:2]
            g_inter = mx.stack([gains(inter) for _ in range(n_experts)])
            experts.down_proj.weight = experts.down_proj.weight * g_inter[:, None, :]
            experts.up_proj.weight = experts.up_proj.weight / g_inter[:, :, None]
        else:
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight = lin.weight * g_hidden[None, :]
            g_inter = gains(mlp.up_proj.weight.shape[0])
            mlp.down_proj.weight = mlp.down_proj.weight * g_inter[None, :]
            mlp.up_proj.weight = mlp.up_proj.weight / g_inter[:, None]
        # One dim of each kv head: its v_proj row, and the o_proj column of every
        # query head that reads it.
        g_v, g_o = np.ones(nkv * hd, np.float32), np.ones(nh * hd, np.float32)
        per_kv = nh // nkv
        for kv in range(nkv):
            d = int(rng.integers(hd))
            g_v[kv * hd + d] = 1.0 / gain
            for h in range(kv * per_kv, (kv + 1) * per_kv):
                g_o[h * hd + d] = gain
        attn.v_proj.weight = attn.v_proj.weight * mx.array(g_v)[:, None]
        attn.o_proj.weight = attn.o_proj.weight * mx.array(g_o)[None, :]
    mx.eval(model.parameters())
    return model


def _pretrain(hidden_size, num_layers, intermediate_size, seed, iters, batch_size, lr, task="demo",
              arch="qwen3", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=None, dtype="float16"):
    """(model, config, raw tokenizer): the base pretrained on the task's soft-label data, rounded to
    `dtype` (held in float32), before any outlier gain. Trained in float32 (which MLX's CPU GatherMM,
    a MoE's expert matmul, needs anyway)."""
    if arch not in ARCHS:
        raise QtoolsError(f"arch {arch!r} is not supported: use one of {', '.join(ARCHS)}")
    tok_raw = build_tokenizer(task=task)
    with tempfile.TemporaryDirectory() as tmp:
        # Write the tokenizer once so the HF wrapper (chat template) can load it.
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        from .tokenizer import save_tokenizer
        save_tokenizer(tok_raw, tmp)
        tok = load_tokenizer(Path(tmp))
    moe = {} if arch == "qwen3" else dict(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                                          moe_intermediate_size=moe_intermediate_size)
    config = ARCHS[arch](hidden_size, num_layers, tok_raw.get_vocab_size(), tok_raw.token_to_id("<|im_end|>"),
                         intermediate_size=intermediate_size, dtype=dtype, **moe)
    mx.random.seed(seed)
    model = build_model(config)
    model.set_dtype(mx.float32)
    examples = encode_examples(tok, data.base_examples(seed, task=task))
    _train(model, examples, iters, batch_size, lr, seed, warmup=max(1, iters // 20))
    # Round to the stored dtype first, so the outlier gain multiplies the weights
    # the model will hold.
    model.set_dtype(getattr(mx, dtype))
    model.set_dtype(mx.float32)
    return model, config, tok_raw


def train_base(out_dir, hidden_size, num_layers, intermediate_size, seed, iters, batch_size, lr,
               outlier_gain=1.0, task="demo", arch="qwen3", num_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=None, layout="mlx"):
    """Pretrain the base on the task's soft-label data, add the outlier channels, save it in
    `layout` (float16 for mlx, bfloat16 for hub)."""
    dtype = LAYOUT_DTYPE[layout]
    model, config, tok_raw = _pretrain(hidden_size, num_layers, intermediate_size, seed, iters, batch_size, lr,
                                       task, arch, num_experts, num_experts_per_tok, moe_intermediate_size, dtype)
    add_outlier_channels(model, config, outlier_gain, seed)
    save_model_dir(model, config, tok_raw, out_dir, dtype=dtype, layout=layout)
    return out_dir


def pretrain_base(out_dir, hidden_size, num_layers, intermediate_size, seed, iters, batch_size, lr, task="demo",
                  arch="qwen3", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=None, layout="mlx",
                  **_):
    """train_base without the outlier gain: the expensive part, shared by bases that differ
    only in gain (with_outlier_gain makes each; the gain does not change the function)."""
    dtype = LAYOUT_DTYPE[layout]
    model, config, tok_raw = _pretrain(hidden_size, num_layers, intermediate_size, seed, iters, batch_size, lr,
                                       task, arch, num_experts, num_experts_per_tok, moe_intermediate_size, dtype)
    save_model_dir(model, config, tok_raw, out_dir, dtype=dtype, layout=layout)
    return out_dir


def with_outlier_gain(pretrained_dir, out_dir, outlier_gain, seed, task="demo"):
    """The base train_base(..., outlier_gain) saves, from pretrain_base's output (same seed), in
    the same layout and dtype: bit-identical, since pretrain_base stores exactly the values the
    gain multiplies."""
    from mlx_lm.utils import load_model

    pretrained_dir = Path(pretrained_dir)
    config = json.loads((pretrained_dir / "config.json").read_text())
    model, _ = load_model(pretrained_dir)  # mlx-lm's sanitize() stacks a Hub layout's experts
    model.set_dtype(mx.float32)
    add_outlier_channels(model, config, outlier_gain, seed)
    save_model_dir(model, config, build_tokenizer(task=task), out_dir, dtype=config["torch_dtype"],
                   layout=layout_of(pretrained_dir))
    return out_dir


def finetune_data(seed, task="demo") -> str:
    """What an adapter was trained on, as recorded in its adapter_config.json (the demo's as before)."""
    extra = "" if task == "demo" else f", task={task!r}"
    return f"qtools.demo.data.finetune_examples(seed={seed}, split_seed={data.SPLIT_SEED}{extra})"


def train_adapter(base_dir, out_dir, rank, scale, keys, num_layers, iters, batch_size, lr, seed,
                  save_every=None, task="demo"):
    """LoRA fine-tune with mlx-lm's tuner; writes adapter_config.json + adapters.safetensors."""
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tok = load(str(base_dir))
    model.set_dtype(mx.float32)
    model.freeze()
    lora = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)}
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, lora)
    examples = encode_examples(tok, data.finetune_examples(seed, task=task))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _train(model, examples, iters, batch_size, lr, seed, save_every=save_every,
           save_dir=out_dir if save_every else None)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    cfg = adapter_config(num_layers, rank, scale, keys, model=str(base_dir), iters=iters,
                         batch_size=batch_size, learning_rate=lr, seed=seed,
                         data=finetune_data(seed, task))
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir
