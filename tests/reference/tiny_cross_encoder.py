#!/usr/bin/env python3
"""A tiny randomly initialised BERT cross-encoder as ONNX, and its scores from numpy.

Writes OUT_DIR/model.onnx: a BERT sequence classifier (embeddings of words, positions and
token types with LayerNorm; encoder layers of multi-head self-attention and a GELU feed-forward
block, each with a residual connection and LayerNorm; the [CLS] vector through a tanh pooler and
a one-logit classifier), built node by node with onnx.helper. Then reads PAIRS_JSON (a list of
[query, text]), tokenises each pair alone with TOKENIZER (truncated longest first to
MAX_TOKENS, no padding), runs the same network in numpy float64 and prints the scores as JSON.

Usage: tiny_cross_encoder.py OUT_DIR TOKENIZER MAX_TOKENS PAIRS_JSON [--seed N] [--two-classes]
"""

import argparse
import json
import math
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

HIDDEN = 32
HEADS = 2
LAYERS = 2
INTERMEDIATE = 64
MAX_POSITIONS = 512
EPS = 1e-12


def weights(vocab, classes, seed):
    rng = np.random.RandomState(seed)
    w = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)
    params = {
        "word": w(vocab, HIDDEN),
        "position": w(MAX_POSITIONS, HIDDEN),
        "token_type": w(2, HIDDEN),
        "emb_gamma": (1 + w(HIDDEN)).astype(np.float32),
        "emb_beta": w(HIDDEN),
        "pool_w": w(HIDDEN, HIDDEN),
        "pool_b": w(HIDDEN),
        "cls_w": w(HIDDEN, classes),
        "cls_b": w(classes),
    }
    for l in range(LAYERS):
        for name, shape in [
            ("q_w", (HIDDEN, HIDDEN)), ("q_b", (HIDDEN,)),
            ("k_w", (HIDDEN, HIDDEN)), ("k_b", (HIDDEN,)),
            ("v_w", (HIDDEN, HIDDEN)), ("v_b", (HIDDEN,)),
            ("o_w", (HIDDEN, HIDDEN)), ("o_b", (HIDDEN,)),
            ("ln1_beta", (HIDDEN,)),
            ("ff1_w", (HIDDEN, INTERMEDIATE)), ("ff1_b", (INTERMEDIATE,)),
            ("ff2_w", (INTERMEDIATE, HIDDEN)), ("ff2_b", (HIDDEN,)),
            ("ln2_beta", (HIDDEN,)),
        ]:
            params[f"l{l}_{name}"] = w(*shape)
        params[f"l{l}_ln1_gamma"] = (1 + w(HIDDEN)).astype(np.float32)
        params[f"l{l}_ln2_gamma"] = (1 + w(HIDDEN)).astype(np.float32)
    return params


def build_onnx(params, path):
    nodes, inits = [], [numpy_helper.from_array(v, k) for k, v in params.items()]
    const = lambda name, value: inits.append(numpy_helper.from_array(np.array(value), name))
    const("zero", np.int64(0))
    const("one", np.int64(1))
    const("one_f", np.float32(1.0))
    const("neg", np.float32(-1e4))
    const("scale", np.float32(1 / math.sqrt(HIDDEN // HEADS)))
    const("sqrt2", np.float32(math.sqrt(2.0)))
    const("half", np.float32(0.5))
    const("split_heads", np.array([0, 0, HEADS, HIDDEN // HEADS], dtype=np.int64))
    const("merge_heads", np.array([0, 0, HIDDEN], dtype=np.int64))
    const("mask_axes", np.array([1, 2], dtype=np.int64))
    n = lambda op, ins, outs, **kw: nodes.append(helper.make_node(op, ins, outs, **kw))

    n("Gather", ["word", "input_ids"], ["e_word"])
    n("Shape", ["input_ids"], ["ids_shape"])
    n("Gather", ["ids_shape", "one"], ["width"], axis=0)
    n("Range", ["zero", "width", "one"], ["positions"])
    n("Gather", ["position", "positions"], ["e_pos"])
    n("Gather", ["token_type", "token_type_ids"], ["e_type"])
    n("Add", ["e_word", "e_pos"], ["e_sum0"])
    n("Add", ["e_sum0", "e_type"], ["e_sum"])
    n("LayerNormalization", ["e_sum", "emb_gamma", "emb_beta"], ["h0"], axis=-1, epsilon=EPS)
    # Padding keys get -10000 before the softmax: [B, 1, 1, T].
    n("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
    n("Sub", ["one_f", "mask_f"], ["mask_inv"])
    n("Mul", ["mask_inv", "neg"], ["mask_bias0"])
    n("Unsqueeze", ["mask_bias0", "mask_axes"], ["mask_bias"])
    h = "h0"
    for l in range(LAYERS):
        p = f"l{l}_"
        for x in "qkv":
            n("MatMul", [h, p + f"{x}_w"], [p + f"{x}_mm"])
            n("Add", [p + f"{x}_mm", p + f"{x}_b"], [p + f"{x}_lin"])
            n("Reshape", [p + f"{x}_lin", "split_heads"], [p + f"{x}_split"])
            perm = [0, 2, 3, 1] if x == "k" else [0, 2, 1, 3]
            n("Transpose", [p + f"{x}_split"], [p + f"{x}_heads"], perm=perm)
        n("MatMul", [p + "q_heads", p + "k_heads"], [p + "scores0"])
        n("Mul", [p + "scores0", "scale"], [p + "scores1"])
        n("Add", [p + "scores1", "mask_bias"], [p + "scores"])
        n("Softmax", [p + "scores"], [p + "probs"], axis=-1)
        n("MatMul", [p + "probs", p + "v_heads"], [p + "ctx0"])
        n("Transpose", [p + "ctx0"], [p + "ctx1"], perm=[0, 2, 1, 3])
        n("Reshape", [p + "ctx1", "merge_heads"], [p + "ctx"])
        n("MatMul", [p + "ctx", p + "o_w"], [p + "o_mm"])
        n("Add", [p + "o_mm", p + "o_b"], [p + "o_lin"])
        n("Add", [p + "o_lin", h], [p + "res1"])
        n("LayerNormalization", [p + "res1", p + "ln1_gamma", p + "ln1_beta"], [p + "a"], axis=-1, epsilon=EPS)
        n("MatMul", [p + "a", p + "ff1_w"], [p + "f_mm"])
        n("Add", [p + "f_mm", p + "ff1_b"], [p + "f_lin"])
        # GELU (erf form): x/2 · (1 + erf(x/√2)).
        n("Div", [p + "f_lin", "sqrt2"], [p + "g0"])
        n("Erf", [p + "g0"], [p + "g1"])
        n("Add", [p + "g1", "one_f"], [p + "g2"])
        n("Mul", [p + "f_lin", p + "g2"], [p + "g3"])
        n("Mul", [p + "g3", "half"], [p + "gelu"])
        n("MatMul", [p + "gelu", p + "ff2_w"], [p + "f2_mm"])
        n("Add", [p + "f2_mm", p + "ff2_b"], [p + "f2_lin"])
        n("Add", [p + "f2_lin", p + "a"], [p + "res2"])
        n("LayerNormalization", [p + "res2", p + "ln2_gamma", p + "ln2_beta"], [p + "out"], axis=-1, epsilon=EPS)
        h = p + "out"
    n("Gather", [h, "zero"], ["cls"], axis=1)
    n("MatMul", ["cls", "pool_w"], ["pool_mm"])
    n("Add", ["pool_mm", "pool_b"], ["pool_lin"])
    n("Tanh", ["pool_lin"], ["pooled"])
    n("MatMul", ["pooled", "cls_w"], ["cls_mm"])
    n("Add", ["cls_mm", "cls_b"], ["logits"])
    ints = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
    graph = helper.make_graph(
        nodes,
        "tiny_cross_encoder",
        [ints("input_ids"), ints("attention_mask"), ints("token_type_ids")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", params["cls_b"].shape[0]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def reference(params, ids, types):
    """The network in float64 on one unpadded sequence; returns its logits."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    ids, types = np.array(ids), np.array(types)
    h = p["word"][ids] + p["position"][: len(ids)] + p["token_type"][types]
    h = layer_norm(h, p["emb_gamma"], p["emb_beta"])
    dh = HIDDEN // HEADS
    for l in range(LAYERS):
        q = lambda name: p[f"l{l}_{name}"]
        heads = lambda x: (h @ q(f"{x}_w") + q(f"{x}_b")).reshape(len(ids), HEADS, dh).transpose(1, 0, 2)
        qh, kh, vh = heads("q"), heads("k"), heads("v")
        scores = qh @ kh.transpose(0, 2, 1) / math.sqrt(dh)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ vh).transpose(1, 0, 2).reshape(len(ids), HIDDEN)
        a = layer_norm(ctx @ q("o_w") + q("o_b") + h, q("ln1_gamma"), q("ln1_beta"))
        f = a @ q("ff1_w") + q("ff1_b")
        f = 0.5 * f * (1 + np.vectorize(math.erf)(f / math.sqrt(2)))
        h = layer_norm(f @ q("ff2_w") + q("ff2_b") + a, q("ln2_gamma"), q("ln2_beta"))
    pooled = np.tanh(h[0] @ p["pool_w"] + p["pool_b"])
    return pooled @ p["cls_w"] + p["cls_b"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("tokenizer")
    parser.add_argument("max_tokens", type=int)
    parser.add_argument("pairs")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--two-classes", action="store_true")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(args.tokenizer)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=args.max_tokens)
    classes = 2 if args.two_classes else 1
    params = weights(tokenizer.get_vocab_size(), classes, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    build_onnx(params, os.path.join(args.out_dir, "model.onnx"))
    scores = []
    for query, text in json.load(open(args.pairs)):
        encoding = tokenizer.encode(query, text)
        logits = reference(params, encoding.ids, encoding.type_ids)
        scores.append(float(logits[0] if classes == 1 else logits[1] - logits[0]))
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
