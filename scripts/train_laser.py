#!/usr/bin/env python3
"""Train a LaSER latent-reasoning embedding model on a knowledge index's own questions.

LaSER (Jin et al., 2026) teaches a decoder to "think" in soft tokens before it pools: the student
encodes a query as the prompt's last hidden state h_0 plus K-1 soft-token states (mean, L2), and
learns from a teacher — the same network reading the query followed by an explicit reasoning
text — through self-distillation. `mkflow train laser` writes the training set (written with the
model's prompts) and runs this script; it can also be run by hand.

Losses, as the official trainer computes them (`ignorejjj/LaSER`, `laser.py`), with τ the
temperature and passages = each query's positive and hard negatives, every other query's too:
  q_d      InfoNCE of the latent (student) query against the passages, τ = 0.02
  teacher  InfoNCE of the explicit view (query + reasoning + EOS, last state), τ = 0.02
  kl       KL(teacher scores ‖ student scores) at τ, the teacher fixed (output alignment)
  latent   KL of each of the K student states' passage scores against the teacher's state at
           the end of the matching reasoning segment (trajectory alignment), τ = 0.05
  loss = q_d + 10·kl + teacher + 0.1·latent
Passages are encoded like queries (K steps). Training is LoRA (rank 64, alpha 32 as in the
paper) on every attention and MLP projection, AdamW with linear warm-up and decay, gradients
clipped at 1; the adapters are merged into the weights and the result is exported with
`export_decoder.py` (same directory) as an `embed()` model.

Inputs (--data DIR):
  documents.jsonl  {"text": written document}                       (line n is document n)
  examples.jsonl   {"query": written query, "positive": n, "negatives": [n, ...],
                    "reasoning": ["segment", ...], "held_out": bool}
  probe.jsonl      {"written": written text[, "text": as given, "role": query|document]}: encoded
                   by the trained encoder into the report, so the caller can check that the
                   exported ONNX reproduces it
  spec.json        the mkflow-model.json fields of the result (name, templates, latent_steps, ...)
Outputs: the exported model in --out, and --report (JSON). Progress goes to stdout as JSON lines.

Runs on JAX (pip install jax jaxlib; on a GPU, jax[cuda12]), on the first device JAX offers.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_decoder as exporter  # noqa: E402

try:
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover - message for users
    sys.exit("train_laser.py needs JAX: python3 -m pip install jax jaxlib (jax[cuda12] on a GPU)")
from tokenizers import Tokenizer  # noqa: E402

# The projections LoRA adapts (the paper: q, k, v, o, gate, up, down).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MASKED = -1e30


def emit(event, **fields):
    """One progress line for the caller."""
    print(json.dumps({"event": event, **fields}), flush=True)


# ----------------------------------------------------------------------------------------------
# The decoder in JAX: the exporter's weights (canonical names), LoRA on the projections
# ----------------------------------------------------------------------------------------------


class Decoder:
    """A Llama / Qwen2 / Qwen3 forward pass over the exporter's canonical weights.

    The frozen weights (`base`) are an argument of every method, not a closure: jitted functions
    then take them as inputs instead of baking hundreds of megabytes of constants into the
    compiled program."""

    def __init__(self, shapes, lora_scale):
        self.s = shapes
        self.scale = lora_scale
        d = shapes.head_dim
        self.inv_freq = np.asarray(1.0 / (shapes.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)), dtype=np.float32)

    @staticmethod
    def head(base):
        return base.get("lm_head.weight", base["embed_tokens.weight"])

    def rms_norm(self, x, weight):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.s.eps) * weight

    def linear(self, base, lora, x, layer, key):
        names = exporter.layer_names(layer)
        name = names[key]
        y = x @ base[name].T
        bias = names.get(key + "_bias")
        if bias in base:
            y = y + base[bias]
        if name in lora:
            y = y + ((x @ lora[name]["a"].T) @ lora[name]["b"].T) * self.scale
        return y

    def rope(self, t, positions):
        # t [B, heads, S, D]; positions [B, S]
        angles = positions[:, None, :, None].astype(jnp.float32) * self.inv_freq
        angles = jnp.concatenate([angles, angles], axis=-1)
        half = t.shape[-1] // 2
        rotated = jnp.concatenate([-t[..., half:], t[..., :half]], axis=-1)
        return t * jnp.cos(angles) + rotated * jnp.sin(angles)

    def layer(self, base, lora, i, x, positions, visible, past):
        s, n = self.s, exporter.layer_names(i)
        b, new = x.shape[0], x.shape[1]
        nh, kv, d = s.heads, s.kv_heads, s.head_dim
        h = self.rms_norm(x, base[n["attn_norm"]])
        q = self.linear(base, lora, h, i, "q").reshape(b, new, nh, d)
        k = self.linear(base, lora, h, i, "k").reshape(b, new, kv, d)
        v = self.linear(base, lora, h, i, "v").reshape(b, new, kv, d)
        if s.architecture == "qwen3":
            q = self.rms_norm(q, base[n["q_norm"]])
            k = self.rms_norm(k, base[n["k_norm"]])
        q = self.rope(q.transpose(0, 2, 1, 3), positions)
        k = self.rope(k.transpose(0, 2, 1, 3), positions)
        v = v.transpose(0, 2, 1, 3)
        if past is not None:
            k = jnp.concatenate([past[0], k], axis=2)
            v = jnp.concatenate([past[1], v], axis=2)
        qg = q.reshape(b, kv, nh // kv, new, d)
        scores = jnp.einsum("bgrsd,bgtd->bgrst", qg, k) / math.sqrt(d)
        scores = jnp.where(visible[:, None, None], scores, MASKED)
        attended = jnp.einsum("bgrst,bgtd->bgrsd", jax.nn.softmax(scores, axis=-1), v)
        attended = attended.reshape(b, nh, new, d).transpose(0, 2, 1, 3).reshape(b, new, nh * d)
        x = x + self.linear(base, lora, attended, i, "o")
        h = self.rms_norm(x, base[n["mlp_norm"]])
        gate = self.linear(base, lora, h, i, "gate")
        x = x + self.linear(base, lora, jax.nn.silu(gate) * self.linear(base, lora, h, i, "up"), i, "down")
        return x, (k, v)

    def forward(self, base, lora, x, positions, mask, past=None):
        """Final-norm states [B, S, H] of new inputs x [B, S, H] at `positions`, attending to the
        cached keys `past` and themselves; mask [B, T] marks real (non-padding) positions."""
        new, total = x.shape[1], mask.shape[1]
        q_pos = jnp.arange(total - new, total)
        causal = jnp.arange(total)[None, :] <= q_pos[:, None]  # [S, T]
        visible = causal[None] & (mask[:, None, :] > 0)  # [B, S, T]
        present = []
        for i in range(self.s.layers):
            # Rematerialised in the backward pass: only each layer's input is kept.
            step = jax.checkpoint(lambda ba, lo, xx, pp, i=i: self.layer(ba, lo, i, xx, positions, visible, pp))
            x, kv = step(base, lora, x, None if past is None else past[i])
            present.append(kv)
        return self.rms_norm(x, base["norm.weight"]), present

    def latent(self, base, lora, ids, mask, steps):
        """LaSER's student encoding of left-padded ids: (pooled vector [B, H], states [B, K, H])."""
        embedding = base["embed_tokens.weight"]
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        hidden, cache = self.forward(base, lora, embedding[ids], positions, mask)
        last, states = hidden[:, -1], [hidden[:, -1]]
        position = positions[:, -1:]
        for _ in range(steps - 1):
            # The soft token: the next-token distribution's expected input embedding (float32).
            soft = jax.nn.softmax(last @ self.head(base).T, axis=-1) @ embedding
            mask = jnp.concatenate([mask, jnp.ones((mask.shape[0], 1), mask.dtype)], axis=1)
            position = position + 1
            hidden, cache = self.forward(base, lora, soft[:, None], position, mask, cache)
            last = hidden[:, -1]
            states.append(last)
        states = jnp.stack(states, axis=1)
        return normalize(jnp.mean(states, axis=1)), states

    def explicit(self, base, lora, ids, mask, segment_ends):
        """The teacher: the last state of query + reasoning + EOS, and the states at the ends of
        the reasoning segments picked for the K steps ([B, K] indices)."""
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        hidden, _ = self.forward(base, lora, base["embed_tokens.weight"][ids], positions, mask)
        aligned = jnp.take_along_axis(hidden, segment_ends[:, :, None], axis=1)
        return normalize(hidden[:, -1]), aligned


def normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def init_lora(shapes, weights, rank, seed):
    """LoRA factors: A uniform in ±1/sqrt(fan_in) (PEFT's Kaiming default), B zero."""
    rng = np.random.default_rng(seed)
    lora = {}
    for i in range(shapes.layers):
        names = exporter.layer_names(i)
        for key in LORA_TARGETS:
            w = weights[names[key]]
            bound = 1.0 / math.sqrt(w.shape[1])
            lora[names[key]] = {
                "a": jnp.asarray(rng.uniform(-bound, bound, (rank, w.shape[1])), dtype=jnp.float32),
                "b": jnp.zeros((w.shape[0], rank), dtype=jnp.float32),
            }
    return lora


def merged_weights(weights, lora, scale):
    """The exporter's weights with every LoRA update folded in (W + scale·B·A)."""
    merged = dict(weights)
    for name, factors in lora.items():
        update = np.asarray(factors["b"], dtype=np.float64) @ np.asarray(factors["a"], dtype=np.float64)
        merged[name] = (weights[name].astype(np.float64) + scale * update).astype(np.float32)
    return merged


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def cross_entropy(logits, target):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[:, None], axis=1))


def kl_batchmean(student, teacher, temperature):
    """KL(softmax(teacher/τ) ‖ softmax(student/τ)), summed over classes, averaged over rows."""
    target = jax.nn.softmax(teacher / temperature, axis=-1)
    log_target = jax.nn.log_softmax(teacher / temperature, axis=-1)
    return jnp.sum(target * (log_target - jax.nn.log_softmax(student / temperature, axis=-1))) / student.shape[0]


def make_loss(model, steps, hp):
    def loss_fn(lora, base, batch):
        q_reps, q_states = model.latent(base, lora, batch["q_ids"], batch["q_mask"], steps)
        p_reps, _ = model.latent(base, lora, batch["p_ids"], batch["p_mask"], steps)
        t_reps, t_states = model.explicit(base, lora, batch["t_ids"], batch["t_mask"], batch["t_ends"])
        group = p_reps.shape[0] // q_reps.shape[0]
        target = jnp.arange(q_reps.shape[0]) * group
        scores = q_reps @ p_reps.T
        teacher_scores = t_reps @ p_reps.T
        q_d = cross_entropy(scores / hp.temperature, target)
        kl = kl_batchmean(scores, jax.lax.stop_gradient(teacher_scores), hp.temperature)
        teacher = cross_entropy(teacher_scores / hp.temperature, target)
        student_steps = normalize(q_states.reshape(-1, q_states.shape[-1]))
        teacher_steps = normalize(t_states.reshape(-1, t_states.shape[-1]))
        latent = kl_batchmean(
            student_steps @ p_reps.T, jax.lax.stop_gradient(teacher_steps @ p_reps.T), hp.latent_temperature
        )
        total = q_d + hp.kl_weight * kl + teacher + hp.latent_weight * latent
        return total, {"q_d": q_d, "kl": kl, "teacher": teacher, "latent": latent}

    return loss_fn


# ----------------------------------------------------------------------------------------------
# AdamW (linear warm-up and decay, global-norm clipping)
# ----------------------------------------------------------------------------------------------


def make_update(hp, total_steps):
    warmup = max(1, int(total_steps * hp.warmup))

    def rate(step):
        up = step / warmup
        down = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - warmup))
        return hp.learning_rate * jnp.where(step < warmup, up, down)

    def update(params, grads, state, step):
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
        grads = jax.tree_util.tree_map(lambda g: g * jnp.minimum(1.0, hp.clip / (norm + 1e-6)), grads)
        m = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, state["m"], grads)
        v = jax.tree_util.tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, state["v"], grads)
        t = step + 1.0
        lr = rate(t)
        params = jax.tree_util.tree_map(
            lambda p, m, v: p - lr * ((m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8) + hp.weight_decay * p),
            params,
            m,
            v,
        )
        return params, {"m": m, "v": v}, norm

    return update


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Batches:
    """Tokenised, left-padded batches of fixed widths (one compilation for the whole run)."""

    def __init__(self, tokenizer, documents, hp, steps, eos):
        self.tok, self.hp, self.steps, self.eos = tokenizer, hp, steps, eos
        self.documents = [self.ids(d["text"], hp.document_max_tokens) for d in documents]
        self.widths = {}

    def ids(self, text, limit):
        return self.tok.encode(text).ids[:limit] or [self.eos]

    def teacher(self, example):
        """Ids of query + reasoning + EOS, and the index of each reasoning segment's last token."""
        query = self.ids(example["query"], self.hp.query_max_tokens)
        segments = example.get("reasoning") or []
        ids, ends = list(query), []
        budget = self.hp.reasoning_max_tokens
        for n, segment in enumerate(segments):
            text = ("<think>" if n == 0 else "") + segment + ("</think>" if n == len(segments) - 1 else "\n\n")
            piece = self.tok.encode(text, add_special_tokens=False).ids[:budget]
            if not piece:
                continue
            budget -= len(piece)
            ids.extend(piece)
            ends.append(len(ids) - 1)
            if budget <= 0:
                break
        ids.append(self.eos)
        if not ends:
            ends = [len(ids) - 1]
        # K aligned states: evenly spaced segments, or every segment and the last one repeated.
        if len(ends) >= self.steps:
            picked = [ends[int(j)] for j in np.linspace(0, len(ends) - 1, self.steps)]
        else:
            picked = ends + [ends[-1]] * (self.steps - len(ends))
        return ids, picked

    def fix_widths(self, examples):
        """The widths every batch is padded to: the longest input of its kind."""
        self.widths = {
            "q": max(len(self.ids(e["query"], self.hp.query_max_tokens)) for e in examples),
            "p": max(len(d) for d in self.documents),
            "t": max(len(self.teacher(e)[0]) for e in examples),
        }

    @staticmethod
    def pad(rows, width):
        ids = np.zeros((len(rows), width), dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for r, row in enumerate(rows):
            row = row[-width:]
            ids[r, width - len(row) :] = row
            mask[r, width - len(row) :] = 1
        return ids, mask

    def training(self, examples, rng):
        """A training batch: queries, each one's positive then its sampled hard negatives, teacher."""
        queries, passages, teachers, ends = [], [], [], []
        for e in examples:
            queries.append(self.ids(e["query"], self.hp.query_max_tokens))
            negatives = list(e.get("negatives") or [])
            picked = []
            for _ in range(self.hp.group_size - 1):
                pool = [n for n in negatives if n not in picked] or negatives or [e["positive"]]
                picked.append(pool[rng.integers(len(pool))])
            passages.extend(self.documents[d] for d in [e["positive"]] + picked)
            t_ids, t_ends = self.teacher(e)
            teachers.append(t_ids)
            ends.append(t_ends)
        q_ids, q_mask = self.pad(queries, self.widths["q"])
        p_ids, p_mask = self.pad(passages, self.widths["p"])
        t_ids, t_mask = self.pad(teachers, self.widths["t"])
        width = self.widths["t"]
        t_ends = np.array([[width - len(t) + i for i in e] for t, e in zip(teachers, ends)], dtype=np.int32)
        batch = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask, "t_ids": t_ids, "t_mask": t_mask, "t_ends": t_ends}
        return {k: jnp.asarray(v) for k, v in batch.items()}


def encode_all(encode, lora, rows, batch_size):
    """Pooled student vectors of token rows, in batches of one padded width."""
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    width = max(len(r) for r in rows)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
        ids, mask = Batches.pad(chunk, width)
        out.append(np.asarray(encode(lora, jnp.asarray(ids), jnp.asarray(mask))))
    return np.concatenate(out)[: len(rows)]


def held_out_scores(encode, lora, batches, examples, batch_size):
    """MRR@10 and recall@10 of held-out questions, each ranked among the pool of every held-out
    question's positive and hard negatives."""
    if not examples:
        return None
    pool = sorted({d for e in examples for d in [e["positive"]] + list(e.get("negatives") or [])})
    where = {d: i for i, d in enumerate(pool)}
    docs = encode_all(encode, lora, [batches.documents[d] for d in pool], batch_size)
    queries = encode_all(encode, lora, [batches.ids(e["query"], batches.hp.query_max_tokens) for e in examples], batch_size)
    scores = queries @ docs.T
    reciprocal, found = 0.0, 0
    for row, e in enumerate(examples):
        own = scores[row, where[e["positive"]]]
        rank = int(np.sum(scores[row] > own))
        if rank < 10:
            reciprocal += 1.0 / (rank + 1)
            found += 1
    return {"mrr_at_10": reciprocal / len(examples), "recall_at_10": found / len(examples), "questions": len(examples), "pool": len(pool)}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def load_backbone(path, work_dir):
    """The exporter's view of a backbone: a HF checkpoint directory, a GGUF file, or an mkflow
    export whose mkflow-decoder.json names one of those as its source."""
    described = os.path.join(path, "mkflow-decoder.json") if os.path.isdir(path) else None
    if described and os.path.isfile(described) and not os.path.isfile(os.path.join(path, "config.json")):
        with open(described) as f:
            source = json.load(f).get("source")
        if not source or not os.path.exists(source):
            sys.exit(
                f"{path}: an mkflow export whose source checkpoint {source!r} is gone "
                "(hint: pass the Hugging Face checkpoint directory or GGUF file it was exported from)"
            )
        path = source
    if os.path.isdir(path):
        return exporter.load_hf(path) + (os.path.abspath(path),)
    if os.path.isfile(path):
        return exporter.load_gguf(path, work_dir) + (os.path.abspath(path),)
    sys.exit(f"{path}: no such checkpoint directory, GGUF file or mkflow export")


def eos_id(tokenizer, chat):
    token = chat.get("eos_token")
    if token is not None and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    ids = chat.get("eos_token_ids") or []
    if ids:
        return int(ids[0])
    sys.exit("the backbone names no end-of-sequence token (tokenizer_config.json eos_token)")


def parse_args(argv):
    p = argparse.ArgumentParser(description="Train a LaSER embedding model (see the module docstring).")
    p.add_argument("--backbone", required=True, help="HF checkpoint dir, GGUF file, or an mkflow export of one")
    p.add_argument("--data", required=True, help="directory with documents.jsonl, examples.jsonl, probe.jsonl, spec.json")
    p.add_argument("--out", required=True, help="where the trained model is exported")
    p.add_argument("--report", required=True, help="where the JSON report is written")
    p.add_argument("--latent-steps", type=int, default=3, help="K: pooled states (h_0 and K-1 soft tokens)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training questions")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the epochs decide)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per step")
    p.add_argument("--group-size", type=int, default=2, help="passages per question: the positive and group-1 hard negatives")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--warmup", type=float, default=0.1, help="share of the steps the learning rate warms up over")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient global-norm clip")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--latent-temperature", type=float, default=0.05)
    p.add_argument("--kl-weight", type=float, default=10.0)
    p.add_argument("--latent-weight", type=float, default=0.1)
    p.add_argument("--query-max-tokens", type=int, default=128)
    p.add_argument("--document-max-tokens", type=int, default=256)
    p.add_argument("--reasoning-max-tokens", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    hp = p.parse_args(argv)
    if hp.latent_steps < 1:
        p.error("--latent-steps is K, the pooled states: at least 1")
    if hp.group_size < 1 or hp.batch_size < 1:
        p.error("--batch-size and --group-size must be at least 1")
    return hp


def main(argv=None):
    hp = parse_args(argv)
    started = time.time()
    os.makedirs(hp.out, exist_ok=True)
    shapes, weights, tokenizer_path, chat, source = load_backbone(hp.backbone, hp.out)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    documents = read_jsonl(os.path.join(hp.data, "documents.jsonl"))
    examples = read_jsonl(os.path.join(hp.data, "examples.jsonl"))
    probe = read_jsonl(os.path.join(hp.data, "probe.jsonl"))
    with open(os.path.join(hp.data, "spec.json")) as f:
        spec = json.load(f)
    training = [e for e in examples if not e.get("held_out")]
    held_out = [e for e in examples if e.get("held_out")]
    if not training:
        sys.exit("no training questions in examples.jsonl")

    steps = hp.latent_steps
    batches = Batches(tokenizer, documents, hp, steps, eos_id(tokenizer, chat))
    batches.fix_widths(examples)
    per_epoch = max(1, len(training) // hp.batch_size)
    total = max(1, int(math.ceil(per_epoch * hp.epochs)))
    if hp.max_steps:
        total = min(total, hp.max_steps)
    model = Decoder(shapes, hp.lora_alpha / hp.lora_rank)
    base = {name: jnp.asarray(array, dtype=jnp.float32) for name, array in weights.items()}
    lora = init_lora(shapes, weights, hp.lora_rank, hp.seed)
    emit(
        "start",
        device=str(jax.devices()[0]),
        steps=total,
        training=len(training),
        held_out=len(held_out),
        documents=len(documents),
        widths=batches.widths,
    )

    loss_fn = make_loss(model, steps, hp)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    loss_only = jax.jit(loss_fn)
    update = jax.jit(make_update(hp, total))
    encode_jit = jax.jit(lambda lo, ba, ids, mask: model.latent(ba, lo, ids, mask, steps)[0])

    def encode(lo, ids, mask):
        return encode_jit(lo, base, ids, mask)


    rng = np.random.default_rng(hp.seed)
    order = rng.permutation(len(training))
    # A fixed batch, scored before and after: whether training lowered the loss.
    fixed = batches.training([training[i] for i in order[: hp.batch_size]], np.random.default_rng(hp.seed))
    fixed_before = float(loss_only(lora, base, fixed)[0])
    before = held_out_scores(encode, lora, batches, held_out, hp.batch_size)
    if before:
        emit("held_out", stage="before", **before)

    state = {"m": jax.tree_util.tree_map(jnp.zeros_like, lora), "v": jax.tree_util.tree_map(jnp.zeros_like, lora)}
    losses = []
    cursor = 0
    for step in range(total):
        if cursor + hp.batch_size > len(order):
            order, cursor = rng.permutation(len(training)), 0
        picked = [training[i] for i in order[cursor : cursor + hp.batch_size]]
        picked += [picked[-1]] * (hp.batch_size - len(picked))
        cursor += hp.batch_size
        (loss, parts), grads = grad_fn(lora, base, batches.training(picked, rng))
        lora, state, norm = update(lora, grads, state, float(step))
        losses.append(float(loss))
        emit("step", step=step + 1, steps=total, loss=float(loss), grad_norm=float(norm), **{k: float(v) for k, v in parts.items()})
        if not math.isfinite(float(loss)):
            sys.exit(f"the loss became {float(loss)} at step {step + 1} (hint: a smaller --learning-rate)")

    fixed_after = float(loss_only(lora, base, fixed)[0])
    after = held_out_scores(encode, lora, batches, held_out, hp.batch_size)
    if after:
        emit("held_out", stage="after", **after)

    # The trainer's own encoder on the probe texts, for the caller's parity check of the export.
    # Truncated as mkflow's runtime truncates: the model's token limit, less the soft tokens'
    # room when the context would not hold them.
    limit = min(int(spec.get("max_tokens") or 512), shapes.max_position - (steps - 1))
    probe_rows = [batches.ids(p["written"], limit) for p in probe]
    probe_vectors = [encode_all(encode, lora, [row], 1)[0].tolist() for row in probe_rows]

    merged = merged_weights(weights, lora, hp.lora_alpha / hp.lora_rank)
    description = exporter.export(shapes, merged, tokenizer_path, chat, hp.out, "float32", f"laser-trained:{source}")
    exporter.write_embedding_spec(hp.out, description, shapes.hidden, {**spec, "latent_steps": steps})
    report = {
        "backbone": source,
        "latent_steps": steps,
        "steps": total,
        "training_questions": len(training),
        "fixed_batch_loss": {"before": fixed_before, "after": fixed_after},
        "losses": losses,
        "held_out": {"before": before, "after": after} if before else None,
        "hyperparameters": {k: v for k, v in vars(hp).items() if k not in ("backbone", "data", "out", "report")},
        "probe": probe_vectors,
        "probe_texts": [{k: p[k] for k in ("text", "role") if k in p} for p in probe],
        "seconds": time.time() - started,
    }
    with open(hp.report, "w") as f:
        json.dump(report, f)
    emit("done", seconds=report["seconds"], fixed_batch_loss=report["fixed_batch_loss"])


if __name__ == "__main__":
    main()
