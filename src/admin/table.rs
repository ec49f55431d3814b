//! Result sets the admin console sends: a RowDescription, DataRows and a
//! CommandComplete, encoded with pgwire's message types.

use bytes::{BufMut, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};

use crate::protocol::messages::put_command_complete;

const TEXT_OID: u32 = 25;
const INT8_OID: u32 = 20;

/// One value.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// text
    Text(String),
    /// integer (psql aligns it right)
    Int(i64),
    /// SQL NULL
    Null,
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::Text(s.to_owned())
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::Text(s)
    }
}

impl From<i64> for Cell {
    fn from(n: i64) -> Cell {
        Cell::Int(n)
    }
}

impl From<usize> for Cell {
    fn from(n: usize) -> Cell {
        Cell::Int(n as i64)
    }
}

impl<T: Into<Cell>> From<Option<T>> for Cell {
    fn from(v: Option<T>) -> Cell {
        v.map_or(Cell::Null, Into::into)
    }
}

/// Column names and types (integer columns are named in `int_columns`).
#[derive(Debug, Clone)]
pub struct ResultSet {
    columns: Vec<(&'static str, bool)>,
    rows: Vec<Vec<Cell>>,
}

impl ResultSet {
    /// A result with these columns; those ending in `#` are integers (the `#` is dropped).
    pub fn new(columns: &[&'static str]) -> ResultSet {
        ResultSet {
            columns: columns
                .iter()
                .map(|c| match c.strip_suffix('#') {
                    Some(name) => (name, true),
                    None => (*c, false),
                })
                .collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; it must have one cell per column.
    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    /// Rows so far.
    pub fn rows(&self) -> &[Vec<Cell>] {
        &self.rows
    }

    /// Appends the whole result, ending with CommandComplete `SHOW`.
    pub fn encode(&self, out: &mut BytesMut) {
        let fields = self
            .columns
            .iter()
            .map(|(name, int)| {
                FieldDescription::new(
                    (*name).to_owned(),
                    0,
                    0,
                    if *int { INT8_OID } else { TEXT_OID },
                    if *int { 8 } else { -1 },
                    -1,
                    0,
                )
            })
            .collect();
        encode(out, &RowDescription::new(fields));
        for row in &self.rows {
            let mut data = BytesMut::new();
            for cell in row {
                let text = match cell {
                    Cell::Text(s) => Some(s.clone()),
                    Cell::Int(n) => Some(n.to_string()),
                    Cell::Null => None,
                };
                match text {
                    Some(t) => {
                        data.put_i32(t.len() as i32);
                        data.put_slice(t.as_bytes());
                    }
                    None => data.put_i32(-1),
                }
            }
            encode(out, &DataRow::new(data, row.len() as i16));
        }
        put_command_complete(out, "SHOW");
    }
}

fn encode(out: &mut BytesMut, message: &impl Message) {
    if let Err(e) = message.encode(out) {
        tracing::error!(error = %e, "could not encode an admin result");
    }
}
