//! Parquet input: rows become Dolma JSON lines (`id`, `text` and every other column), so the
//! stages read Parquet and JSONL through the same line reader.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Decodes a whole Parquet file into JSON lines.
pub fn to_jsonl(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let schema = builder.schema().clone();
    for required in ["id", "text"] {
        if schema.field_with_name(required).is_err() {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            bail!(
                "{}: Parquet file has no `{required}` column (columns: {})",
                path.display(),
                names.join(", ")
            );
        }
    }
    let reader = builder
        .build()
        .with_context(|| format!("{}: cannot read Parquet row groups", path.display()))?;
    let mut out = Vec::new();
    {
        let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
        for batch in reader {
            let batch =
                batch.with_context(|| format!("{}: corrupt Parquet data", path.display()))?;
            writer.write(&batch).with_context(|| {
                format!("{}: cannot convert Parquet rows to JSON", path.display())
            })?;
        }
        writer.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn write(path: &Path, with_text: bool) {
        let mut fields = vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ];
        let mut cols: Vec<arrow::array::ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["a", "b"])),
            Arc::new(Int64Array::from(vec![1, 2])),
        ];
        if with_text {
            fields.push(Field::new("text", DataType::Utf8, false));
            cols.push(Arc::new(StringArray::from(vec!["héllo", "world"])));
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
        let f = File::create(path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn rows_become_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.parquet");
        write(&p, true);
        let text = String::from_utf8(to_jsonl(&p).unwrap()).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["id"], "a");
        assert_eq!(rows[0]["text"], "héllo");
        assert_eq!(rows[1]["n"], 2);
    }

    #[test]
    fn missing_text_column_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("y.parquet");
        write(&p, false);
        let e = to_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("no `text` column") && e.contains("id, n"), "{e}");
    }
}
