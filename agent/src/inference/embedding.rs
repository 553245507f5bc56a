//! `text-embedding`: a text field -> tokenizer -> model -> mean pooling over the attention
//! mask -> optional L2 normalisation. Records are sorted by token count before batching
//! (padding to the longest text of a batch costs far less when lengths are alike) and the
//! embeddings are returned in input order.

use std::time::Instant;

use infermesh_proto::ErrorKind;
use ort::session::Session;
use ort::value::Tensor;
use tokenizers::{Encoding, Tokenizer, TruncationParams};

use super::{BatchControl, Origin, Parsed, ShardError, batches, inference_error, json_kind};

/// A loaded tokenizer with the task's settings.
pub struct Embedder {
    tokenizer: Tokenizer,
    text_field: String,
    normalize: bool,
    output_name: Option<String>,
    pad_id: i64,
}

impl Embedder {
    /// Loads `tokenizer.json` bytes, truncating to `max_length` tokens and padding nothing
    /// (batches are padded here, to the longest text of each batch).
    pub fn new(
        tokenizer_json: &[u8],
        tokenizer_uri: &str,
        text_field: &str,
        max_length: usize,
        normalize: bool,
        output_name: Option<String>,
    ) -> Result<Self, ShardError> {
        let fail = |e: &dyn std::fmt::Display| {
            ShardError::permanent(
                ErrorKind::TokenizerLoad,
                format!("tokenizer {tokenizer_uri} does not load: {e}"),
            )
        };
        let mut tokenizer = Tokenizer::from_bytes(tokenizer_json).map_err(|e| fail(&e))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| fail(&e))?;
        tokenizer.with_padding(None);
        let pad_id = ["[PAD]", "<pad>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .unwrap_or(0) as i64;
        Ok(Self {
            tokenizer,
            text_field: text_field.to_string(),
            normalize,
            output_name,
            pad_id,
        })
    }

    /// Tokenizes each record's text field; a record without a string there fails the shard.
    pub fn encode(
        &self,
        origin: &Origin<'_>,
        records: &[Parsed],
    ) -> Result<Vec<Encoding>, ShardError> {
        records
            .iter()
            .map(|rec| {
                let text = match rec.field(&self.text_field) {
                    Some(serde_json::Value::String(s)) => s.as_str(),
                    Some(other) => {
                        return Err(origin.invalid(
                            rec,
                            format!(
                                "field `{}` is {}, not a string",
                                self.text_field,
                                json_kind(other)
                            ),
                        ));
                    }
                    None => {
                        return Err(origin
                            .invalid(rec, format!("record has no `{}` field", self.text_field)));
                    }
                };
                self.tokenizer
                    .encode(text, true)
                    .map_err(|e| origin.invalid(rec, format!("cannot tokenize: {e}")))
            })
            .collect()
    }

    /// Embeds the encodings, `control.size` at a time, in input order.
    /// The embedding dimension the model declares (the last dimension of its token-state
    /// output), when it is fixed: what an output part with no record says its vectors hold.
    pub fn declared_dim(&self, session: &Session) -> Option<usize> {
        let outputs = session.outputs();
        let out = match &self.output_name {
            None => outputs.first(),
            Some(name) => outputs.iter().find(|o| o.name() == name),
        }?;
        let last = *out.dtype().tensor_shape()?.last()?;
        usize::try_from(last).ok().filter(|&d| d > 0)
    }

    pub fn embed(
        &self,
        session: &mut Session,
        encodings: &[Encoding],
        control: &BatchControl<'_>,
    ) -> Result<Vec<Vec<f32>>, ShardError> {
        let inputs: Vec<String> = session
            .inputs()
            .iter()
            .map(|i| i.name().to_string())
            .collect();
        if let Some(other) = inputs.iter().find(|n| {
            !matches!(
                n.as_str(),
                "input_ids" | "attention_mask" | "token_type_ids"
            )
        }) {
            return Err(ShardError::permanent(
                ErrorKind::ModelLoad,
                format!(
                    "model input `{other}` is not one a text-embedding model takes \
                     (input_ids, attention_mask, token_type_ids); use the tensor task"
                ),
            ));
        }
        let output_index = match &self.output_name {
            None => 0,
            Some(name) => session
                .outputs()
                .iter()
                .position(|o| o.name() == name)
                .ok_or_else(|| {
                    ShardError::permanent(
                        ErrorKind::ModelLoad,
                        format!("model has no output `{name}`"),
                    )
                })?,
        };

        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); encodings.len()];
        for idx in batches(&order, control.size) {
            control.check_cancelled()?;
            let len = idx
                .iter()
                .map(|&i| encodings[i].len())
                .max()
                .unwrap_or(0)
                .max(1);
            let n = idx.len();
            let mut ids = vec![self.pad_id; n * len];
            let mut mask = vec![0i64; n * len];
            let mut types = vec![0i64; n * len];
            for (row, &i) in idx.iter().enumerate() {
                let e = &encodings[i];
                for (col, ((&id, &m), &t)) in e
                    .get_ids()
                    .iter()
                    .zip(e.get_attention_mask())
                    .zip(e.get_type_ids())
                    .enumerate()
                {
                    ids[row * len + col] = i64::from(id);
                    mask[row * len + col] = i64::from(m);
                    types[row * len + col] = i64::from(t);
                }
            }
            let shape = [n, len];
            let mut feed: Vec<(String, ort::value::DynValue)> = Vec::with_capacity(3);
            // Each buffer is moved into its tensor; only the mask is kept, for pooling.
            let (mut ids, mut types) = (Some(ids), Some(types));
            for name in &inputs {
                let data = match name.as_str() {
                    "input_ids" => ids.take().unwrap_or_default(),
                    "attention_mask" => mask.clone(),
                    _ => types.take().unwrap_or_default(),
                };
                let t = Tensor::from_array((shape, data)).map_err(inference_error)?;
                feed.push((name.clone(), t.into_dyn()));
            }
            let run = Instant::now();
            let outputs = session.run(feed).map_err(|e| {
                sequence_error(len, &e.to_string()).unwrap_or_else(|| inference_error(e))
            })?;
            control.metrics.observe_batch(n, run.elapsed());
            let (out_shape, data) = outputs[output_index]
                .try_extract_tensor::<f32>()
                .map_err(inference_error)?;
            let dims: Vec<usize> = out_shape.iter().map(|&d| d.max(0) as usize).collect();
            for (row, &i) in idx.iter().enumerate() {
                let mut v = match dims.as_slice() {
                    // [batch, tokens, dim]: mean over the tokens the mask keeps.
                    &[b, t, d] if b == n && t == len => {
                        let mut acc = vec![0f32; d];
                        let mut count = 0f32;
                        for tok in 0..t {
                            if mask[row * len + tok] == 0 {
                                continue;
                            }
                            count += 1.0;
                            let base = (row * t + tok) * d;
                            for (a, x) in acc.iter_mut().zip(&data[base..base + d]) {
                                *a += x;
                            }
                        }
                        let count = count.max(1.0);
                        acc.iter_mut().for_each(|a| *a /= count);
                        acc
                    }
                    // [batch, dim]: the model pools itself.
                    &[b, d] if b == n => data[row * d..(row + 1) * d].to_vec(),
                    other => {
                        return Err(ShardError::permanent(
                            ErrorKind::ModelLoad,
                            format!(
                                "model output has shape {other:?}; a text-embedding model must give \
                                 [batch, tokens, dim] or [batch, dim]"
                            ),
                        ));
                    }
                };
                if self.normalize {
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    if norm > 0.0 {
                        v.iter_mut().for_each(|x| *x /= norm);
                    }
                }
                out[i] = v;
            }
        }
        Ok(out)
    }
}

/// Most BERT-family encoders (MiniLM among them) have 512 position embeddings.
pub const USUAL_MAX_POSITIONS: usize = 512;

/// A model that fails on a batch longer than the usual 512 positions almost surely has no
/// more position embeddings: that is the Workload's `maxLength`, which another attempt would
/// repeat, so it is a permanent `InvalidInput` that says what to change, instead of ONNX
/// Runtime's raw broadcast error three times over.
pub fn sequence_error(len: usize, ort: &str) -> Option<ShardError> {
    (len > USUAL_MAX_POSITIONS).then(|| {
        ShardError::permanent(
            infermesh_proto::ErrorKind::InvalidInput,
            format!(
                "the model failed on texts of {len} tokens; it most likely supports at most \
                 {USUAL_MAX_POSITIONS} positions: lower spec.task.textEmbedding.maxLength to \
                 {USUAL_MAX_POSITIONS} or less (ONNX Runtime said: {ort})"
            ),
        )
    })
}

#[cfg(test)]
mod sequence_tests {
    use super::*;

    #[test]
    fn a_failure_past_the_usual_positions_names_max_length_and_is_permanent() {
        let e = sequence_error(
            700,
            "Attempting to broadcast an axis by a dimension other than 1",
        )
        .expect("past 512");
        assert!(!e.retryable);
        assert_eq!(e.kind, infermesh_proto::ErrorKind::InvalidInput);
        assert!(
            e.message.contains("maxLength") && e.message.contains("700 tokens"),
            "{}",
            e.message
        );
        assert!(
            sequence_error(512, "x").is_none(),
            "within the usual positions: an ordinary error"
        );
    }
}
