#!/usr/bin/env python3
"""Export a causal language model to mkflow's decoder ONNX contract.

Sources:
  --hf DIR      a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json,
                tokenizer_config.json) of the Llama, Qwen2 or Qwen3 family — e.g. LaSER-Qwen3.
  --gguf FILE   a GGUF file (llama / qwen2 / qwen3 architectures); quantised tensors are
                dequantised, and a tokenizer.json is rebuilt from the GGUF vocabulary and merges.

Writes into --out DIR:
  model.onnx          generation graph: logits of the last position
  latent.onnx         latent-reasoning graph: the soft token of the last position instead
  model.weights       the weights, shared by both graphs (ONNX external data)
  tokenizer.json      Hugging Face tokenizers file
  mkflow-decoder.json shapes, special tokens and chat template the runtime reads
  mkflow-model.json   (with --embedding-name) makes the model an `embed()` model for mkflow

The ONNX contract (both graphs; B batch, S new positions, P cached positions, T = P + S):
  inputs   input_ids        int64 [B, S_ids]    token ids (S_ids may be 0)
           inputs_embeds    float [B, S_emb, H] embeddings appended after the ids (S_emb may be 0)
           attention_mask   int64 [B, T]        1 for real positions, 0 for (left) padding
           position_ids     int64 [B, S]        positions of the new entries
           past.{i}.key / past.{i}.value   [B, KV, P, D] the KV cache (compute dtype)
  outputs  logits           float [B, V]        last position (model.onnx)
           soft_embeds      float [B, H]        softmax(last logits) @ input embedding table, in float32 (latent.onnx)
           last_hidden_state float [B, H]       last position, after the final norm
           present.{i}.key / present.{i}.value [B, KV, T, D]

Needs only pip packages: numpy, onnx, gguf (GGUF sources), tokenizers (GGUF sources).
"""

import argparse
import glob
import json
import os
import struct
import sys

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # pragma: no cover - message for users
    sys.exit("export_decoder.py needs the onnx package: python3 -m pip install onnx numpy gguf tokenizers")

OPSET = 17
WEIGHTS_FILE = "model.weights"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Model description and weights
# ----------------------------------------------------------------------------------------------


class Shapes:
    """The hyper-parameters the graph needs."""

    def __init__(self, **kw):
        self.architecture = kw["architecture"]  # llama | qwen2 | qwen3
        self.hidden = int(kw["hidden"])
        self.layers = int(kw["layers"])
        self.heads = int(kw["heads"])
        self.kv_heads = int(kw["kv_heads"])
        self.head_dim = int(kw["head_dim"])
        self.intermediate = int(kw["intermediate"])
        self.vocab = int(kw["vocab"])
        self.eps = float(kw["eps"])
        self.rope_theta = float(kw["rope_theta"])
        self.max_position = int(kw.get("max_position") or 4096)

    def as_json(self):
        return {
            "architecture": self.architecture,
            "hidden_size": self.hidden,
            "num_layers": self.layers,
            "num_heads": self.heads,
            "num_kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position": self.max_position,
        }


def layer_names(i):
    """The canonical (Hugging Face) tensor names of layer i, without the `model.` prefix."""
    p = f"layers.{i}."
    return {
        "attn_norm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "q_bias": p + "self_attn.q_proj.bias",
        "k_bias": p + "self_attn.k_proj.bias",
        "v_bias": p + "self_attn.v_proj.bias",
        "o": p + "self_attn.o_proj.weight",
        "q_norm": p + "self_attn.q_norm.weight",
        "k_norm": p + "self_attn.k_norm.weight",
        "mlp_norm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path):
    """Reads every tensor of a .safetensors file as float32 (BF16 included, which numpy lacks)."""
    out = {}
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = f.read(end - start)
            dtype = info["dtype"]
            if dtype == "BF16":
                bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                array = bits.view(np.float32)
            elif dtype in SAFETENSORS_DTYPES:
                array = np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[dtype]).astype(np.float32)
            else:
                raise SystemExit(f"{path}: tensor {name} has dtype {dtype}, which the exporter does not read")
            out[name] = array.reshape(info["shape"])
    return out


def load_hf(directory):
    """Shapes, weights (canonical names), tokenizer path and chat settings of a HF checkpoint."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise SystemExit(f"{directory}: no config.json (is this a Hugging Face checkpoint directory?)")
    with open(config_path) as f:
        config = json.load(f)
    arch_names = " ".join(config.get("architectures") or [config.get("model_type", "")]).lower()
    if "qwen3" in arch_names:
        architecture = "qwen3"
    elif "qwen2" in arch_names:
        architecture = "qwen2"
    elif "llama" in arch_names or "smollm" in arch_names:
        architecture = "llama"
    else:
        raise SystemExit(f"{config_path}: architecture {arch_names!r} is not Llama, Qwen2 or Qwen3")
    if "moe" in arch_names or config.get("num_experts"):
        raise SystemExit(f"{config_path}: mixture-of-experts models are not supported")
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise SystemExit(f"{config_path}: rope_scaling {scaling} is not supported (only plain RoPE)")
    heads = config["num_attention_heads"]
    shapes = Shapes(
        architecture=architecture,
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=config.get("rope_theta", 10000.0),
        max_position=config.get("max_position_embeddings"),
    )
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise SystemExit(f"{directory}: no *.safetensors files")
    weights = {}
    for path in files:
        for name, array in read_safetensors(path).items():
            weights[name[len("model.") :] if name.startswith("model.") else name] = array
    if "lm_head.weight" not in weights or config.get("tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # tied: the input embedding table is the output head
    tokenizer = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        raise SystemExit(f"{directory}: no tokenizer.json")
    chat = {"chat_template": None, "bos_token": None, "eos_token": None}
    tok_config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(tok_config_path):
        with open(tok_config_path) as f:
            tok_config = json.load(f)
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        chat["chat_template"] = template
        for key in ("bos_token", "eos_token"):
            value = tok_config.get(key)
            chat[key] = value.get("content") if isinstance(value, dict) else value
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            chat["chat_template"] = f.read()
    generation = {}
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            generation = json.load(f)
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    chat["eos_token_ids"] = sorted(set(eos if isinstance(eos, list) else [eos] if eos is not None else []))
    return shapes, weights, tokenizer, chat


GGUF_TENSORS = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
    "o": "blk.{i}.attn_output.weight",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
}


def unpermute_rope(w, heads):
    """Undoes llama.cpp's interleaving of Q/K rows for Llama-architecture GGUF files."""
    out_dim = w.shape[0]
    return w.reshape(heads, out_dim // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path, out_dir):
    """Shapes, weights, a rebuilt tokenizer.json and chat settings of a GGUF file."""
    try:
        import gguf
    except ImportError:
        raise SystemExit("GGUF sources need the gguf package: python3 -m pip install gguf")
    reader = gguf.GGUFReader(path)

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    architecture = field("general.architecture")
    if architecture not in ("llama", "qwen2", "qwen3"):
        raise SystemExit(f"{path}: architecture {architecture!r} is not llama, qwen2 or qwen3")
    a = architecture
    hidden = field(f"{a}.embedding_length")
    heads = field(f"{a}.attention.head_count")
    tensors = {t.name: t for t in reader.tensors}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    shapes = Shapes(
        architecture=architecture,
        hidden=hidden,
        layers=field(f"{a}.block_count"),
        heads=heads,
        kv_heads=field(f"{a}.attention.head_count_kv", heads),
        head_dim=field(f"{a}.attention.key_length", hidden // heads),
        intermediate=field(f"{a}.feed_forward_length"),
        vocab=vocab,
        eps=field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=field(f"{a}.rope.freq_base", 10000.0),
        max_position=field(f"{a}.context_length"),
    )

    def tensor(name):
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    weights = {"embed_tokens.weight": tensor("token_embd.weight"), "norm.weight": tensor("output_norm.weight")}
    if "output.weight" in tensors:
        weights["lm_head.weight"] = tensor("output.weight")
    for i in range(shapes.layers):
        canonical = layer_names(i)
        for key, pattern in GGUF_TENSORS.items():
            name = pattern.format(i=i)
            if name in tensors:
                array = tensor(name)
                if architecture == "llama" and key == "q":
                    array = unpermute_rope(array, shapes.heads)
                elif architecture == "llama" and key == "k":
                    array = unpermute_rope(array, shapes.kv_heads)
                weights[canonical[key]] = array
    tokenizer = os.path.join(out_dir, "tokenizer.json")
    special = rebuild_tokenizer(reader, field, tokenizer)
    chat = {
        "chat_template": field("tokenizer.chat_template"),
        "bos_token": special.get(field("tokenizer.ggml.bos_token_id")),
        "eos_token": special.get(field("tokenizer.ggml.eos_token_id")),
        "eos_token_ids": [field("tokenizer.ggml.eos_token_id")] if field("tokenizer.ggml.eos_token_id") is not None else [],
    }
    return shapes, weights, tokenizer, chat


# Pre-tokenizer regular expressions of llama.cpp's BPE pre-tokenizer types.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def rebuild_tokenizer(reader, field, out_path):
    """Writes a tokenizer.json equivalent to the GGUF's BPE vocabulary; returns {id: special text}."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise SystemExit(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = field("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2"):
        tokenizer.pre_tokenizer = byte_level
    elif pre in ("llama-bpe", "llama3", "qwen2"):
        pattern = QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise SystemExit(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, llama-bpe, qwen2)")
    tokenizer.decoder = decoders.ByteLevel()
    special = {i: t for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # control, user-defined
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.values()])
    bos_id = field("tokenizer.ggml.bos_token_id")
    if field("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    tokenizer.save(out_path)
    return special


# ----------------------------------------------------------------------------------------------
# The graph
# ----------------------------------------------------------------------------------------------


# Block size of quantised weights (values per scale and zero point along the input dimension).
QUANT_BLOCK = 32
# MatMulNBits' accuracy level 4: activations quantised to int8 per block, integer dot products
# (ONNX Runtime's fast CPU path).
QUANT_ACCURACY_LEVEL = 4
WEIGHT_BITS = {"float32": None, "int8": 8, "int4": 4}


def quantize_blocks(weight, bits, block=QUANT_BLOCK):
    """Asymmetric round-to-nearest quantisation of a [N, K] weight (rows = output channels) in
    blocks of `block` inputs, in ONNX Runtime's MatMulNBits layout.

    Returns (packed [N, blocks, block * bits / 8] uint8, scales [N * blocks] float32,
    zero points uint8 (packed two per byte for 4 bits), dequantised [N, K] float32)."""
    n, k = weight.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), dtype=np.float32)
    padded[:, :k] = weight
    values = padded.reshape(n, blocks, block)
    low = np.minimum(values.min(axis=-1), 0.0)
    high = np.maximum(values.max(axis=-1), 0.0)
    levels = (1 << bits) - 1
    scale = (high - low) / levels
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-low / scale), 0, levels).astype(np.uint8)
    q = np.clip(np.round(values / scale[..., None]) + zero[..., None], 0, levels).astype(np.uint8)
    dequantised = ((q.astype(np.float32) - zero[..., None]) * scale[..., None]).reshape(n, -1)[:, :k]
    if bits == 4:
        packed = q[..., 0::2] | (q[..., 1::2] << 4)
        zeros = np.zeros((n, blocks + blocks % 2), dtype=np.uint8)
        zeros[:, :blocks] = zero
        zero = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    else:
        packed = q
    return packed.astype(np.uint8), scale.astype(np.float32).reshape(-1), zero.reshape(-1), dequantised


class GraphBuilder:
    """Collects nodes and initializers; `compute` is the dtype the layers run in, `bits` the
    width of the linear layers' weights (None: stored in the compute dtype, else quantised to
    8 or 4 bits for MatMulNBits)."""

    def __init__(self, compute, bits=None):
        self.compute = compute  # np.float32 or np.float16
        self.onnx_compute = TensorProto.FLOAT16 if compute == np.float16 else TensorProto.FLOAT
        self.bits = bits
        self.nodes = []
        self.initializers = []
        self.count = 0

    def fresh(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def op(self, op_type, inputs, hint=None, outputs=1, domain=None, **attrs):
        names = [self.fresh(hint or op_type) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, names, name=self.fresh("n_" + op_type), domain=domain, **attrs)
        )
        return names[0] if outputs == 1 else names

    def const(self, array, hint="const"):
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array.astype(self.compute)), name))
        return name

    def scalar(self, value, dtype=None):
        return self.const(np.array(value, dtype=dtype or self.compute), "scalar")

    def ints(self, values):
        return self.const(np.array(values, dtype=np.int64), "ints")

    def to_compute(self, x):
        return x if self.compute == np.float32 else self.op("Cast", [x], to=self.onnx_compute)

    def to_float(self, x):
        return x if self.compute == np.float32 else self.op("Cast", [x], to=TensorProto.FLOAT)

    def rms_norm(self, x, weight, eps):
        """RMSNorm computed in float32 whatever the compute dtype, written as the
        Pow/ReduceMean/Add/Sqrt/Div/Mul chain ONNX Runtime fuses into one SimplifiedLayerNormalization."""
        x32 = self.to_float(x)
        mean_square = self.op("ReduceMean", [self.op("Pow", [x32, self.scalar(2.0, np.float32)])], axes=[-1], keepdims=1)
        normed = self.op("Div", [x32, self.op("Sqrt", [self.op("Add", [mean_square, self.scalar(eps, np.float32)])])])
        return self.op("Mul", [self.to_compute(normed), weight])

    def linear(self, x, name, weight, bias=None):
        """x @ weight.T (+ bias) for a [out, in] weight: a MatMul in the compute dtype, or
        ONNX Runtime's MatMulNBits on block-quantised weights."""
        if self.bits is None:
            y = self.op("MatMul", [x, self.weight(name, weight.T)])
        else:
            out_features, in_features = weight.shape
            packed, scales, zeros, _ = quantize_blocks(weight, self.bits)
            y = self.op(
                "MatMulNBits",
                [
                    x,
                    self.const(packed, name + ".q"),
                    self.const(scales.astype(self.compute), name + ".scales"),
                    self.const(zeros, name + ".zero_points"),
                ],
                domain="com.microsoft",
                K=in_features,
                N=out_features,
                bits=self.bits,
                block_size=QUANT_BLOCK,
                accuracy_level=QUANT_ACCURACY_LEVEL,
            )
        return self.op("Add", [y, bias]) if bias is not None else y


def build_graph(shapes, weights, compute, bits=None):
    """Builds both graphs' nodes; returns (builder, inputs, outputs by name)."""
    g = GraphBuilder(compute, bits)
    s = shapes
    H, NH, KV, D = s.hidden, s.heads, s.kv_heads, s.head_dim
    rep = NH // KV
    if NH % KV:
        raise SystemExit(f"{NH} attention heads are not a multiple of {KV} KV heads")

    embed = g.weight("embed_tokens.weight", weights["embed_tokens.weight"])
    if weights["embed_tokens.weight"].shape != (s.vocab, H):
        raise SystemExit(f"embed_tokens.weight has shape {weights['embed_tokens.weight'].shape}, expected {(s.vocab, H)}")

    def tensor(name):
        if name not in weights:
            raise SystemExit(f"missing tensor {name}")
        return weights[name]

    def w(name):
        return g.weight(name, tensor(name))

    def linear(x, name, bias=None):
        return g.linear(x, name, tensor(name), bias)

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "ids"]),
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "embeds", H]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
    ]
    for i in range(s.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kind}", g.onnx_compute, ["batch", KV, "past", D]))

    # Embeddings of the ids, followed by the given embeddings.
    x = g.op("Concat", [g.op("Gather", [embed, "input_ids"]), g.to_compute("inputs_embeds")], axis=1, hint="x")

    # RoPE tables for the new positions: [B, 1, S, D].
    inv_freq = 1.0 / (s.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT), g.ints([-1])])
    freqs = g.op("Mul", [pos, g.const(inv_freq.astype(np.float32), "inv_freq")])
    angles = g.op("Unsqueeze", [g.op("Concat", [freqs, freqs], axis=-1), g.ints([1])])
    cos = g.to_compute(g.op("Cos", [angles]))
    sin = g.to_compute(g.op("Sin", [angles]))

    def rope(t):
        first, second = g.op("Split", [t, g.ints([D // 2, D // 2])], axis=-1, outputs=2)
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
        return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rotated, sin])])

    # Mask [B, 1, 1, S, T]: key j is visible to new position i when j <= P + i and not padding.
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.ints([1])])
    new = g.op("Gather", [g.op("Shape", ["position_ids"]), g.ints([1])])
    one = g.ints([1])
    q_pos = g.op("Range", [g.op("Squeeze", [g.op("Sub", [total, new])]), g.op("Squeeze", [total]), g.op("Squeeze", [one])])
    k_pos = g.op("Range", [g.op("Squeeze", [g.ints([0])]), g.op("Squeeze", [total]), g.op("Squeeze", [one])])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.ints([0])]), g.op("Unsqueeze", [q_pos, g.ints([1])])])
    padding = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), g.ints([1, 2, 3])])
    mask = g.op("And", [causal, padding], hint="mask")
    masked = g.scalar(-65504.0 if compute == np.float16 else -1e30)
    scale = g.scalar(1.0 / np.sqrt(D))

    outputs = {}
    for i in range(s.layers):
        n = layer_names(i)
        h = g.rms_norm(x, w(n["attn_norm"]), s.eps)
        bias = lambda key: w(n[key]) if n[key] in weights else None  # noqa: E731
        q = g.op("Reshape", [linear(h, n["q"], bias("q_bias")), g.ints([0, 0, NH, D])])
        k = g.op("Reshape", [linear(h, n["k"], bias("k_bias")), g.ints([0, 0, KV, D])])
        v = g.op("Reshape", [linear(h, n["v"], bias("v_bias")), g.ints([0, 0, KV, D])])
        if s.architecture == "qwen3":
            q = g.rms_norm(q, w(n["q_norm"]), s.eps)
            k = g.rms_norm(k, w(n["k_norm"]), s.eps)
        q = rope(g.op("Transpose", [q], perm=[0, 2, 1, 3]))  # [B, NH, S, D]
        k = rope(g.op("Transpose", [k], perm=[0, 2, 1, 3]))  # [B, KV, S, D]
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        k_all = g.op("Concat", [f"past.{i}.key", k], axis=2)
        v_all = g.op("Concat", [f"past.{i}.value", v], axis=2)
        g.nodes.append(helper.make_node("Identity", [k_all], [f"present.{i}.key"]))
        g.nodes.append(helper.make_node("Identity", [v_all], [f"present.{i}.value"]))
        # Grouped-query attention by broadcasting: q [B, KV, rep, S, D] against k [B, KV, 1, T, D].
        qg = g.op("Reshape", [q, g.ints([0, KV, rep, -1, D])])
        kg = g.op("Unsqueeze", [k_all, g.ints([2])])
        vg = g.op("Unsqueeze", [v_all, g.ints([2])])
        scores = g.op("Mul", [g.op("MatMul", [qg, g.op("Transpose", [kg], perm=[0, 1, 2, 4, 3])]), scale])
        scores = g.op("Where", [mask, scores, masked])
        probs = g.to_compute(g.op("Softmax", [g.to_float(scores)], axis=-1))
        attended = g.op("Reshape", [g.op("MatMul", [probs, vg]), g.ints([0, NH, -1, D])])
        attended = g.op("Reshape", [g.op("Transpose", [attended], perm=[0, 2, 1, 3]), g.ints([0, 0, NH * D])])
        x = g.op("Add", [x, linear(attended, n["o"])])
        h = g.rms_norm(x, w(n["mlp_norm"]), s.eps)
        gate = linear(h, n["gate"])
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        x = g.op("Add", [x, linear(g.op("Mul", [silu, linear(h, n["up"])]), n["down"])])

    x = g.rms_norm(x, w("norm.weight"), s.eps)
    last = g.op("Gather", [x, g.const(np.array(-1, dtype=np.int64), "last")], axis=1)  # [B, H]
    g.nodes.append(helper.make_node("Identity", [g.to_float(last)], ["last_hidden_state"]))
    if g.bits is None:
        head = w("lm_head.weight") if "lm_head.weight" in weights else embed
        logits = g.to_float(g.op("Gemm", [last, head], transB=1))
    else:
        # The vocabulary projection is the largest matrix of a small model: quantised as well.
        head = "lm_head.weight" if "lm_head.weight" in weights else "embed_tokens.weight"
        logits = g.to_float(linear(last, head))
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    # The soft token in float32 whatever the compute dtype: in float16 the probabilities of most
    # of the vocabulary underflow, and with them the mass of the distribution's tail.
    soft = g.op("MatMul", [g.op("Softmax", [logits], axis=-1), g.to_float(embed)])
    g.nodes.append(helper.make_node("Identity", [soft], ["soft_embeds"]))

    def info(name, dtype, dims):
        outputs[name] = helper.make_tensor_value_info(name, dtype, dims)

    info("logits", TensorProto.FLOAT, ["batch", s.vocab])
    info("soft_embeds", TensorProto.FLOAT, ["batch", H])
    info("last_hidden_state", TensorProto.FLOAT, ["batch", H])
    for i in range(s.layers):
        for kind in ("key", "value"):
            info(f"present.{i}.{kind}", g.onnx_compute, ["batch", KV, "total", D])
    return g, inputs, outputs


def pruned_model(g, inputs, outputs, wanted, name):
    """A model with only the nodes and initializers `wanted` outputs need."""
    needed = set(wanted)
    nodes = []
    for node in reversed(g.nodes):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(node.input)
    nodes.reverse()
    initializers = [t for t in g.initializers if t.name in needed]
    graph = helper.make_graph(nodes, name, inputs, [outputs[o] for o in wanted], initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    if any(node.domain == "com.microsoft" for node in nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="mkflow-export")
    model.ir_version = 8
    return model


def export(shapes, weights, tokenizer_path, chat, out_dir, dtype, source, weight_format="float32"):
    compute = np.float16 if dtype == "float16" else np.float32
    g, inputs, outputs = build_graph(shapes, weights, compute, WEIGHT_BITS[weight_format])
    presents = [f"present.{i}.{k}" for i in range(shapes.layers) for k in ("key", "value")]
    generation = pruned_model(g, inputs, outputs, ["logits", "last_hidden_state"] + presents, "mkflow_decoder")
    latent = pruned_model(g, inputs, outputs, ["soft_embeds", "last_hidden_state"] + presents, "mkflow_decoder_latent")
    weights_path = os.path.join(out_dir, WEIGHTS_FILE)
    if os.path.exists(weights_path):
        os.remove(weights_path)
    # The generation graph holds every weight; saving it writes them once and turns its
    # initializers into references into model.weights, which the latent graph then shares.
    onnx.save_model(
        generation,
        os.path.join(out_dir, "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS_FILE,
        size_threshold=1024,
    )
    by_name = {t.name: t for t in generation.graph.initializer}
    for t in latent.graph.initializer:
        if t.name in by_name:
            t.CopyFrom(by_name[t.name])
    onnx.save_model(latent, os.path.join(out_dir, "latent.onnx"))
    target_tokenizer = os.path.join(out_dir, "tokenizer.json")
    if os.path.abspath(tokenizer_path) != os.path.abspath(target_tokenizer):
        with open(tokenizer_path, "rb") as src, open(target_tokenizer, "wb") as dst:
            dst.write(src.read())
    description = {
        "format": FORMAT_VERSION,
        "source": source,
        **shapes.as_json(),
        "dtype": dtype,
        "weights": weight_format,
        "chat_template": chat.get("chat_template"),
        "bos_token": chat.get("bos_token"),
        "eos_token": chat.get("eos_token"),
        "eos_token_ids": [int(i) for i in chat.get("eos_token_ids") or []],
    }
    with open(os.path.join(out_dir, "mkflow-decoder.json"), "w") as f:
        json.dump(description, f, indent=2)
        f.write("\n")
    return description


def write_embedding_spec(out_dir, description, dimensions, fields):
    """Writes mkflow-model.json, which makes the export an `embed()` model: the latent graph,
    last-token pooling, L2-normalised, and `fields` (name, max_tokens, latent_steps, device,
    query_template, document_template, instruction, chat_template)."""
    if fields.get("chat_template") and not description.get("chat_template"):
        raise SystemExit("chat_template: the model has no chat template")
    spec = {
        "model_path": "latent.onnx",
        "tokenizer_path": "tokenizer.json",
        "dimensions": dimensions,
        "pooling": "last_token",
        "normalize": True,
        "max_tokens": 512,
        "latent_steps": 3,
        "device": "cpu",
    }
    spec.update({k: v for k, v in fields.items() if v is not None})
    with open(os.path.join(out_dir, "mkflow-model.json"), "w") as f:
        json.dump(spec, f, indent=2)
        f.write("\n")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Export a Llama/Qwen2/Qwen3 causal LM (Hugging Face safetensors or GGUF) to mkflow's decoder ONNX contract.",
        epilog="Example: export_decoder.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out ~/.cache/mkflow/llms/smollm2-135m",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="Hugging Face checkpoint directory")
    source.add_argument("--gguf", metavar="FILE", help="GGUF file (dequantised on export)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="compute dtype of the layers (float16 for GPUs)")
    parser.add_argument(
        "--weights",
        choices=list(WEIGHT_BITS),
        default="float32",
        help="linear-layer weights: float32 (the compute dtype), or int8 / int4 blocks of 32 run by ONNX Runtime's "
        "MatMulNBits (about 4x / 7x smaller and faster on CPUs; int8 keeps a Q4..Q8 GGUF's precision)",
    )
    parser.add_argument("--embedding-name", metavar="NAME", help="also write mkflow-model.json so embed() can use the model under NAME")
    parser.add_argument(
        "--latent-steps",
        type=int,
        default=3,
        help="LaSER's K for --embedding-name: hidden states pooled, the prompt's last one and K-1 soft tokens' "
        "(1 = plain last-token pooling; 3, LaSER's default)",
    )
    parser.add_argument(
        "--query-template",
        metavar="TEXT",
        help="for --embedding-name: how a query is written before it is embedded; {text} is the query, "
        "{instruction} the --instruction (LaSER: 'Instruct: {instruction}\\nQuery: {text}')",
    )
    parser.add_argument("--document-template", metavar="TEXT", help="for --embedding-name: how a document is written ({text})")
    parser.add_argument("--instruction", metavar="TEXT", help="for --embedding-name: the task instruction of the templates")
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="for --embedding-name: wrap queries and documents in the model's chat template followed by an empty "
        "think block (LaSER's add_chat_template)",
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="token limit for --embedding-name")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where --embedding-name runs (cuda falls back to cpu)")
    args = parser.parse_args(argv)
    if args.latent_steps < 1:
        parser.error("--latent-steps is K, the hidden states pooled: at least 1 (1 = plain last-token pooling)")

    os.makedirs(args.out, exist_ok=True)
    if args.hf:
        shapes, weights, tokenizer, chat = load_hf(args.hf)
        source_name = os.path.abspath(args.hf)
    else:
        shapes, weights, tokenizer, chat = load_gguf(args.gguf, args.out)
        source_name = os.path.abspath(args.gguf)
    description = export(shapes, weights, tokenizer, chat, args.out, args.dtype, source_name, args.weights)
    if args.embedding_name:
        fields = {
            "name": args.embedding_name,
            "max_tokens": args.max_tokens,
            "latent_steps": args.latent_steps,
            "device": args.device,
        }
        for field in ("query_template", "document_template", "instruction"):
            value = getattr(args, field)
            if value is not None:
                # A shell gives "\\n" as two characters; a template means a line break.
                fields[field] = value.replace("\\n", "\n")
        if args.chat_template:
            if not description.get("chat_template"):
                parser.error("--chat-template: the model has no chat template")
            fields["chat_template"] = True
        write_embedding_spec(args.out, description, shapes.hidden, fields)
    print(
        f"exported {description['architecture']} ({shapes.layers} layers, hidden {shapes.hidden}, "
        f"vocab {shapes.vocab}, {args.dtype}, {args.weights} weights) to {args.out}"
    )


if __name__ == "__main__":
    main()
