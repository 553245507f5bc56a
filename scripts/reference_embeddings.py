#!/usr/bin/env python3
"""Compute reference sentence embeddings for infermesh end-to-end tests.

Why this exists: the end-to-end tests need an independent oracle for what infermesh's
batched, padded, length-sorted inference should produce. This script deliberately takes the
simplest possible path: it tokenizes each record with the Hugging Face ``tokenizers``
library and runs the ONNX model with onnxruntime on the CPU ONE RECORD AT A TIME, with no
padding, so its results cannot share a batching, padding or ordering bug with the mesh.

Per record it:
  1. tokenizes ``record[--text-field]`` with ``Tokenizer.from_file(T)`` after
     ``no_padding()`` and ``enable_truncation(--max-length)``;
  2. feeds input_ids, attention_mask and (only if the model declares it) token_type_ids as
     integer tensors of shape [1, n];
  3. takes the model's first output, [1, n, D], mean-pools it over tokens weighted by the
     attention mask (in float64), and L2-normalises it unless --no-normalize;
  4. writes ``{"id": record[--id-field], "embedding": [...]}`` as one output line, in input
     order.

Blank input lines are skipped. A line that is not JSON, or lacks the id or text field, is
an error naming the line number.

Example:
    python scripts/reference_embeddings.py \\
        --model ~/.cache/infermesh/models/minilm/model.onnx \\
        --tokenizer ~/.cache/infermesh/models/minilm/tokenizer.json \\
        --input examples/quickstart/corpus.jsonl --output /tmp/reference.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ORT_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"reference_embeddings: error: {msg}", file=sys.stderr)
    sys.exit(1)


def load_session(model_path: str) -> tuple[ort.InferenceSession, dict[str, type]]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    inputs: dict[str, type] = {}
    for i in sess.get_inputs():
        if i.name not in KNOWN_INPUTS:
            fail(f"model input {i.name!r} is not one of {', '.join(KNOWN_INPUTS)}")
        if i.type not in ORT_INT_TYPES:
            fail(f"model input {i.name!r} has type {i.type}, expected int64 or int32")
        inputs[i.name] = ORT_INT_TYPES[i.type]
    for required in ("input_ids", "attention_mask"):
        if required not in inputs:
            fail(f"model has no {required!r} input (inputs: {sorted(inputs)})")
    return sess, inputs


def embed_one(sess: ort.InferenceSession, inputs: dict[str, type], output_name: str,
              tok: Tokenizer, text: str, normalize: bool) -> np.ndarray:
    enc = tok.encode(text)
    feeds = {"input_ids": np.asarray([enc.ids], dtype=inputs["input_ids"]),
             "attention_mask": np.asarray([enc.attention_mask], dtype=inputs["attention_mask"])}
    if "token_type_ids" in inputs:
        feeds["token_type_ids"] = np.asarray([enc.type_ids], dtype=inputs["token_type_ids"])
    (hidden,) = sess.run([output_name], feeds)
    if hidden.ndim != 3 or hidden.shape[:2] != (1, len(enc.ids)):
        fail(f"first output {output_name!r} has shape {hidden.shape}, "
             f"expected [1, {len(enc.ids)}, D]")
    h = hidden[0].astype(np.float64)                      # [n, D]
    mask = np.asarray(enc.attention_mask, dtype=np.float64)[:, None]  # [n, 1]
    pooled = (h * mask).sum(axis=0) / max(mask.sum(), 1e-9)
    if normalize:
        pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
    return pooled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ONNX model path")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer.json path")
    p.add_argument("--input", required=True, help="input JSONL path")
    p.add_argument("--output", required=True, help="output JSONL path")
    p.add_argument("--max-length", type=int, default=256,
                   help="truncate to this many tokens, specials included (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="input field to embed (default: %(default)s)")
    p.add_argument("--id-field", default="id", help="input field copied to output (default: %(default)s)")
    p.add_argument("--no-normalize", action="store_true",
                   help="write the mean-pooled vector without L2 normalisation")
    args = p.parse_args(argv)
    if args.max_length < 1:
        p.error("--max-length must be >= 1")

    tok = Tokenizer.from_file(args.tokenizer)
    tok.no_padding()
    tok.enable_truncation(args.max_length)
    sess, inputs = load_session(args.model)
    output_name = sess.get_outputs()[0].name

    count = 0
    with open(args.input, encoding="utf-8") as fin, \
            open(args.output, "w", encoding="utf-8", newline="\n") as fout:
        for lineno, line in enumerate(fin, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                fail(f"{args.input}:{lineno}: invalid JSON: {exc}")
            if not isinstance(record, dict):
                fail(f"{args.input}:{lineno}: expected a JSON object")
            if args.id_field not in record:
                fail(f"{args.input}:{lineno}: missing field {args.id_field!r}")
            text = record.get(args.text_field)
            if not isinstance(text, str):
                fail(f"{args.input}:{lineno}: missing or non-string field {args.text_field!r}")
            vec = embed_one(sess, inputs, output_name, tok, text, not args.no_normalize)
            fout.write(json.dumps({"id": record[args.id_field],
                                   "embedding": [float(v) for v in vec]}) + "\n")
            count += 1
    print(f"wrote {count} embeddings to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
