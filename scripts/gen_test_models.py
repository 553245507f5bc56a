#!/usr/bin/env python3
"""Generate the small, deterministic ONNX models and tokenizers used by infermesh tests.

Why this exists: the Rust test suite needs models it can reason about exactly (known
weights, known outputs) plus deliberately broken artefacts for error paths, without
downloading anything or checking opaque binaries into git. This script builds them all
from constants in this file, so every run produces byte-identical files:

  tensor.onnx          input "x" float32 [batch, 4];
                       outputs "y" = x @ W + b  float32 [batch, 3]
                               "s" = ReduceSum(x, axis=1, keepdims=0)  float32 [batch]
                       W = arange(12).reshape(4, 3) / 10, b = [0.5, -1, 2]
  tiny_embed.onnx      toy text encoder: inputs input_ids, attention_mask, token_type_ids
                       (int64 [batch, sequence]); output last_hidden_state float32
                       [batch, sequence, 8] = (E[input_ids] + T[token_type_ids])
                                              * attention_mask[..., None]
                       E: [vocab, 8], T: [2, 8], both from np.random.default_rng(7)
  tiny_tokenizer.json  Hugging Face tokenizers JSON: WordLevel over [PAD] [UNK] [CLS] [SEP]
                       + ~200 lowercase words (+ . , ? !), BertNormalizer(lowercase),
                       BertPreTokenizer, TemplateProcessing "[CLS] $A [SEP]"; no padding
                       or truncation configured
  corrupt.onnx         200 bytes of deterministic garbage (not a model)
  bad_tokenizer.json   valid JSON that is not a tokenizer

All models use opset 17 and IR version 8 and pass onnx.checker.check_model. The script
prints "name sha256" for every file it writes. With --check it also loads both models with
onnxruntime, runs them once and compares against numpy, and confirms that the two broken
artefacts are rejected.

Example:
    python scripts/gen_test_models.py --out tests/fixtures --check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

OPSET = 17
IR_VERSION = 8  # ORT 1.31 accepts <= 10; 8 keeps older runtimes happy too
PRODUCER = "infermesh/scripts/gen_test_models.py"
EMBED_DIM = 8
EMBED_SEED = 7

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # ids 0..3
# The most frequent words of the quickstart corpus (scripts/gen_corpus.py, seed 42), so
# most corpus tokens are in-vocabulary while some still map to [UNK].
WORDS = """
    a about administrator after again airport although an and at backup baker barely
    beans because before boiled brave bridge burned busy but calm careful carefully
    center chef child clever coast cold composer crossed crowd curious customer data
    database day days detected developer distant during early easily encores even every
    everyone expected experienced explored faint family famous fans farmer finally for
    front galaxies gardener good gpu green guide half happened happy harbor harder herbs
    hiker in index indexed inference island it job kitchen large later league local
    locked log long longer looked made man measured migration moon morning mountain
    museum music narrow neighbor nervous new next night nobody numbers observatory of
    old on opening operator patient people photographed piano planet planned planner
    planted plants practiced probe proudly query quickly quiet quietly rain reached
    recorded records replica report research restarted restaurant restored results road
    rows schema script season second seeds server signal slowly small snapshot so song
    space stored strange student suddenly surprised table talked teacher team telescope
    than that the theme then though three tired title tomato took tour train trains
    transaction traveler until vegetables village volunteer was watched watered weather
    week were while without written young
""".split()
PUNCTUATION = [".", ",", "?", "!"]

TENSOR_W = (np.arange(12, dtype=np.float32).reshape(4, 3) / np.float32(10)).astype(np.float32)
TENSOR_B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_tensor_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"])
    inits = [
        numpy_helper.from_array(TENSOR_W, "W"),
        numpy_helper.from_array(TENSOR_B, "b"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "sum_axes"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "b"], ["y"], name="add_bias"),
        helper.make_node("ReduceSum", ["x", "sum_axes"], ["s"], name="row_sum", keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tensor", [x], [y, s], initializer=inits)
    return _model(graph, "y = x @ W + b; s = sum(x, axis=1)")


def build_tokenizer() -> Tokenizer:
    vocab_list = SPECIAL_TOKENS + WORDS + PUNCTUATION
    assert len(set(vocab_list)) == len(vocab_list), "duplicate vocabulary entry"
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.no_padding()
    tok.no_truncation()
    return tok


def embed_tables(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(EMBED_SEED)
    e = rng.standard_normal((vocab_size, EMBED_DIM)).astype(np.float32)
    t = rng.standard_normal((2, EMBED_DIM)).astype(np.float32)
    return e, t


def build_embed_model(vocab_size: int) -> onnx.ModelProto:
    e, t = embed_tables(vocab_size)
    ins = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    out = helper.make_tensor_value_info(
        "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", EMBED_DIM])
    inits = [
        numpy_helper.from_array(e, "word_embeddings"),
        numpy_helper.from_array(t, "token_type_embeddings"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "unsqueeze_axes"),
    ]
    nodes = [
        helper.make_node("Gather", ["word_embeddings", "input_ids"], ["word_emb"],
                         name="gather_words", axis=0),
        helper.make_node("Gather", ["token_type_embeddings", "token_type_ids"], ["type_emb"],
                         name="gather_types", axis=0),
        helper.make_node("Add", ["word_emb", "type_emb"], ["emb"], name="add_embeddings"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], name="cast_mask",
                         to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "unsqueeze_axes"], ["mask_3d"],
                         name="unsqueeze_mask"),
        helper.make_node("Mul", ["emb", "mask_3d"], ["last_hidden_state"], name="apply_mask"),
    ]
    graph = helper.make_graph(nodes, "tiny_embed", ins, [out], initializer=inits)
    return _model(graph, "last_hidden_state = (E[input_ids] + T[token_type_ids]) * mask")


def corrupt_bytes(n: int = 200) -> bytes:
    # Starts with ASCII 'N' (protobuf field 9, invalid wire type 6), so no parser accepts it.
    data = b"NOT AN ONNX MODEL\n"
    i = 0
    while len(data) < n:
        data += hashlib.sha256(b"infermesh-corrupt-onnx-%d" % i).digest()
        i += 1
    return data[:n]


BAD_TOKENIZER = {"version": "1.0", "model": {"type": "Nope"}}


def self_check(out: str) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]

    # tensor.onnx
    sess = ort.InferenceSession(os.path.join(out, "tensor.onnx"), opts, providers=cpu)
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - np.float32(3)
    y, s = sess.run(["y", "s"], {"x": x})
    np.testing.assert_allclose(y, x @ TENSOR_W + TENSOR_B, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s, x.sum(axis=1), rtol=1e-6, atol=1e-6)
    assert y.shape == (2, 3) and s.shape == (2,), (y.shape, s.shape)
    print(f"check tensor.onnx ok: y[0]={y[0].tolist()} s={s.tolist()}", file=sys.stderr)

    # tiny_tokenizer.json + tiny_embed.onnx
    tok = Tokenizer.from_file(os.path.join(out, "tiny_tokenizer.json"))
    enc = tok.encode_batch(["The chef burned the soup.", "GPU clusters, at night!"])
    assert enc[0].tokens == ["[CLS]", "the", "chef", "burned", "the", "[UNK]", ".", "[SEP]"], \
        enc[0].tokens
    n = max(len(e.ids) for e in enc)
    ids = np.zeros((2, n), np.int64)
    mask = np.zeros((2, n), np.int64)
    types = np.zeros((2, n), np.int64)
    for r, e in enumerate(enc):
        ids[r, :len(e.ids)] = e.ids
        mask[r, :len(e.ids)] = e.attention_mask
        types[r, :len(e.ids)] = e.type_ids
    sess = ort.InferenceSession(os.path.join(out, "tiny_embed.onnx"), opts, providers=cpu)
    names = sorted(i.name for i in sess.get_inputs())
    assert names == ["attention_mask", "input_ids", "token_type_ids"], names
    (h,) = sess.run(["last_hidden_state"],
                    {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    e_tab, t_tab = embed_tables(tok.get_vocab_size(with_added_tokens=True))
    want = (e_tab[ids] + t_tab[types]) * mask[..., None].astype(np.float32)
    np.testing.assert_allclose(h, want, rtol=1e-6, atol=1e-6)
    assert h.shape == (2, n, EMBED_DIM) and not h[0, len(enc[0].ids):].any()
    print(f"check tiny_embed.onnx ok: shape={h.shape}", file=sys.stderr)

    # broken artefacts must be rejected
    try:
        ort.InferenceSession(os.path.join(out, "corrupt.onnx"), opts, providers=cpu)
    except Exception as exc:  # noqa: BLE001 - any load failure is what we want
        print(f"check corrupt.onnx rejected ok: {type(exc).__name__}", file=sys.stderr)
    else:
        raise AssertionError("onnxruntime accepted corrupt.onnx")
    try:
        Tokenizer.from_file(os.path.join(out, "bad_tokenizer.json"))
    except Exception as exc:  # noqa: BLE001
        print(f"check bad_tokenizer.json rejected ok: {type(exc).__name__}", file=sys.stderr)
    else:
        raise AssertionError("tokenizers accepted bad_tokenizer.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write the files into")
    p.add_argument("--check", action="store_true",
                   help="after writing, run the models with onnxruntime and verify outputs")
    args = p.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    written: list[str] = []

    def write_bytes(name: str, data: bytes) -> None:
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(data)
        written.append(name)

    write_bytes("tensor.onnx", build_tensor_model().SerializeToString())

    tok = build_tokenizer()
    write_bytes("tiny_tokenizer.json", (tok.to_str(pretty=True) + "\n").encode("utf-8"))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    write_bytes("tiny_embed.onnx", build_embed_model(vocab_size).SerializeToString())

    write_bytes("corrupt.onnx", corrupt_bytes())
    write_bytes("bad_tokenizer.json", (json.dumps(BAD_TOKENIZER, indent=2) + "\n").encode())

    for name in written:
        print(f"{name} {sha256_of(os.path.join(args.out, name))}")

    if args.check:
        self_check(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
