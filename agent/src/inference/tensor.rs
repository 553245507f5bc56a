//! `tensor`: named numeric tensors in each record -> model -> named output tensors.
//!
//! A record holds, for each model input, one example's worth (nested arrays without the batch
//! dimension); records are stacked into batches and each output is split back per record.

use std::time::Instant;

use infermesh_proto::ErrorKind;
use ort::session::Session;
use ort::value::Tensor;
use ort::value::TensorElementType;
use serde_json::{Map, Value};

use super::{BatchControl, Origin, Parsed, ShardError, batches, inference_error, json_kind};

/// One model input and the record field that feeds it.
#[derive(Clone, Debug)]
pub struct InputBinding {
    /// Model input name.
    pub name: String,
    /// Record field.
    pub field: String,
}

/// Flattens nested numeric arrays; returns the shape and the values.
fn flatten(v: &Value) -> Result<(Vec<usize>, Vec<f64>), String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .map(|x| (Vec::new(), vec![x]))
            .ok_or_else(|| "not a finite number".into()),
        Value::Array(items) => {
            let mut shape: Option<Vec<usize>> = None;
            let mut data = Vec::new();
            for item in items {
                let (s, d) = flatten(item)?;
                match &shape {
                    None => shape = Some(s),
                    Some(prev) if *prev != s => {
                        return Err(format!("ragged array: {prev:?} vs {s:?}"));
                    }
                    Some(_) => {}
                }
                data.extend(d);
            }
            let mut full = vec![items.len()];
            full.extend(shape.unwrap_or_default());
            Ok((full, data))
        }
        other => Err(format!("expected numbers, found {}", json_kind(other))),
    }
}

/// Rebuilds nested arrays of `shape` from `data`.
fn nest<T: Copy + Into<Value>>(shape: &[usize], data: &[T]) -> Value {
    match shape {
        [] => data.first().map(|&x| x.into()).unwrap_or(Value::Null),
        [_] => Value::Array(data.iter().map(|&x| x.into()).collect()),
        [n, rest @ ..] => {
            let step = rest.iter().product::<usize>();
            Value::Array(
                (0..*n)
                    .map(|i| nest(rest, &data[i * step..(i + 1) * step]))
                    .collect(),
            )
        }
    }
}

/// Runs the records through the model `control.size` at a time; returns, per record in input
/// order, an object of the requested outputs (`outputs` empty: all of them).
pub fn run(
    session: &mut Session,
    origin: &Origin<'_>,
    bindings: &[InputBinding],
    outputs: &[String],
    records: &[Parsed],
    control: &BatchControl<'_>,
) -> Result<Vec<Map<String, Value>>, ShardError> {
    let model_err = |m: String| ShardError::permanent(ErrorKind::ModelLoad, m);
    // Resolve each binding against the model once.
    let mut specs = Vec::new();
    for b in bindings {
        let input = session
            .inputs()
            .iter()
            .find(|i| i.name() == b.name)
            .ok_or_else(|| model_err(format!("model has no input `{}`", b.name)))?;
        let ty = input.dtype().tensor_type();
        let dims: Vec<i64> = input
            .dtype()
            .tensor_shape()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        match ty {
            Some(TensorElementType::Float32 | TensorElementType::Int64) => {}
            other => {
                return Err(model_err(format!(
                    "model input `{}` has type {other:?}; float32 and int64 are supported",
                    b.name
                )));
            }
        }
        specs.push((b, ty, dims));
    }
    if let Some(missing) = session
        .inputs()
        .iter()
        .find(|i| !bindings.iter().any(|b| b.name == i.name()))
    {
        return Err(model_err(format!(
            "model input `{}` is not bound to a record field",
            missing.name()
        )));
    }
    let out_names: Vec<String> = if outputs.is_empty() {
        session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect()
    } else {
        for o in outputs {
            if !session.outputs().iter().any(|x| x.name() == o) {
                return Err(model_err(format!("model has no output `{o}`")));
            }
        }
        outputs.to_vec()
    };

    let order: Vec<usize> = (0..records.len()).collect();
    let mut result: Vec<Map<String, Value>> = vec![Map::new(); records.len()];
    for idx in batches(&order, control.size) {
        control.check_cancelled()?;
        let mut feed: Vec<(String, ort::value::DynValue)> = Vec::new();
        for (b, ty, dims) in &specs {
            let mut shape: Option<Vec<usize>> = None;
            let mut data = Vec::new();
            for &i in idx {
                let rec = &records[i];
                let v = rec.field(&b.field).ok_or_else(|| {
                    origin.invalid(rec, format!("record has no `{}` field", b.field))
                })?;
                let (s, d) = flatten(v)
                    .map_err(|e| origin.invalid(rec, format!("field `{}`: {e}", b.field)))?;
                let fits = s.len() + 1 == dims.len()
                    && s.iter()
                        .zip(&dims[1..])
                        .all(|(&a, &m)| m < 0 || a as i64 == m);
                if !fits {
                    return Err(origin.invalid(
                        rec,
                        format!(
                            "field `{}` has shape {s:?}; model input `{}` takes {:?} per record",
                            b.field,
                            b.name,
                            &dims[1.min(dims.len())..]
                        ),
                    ));
                }
                if let Some(prev) = &shape
                    && *prev != s
                {
                    return Err(origin.invalid(
                        rec,
                        format!(
                            "field `{}` has shape {s:?}, other records {prev:?}",
                            b.field
                        ),
                    ));
                }
                shape = Some(s);
                data.extend(d);
            }
            let mut full = vec![idx.len()];
            full.extend(shape.unwrap_or_default());
            let value = if *ty == Some(TensorElementType::Int64) {
                Tensor::from_array((full, data.iter().map(|&x| x as i64).collect::<Vec<_>>()))
                    .map_err(inference_error)?
                    .into_dyn()
            } else {
                Tensor::from_array((full, data.iter().map(|&x| x as f32).collect::<Vec<_>>()))
                    .map_err(inference_error)?
                    .into_dyn()
            };
            feed.push((b.name.clone(), value));
        }
        let run = Instant::now();
        let out = session.run(feed).map_err(inference_error)?;
        control.metrics.observe_batch(idx.len(), run.elapsed());
        for name in &out_names {
            let value = &out[name.as_str()];
            let n = idx.len();
            let split = |shape: &[i64]| -> Result<Vec<usize>, ShardError> {
                let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
                if dims.first() != Some(&n) {
                    return Err(model_err(format!(
                        "output `{name}` has shape {dims:?}; its first dimension must be the batch"
                    )));
                }
                Ok(dims[1..].to_vec())
            };
            if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
                let rest = split(shape)?;
                let step = rest.iter().product::<usize>();
                for (row, &i) in idx.iter().enumerate() {
                    result[i].insert(
                        name.clone(),
                        nest(&rest, &data[row * step..(row + 1) * step]),
                    );
                }
            } else if let Ok((shape, data)) = value.try_extract_tensor::<i64>() {
                let rest = split(shape)?;
                let step = rest.iter().product::<usize>();
                for (row, &i) in idx.iter().enumerate() {
                    result[i].insert(
                        name.clone(),
                        nest(&rest, &data[row * step..(row + 1) * step]),
                    );
                }
            } else {
                return Err(model_err(format!(
                    "output `{name}` is neither float32 nor int64"
                )));
            }
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_arrays_flatten_and_nest_back() {
        let v = json!([[1, 2, 3], [4, 5, 6]]);
        let (shape, data) = flatten(&v).expect("flat");
        assert_eq!(shape, [2, 3]);
        let back = nest(&shape, &data.iter().map(|&x| x as i64).collect::<Vec<_>>());
        assert_eq!(back, v);
    }

    #[test]
    fn ragged_and_non_numeric_arrays_are_refused() {
        assert!(
            flatten(&json!([[1], [1, 2]]))
                .unwrap_err()
                .contains("ragged")
        );
        assert!(flatten(&json!(["a"])).unwrap_err().contains("a string"));
    }
}
