#!/usr/bin/env python3
"""The pipeline a user would write by hand in Python: onnxruntime + tokenizers + usearch.

Embeds `title. body` of every document of a JSON Lines file (doc_id, title, body) with the same
ONNX model and tokenizer mkflow uses (input-order batches of 32, padded to the longest, mean
pooling, L2 normalisation, 256-token truncation), adds the vectors to a usearch index and saves
it. Prints one JSON line with the document count and the seconds taken.
"""
import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
from usearch.index import Index


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("corpus")
    parser.add_argument("--model-dir", default=os.path.expanduser("~/.cache/mkflow/models/all-MiniLM-L6-v2"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="/tmp/python-baseline.usearch")
    args = parser.parse_args()

    started = time.perf_counter()
    docs = [json.loads(line) for line in open(args.corpus) if line.strip()]
    texts = [". ".join(x for x in (d.get("title"), d.get("body")) if x) for d in docs]

    tokenizer = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(os.path.join(args.model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])
    index = Index(ndim=384, metric="cos")

    for start in range(0, len(texts), args.batch):
        encodings = tokenizer.encode_batch(texts[start:start + args.batch])
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        index.add(np.arange(start, start + len(encodings)), pooled.astype(np.float32))
    index.save(args.out)
    print(json.dumps({"documents": len(texts), "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
