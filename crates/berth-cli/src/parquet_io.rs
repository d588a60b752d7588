//! Parquet through the `parquet` / `arrow` crates: the columns `--input FILE.parquet` needs
//! as JSON values, and `embed --output FILE.parquet` (index, ids and kept columns, and the
//! vectors as a fixed-size list column).
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{
    Array, ArrayRef, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, Float64Array,
    Int64Array, Int8Array, RecordBatch, StringArray, UInt8Array,
};
use arrow_schema::{DataType, Field, Schema};
use berth_tasks::quantize::VectorDtype;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use serde_json::Value;

/// Columns of a Parquet file, as JSON values (null where the file has none).
pub struct Table {
    /// Rows in the file.
    pub rows: usize,
    /// The requested columns by the name they were asked for.
    pub columns: HashMap<String, Vec<Value>>,
}

/// Reads the columns `wanted` (header names, or 0-based indices as with CSV) of the Parquet
/// file `path`; only those columns are decoded.
pub fn read_columns(path: &str, wanted: &[&str]) -> anyhow::Result<Table> {
    if path == "-" {
        bail!("Parquet input is read from a file, not stdin (the footer is at the end)");
    }
    berth_text::limits::regular_file(Path::new(path), u64::MAX)
        .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    let file = std::fs::File::open(path).with_context(|| format!("{path}: cannot read"))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow::anyhow!("{path}: not a readable Parquet file: {e}"))?;
    let fields: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut roots = Vec::new();
    for col in wanted {
        let i = fields
            .iter()
            .position(|f| f == col)
            .or_else(|| col.parse().ok().filter(|&i: &usize| i < fields.len()))
            .with_context(|| {
                format!("{path}: no column {col:?} (columns: {})", fields.join(", "))
            })?;
        roots.push(i);
    }
    let leaf_of_root = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
    let reader = builder
        .with_projection(leaf_of_root)
        .build()
        .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    let mut columns: HashMap<String, Vec<Value>> =
        wanted.iter().map(|c| (c.to_string(), Vec::new())).collect();
    let mut rows = 0;
    for batch in reader {
        let batch = batch.map_err(|e| anyhow::anyhow!("{path}: row {}: {e}", rows + 1))?;
        for (col, &root) in wanted.iter().zip(&roots) {
            let name = &fields[root];
            let array = batch
                .column_by_name(name)
                .with_context(|| format!("{path}: column {name:?} missing from a row group"))?;
            let values =
                json_values(array.as_ref()).with_context(|| format!("{path}: column {name:?}"))?;
            columns
                .get_mut(*col)
                .expect("inserted above")
                .extend(values);
        }
        rows += batch.num_rows();
    }
    Ok(Table { rows, columns })
}

/// An Arrow array's values as JSON: strings, numbers, booleans, null; other types (dates,
/// lists, ...) as their display text.
fn json_values(a: &dyn Array) -> anyhow::Result<Vec<Value>> {
    let n = a.len();
    let all = |f: &dyn Fn(usize) -> Value| -> Vec<Value> {
        (0..n)
            .map(|i| if a.is_null(i) { Value::Null } else { f(i) })
            .collect()
    };
    macro_rules! numbers {
        ($t:ty) => {{
            let p = a.as_primitive::<$t>();
            all(&|i| serde_json::json!(p.value(i)))
        }};
    }
    Ok(match a.data_type() {
        DataType::Null => vec![Value::Null; n],
        DataType::Utf8 => {
            let s = a.as_string::<i32>();
            all(&|i| Value::String(s.value(i).into()))
        }
        DataType::LargeUtf8 => {
            let s = a.as_string::<i64>();
            all(&|i| Value::String(s.value(i).into()))
        }
        DataType::Utf8View => {
            let s = a.as_string_view();
            all(&|i| Value::String(s.value(i).into()))
        }
        DataType::Boolean => {
            let b = a.as_boolean();
            all(&|i| Value::Bool(b.value(i)))
        }
        DataType::Int8 => numbers!(Int8Type),
        DataType::Int16 => numbers!(Int16Type),
        DataType::Int32 => numbers!(Int32Type),
        DataType::Int64 => numbers!(Int64Type),
        DataType::UInt8 => numbers!(UInt8Type),
        DataType::UInt16 => numbers!(UInt16Type),
        DataType::UInt32 => numbers!(UInt32Type),
        DataType::UInt64 => numbers!(UInt64Type),
        DataType::Float16 => {
            let p = a.as_primitive::<Float16Type>();
            all(&|i| serde_json::json!(p.value(i).to_f32()))
        }
        DataType::Float32 => numbers!(Float32Type),
        DataType::Float64 => numbers!(Float64Type),
        // pandas' categoricals: decoded to their values.
        DataType::Dictionary(_, values) => {
            let plain = arrow_cast::cast(a, values)?;
            json_values(plain.as_ref())?
        }
        _ => {
            let f = arrow_cast::display::ArrayFormatter::try_new(
                a,
                &arrow_cast::display::FormatOptions::default(),
            )?;
            all(&|i| Value::String(f.value(i).to_string()))
        }
    })
}

/// One metadata column as an Arrow array: strings, integers, floats or booleans when every
/// non-null value is one, else each value's JSON text.
fn meta_column(values: &[Option<&Value>]) -> (DataType, ArrayRef) {
    let present = || values.iter().flatten().filter(|v| !v.is_null());
    if present().all(|v| v.is_string()) {
        let a: StringArray = values.iter().map(|v| v.and_then(|v| v.as_str())).collect();
        (DataType::Utf8, Arc::new(a))
    } else if present().all(|v| v.is_i64()) {
        let a: Int64Array = values.iter().map(|v| v.and_then(|v| v.as_i64())).collect();
        (DataType::Int64, Arc::new(a))
    } else if present().all(|v| v.is_number()) {
        let a: Float64Array = values.iter().map(|v| v.and_then(|v| v.as_f64())).collect();
        (DataType::Float64, Arc::new(a))
    } else if present().all(|v| v.is_boolean()) {
        let a: BooleanArray = values.iter().map(|v| v.and_then(|v| v.as_bool())).collect();
        (DataType::Boolean, Arc::new(a))
    } else {
        let a: StringArray = values
            .iter()
            .map(|v| v.filter(|v| !v.is_null()).map(|v| v.to_string()))
            .collect();
        (DataType::Utf8, Arc::new(a))
    }
}

/// Writes `embed`'s vectors (`data`: row-major little-endian elements of `dtype`, `dim` per
/// row) to `path` as Parquet: `index`, the metadata columns (`--id-column` as `id`,
/// `--keep-columns`), and `embedding` as a fixed-size list (snappy-compressed).
pub fn write_vectors(
    path: &Path,
    data: &[u8],
    dim: usize,
    dtype: VectorDtype,
    meta: &[serde_json::Map<String, Value>],
) -> anyhow::Result<()> {
    let width = match dtype {
        VectorDtype::F32 => 4,
        VectorDtype::F16 => 2,
        _ => 1,
    };
    let rows = (data.len() / width).checked_div(dim).unwrap_or(0);
    let mut fields = vec![Field::new("index", DataType::Int64, false)];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_iter_values(0..rows as i64))];
    let keys: Vec<&String> = meta.first().map(|m| m.keys().collect()).unwrap_or_default();
    for key in keys {
        let values: Vec<Option<&Value>> = (0..rows)
            .map(|r| meta.get(r).and_then(|m| m.get(key)))
            .collect();
        let (t, a) = meta_column(&values);
        fields.push(Field::new(key.as_str(), t, true));
        columns.push(a);
    }
    let (element, values): (DataType, ArrayRef) = match dtype {
        VectorDtype::F32 => (
            DataType::Float32,
            Arc::new(Float32Array::from_iter_values(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            )),
        ),
        VectorDtype::F16 => (
            DataType::Float16,
            Arc::new(Float16Array::from_iter_values(
                data.chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]])),
            )),
        ),
        VectorDtype::Int8 | VectorDtype::Binary => (
            DataType::Int8,
            Arc::new(Int8Array::from_iter_values(data.iter().map(|&b| b as i8))),
        ),
        VectorDtype::Uint8 | VectorDtype::Ubinary => (
            DataType::UInt8,
            Arc::new(UInt8Array::from_iter_values(data.iter().copied())),
        ),
    };
    let item = Arc::new(Field::new("item", element, false));
    let list = FixedSizeListArray::try_new(item.clone(), dim as i32, values, None)?;
    fields.push(Field::new(
        "embedding",
        DataType::FixedSizeList(item, dim as i32),
        false,
    ));
    columns.push(Arc::new(list));
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let file = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = ArrowWriter::try_new(file, schema, Some(props))?;
    w.write(&batch)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    let file = w
        .into_inner()
        .with_context(|| format!("{}: cannot write", path.display()))?;
    file.sync_all()
        .with_context(|| format!("{}: cannot write", path.display()))
}
