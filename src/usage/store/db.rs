//! What the queries ask of a database, so one query model ([`super::query`]) answers from
//! SQLite and from PostgreSQL: run a `SELECT` written once, with `?` placeholders, and hand
//! each row to the caller, who reads its columns by index.

use super::StoreError;

/// A value bound to a `?` of a query.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    /// A whole number (every number column is a 64-bit integer on both backends).
    Int(i64),
    /// Text.
    Text(String),
}

/// One row of an answer, read by column index (from 0).
pub trait Row {
    /// A number column (`None` for NULL).
    fn int(&self, i: usize) -> Result<Option<i64>, StoreError>;
    /// A text column (`None` for NULL).
    fn text(&self, i: usize) -> Result<Option<String>, StoreError>;
    /// A true/false column.
    fn flag(&self, i: usize) -> Result<bool, StoreError>;
}

/// A database the queries run on: the SQLite file's reader, or a PostgreSQL connection.
pub trait Db {
    /// Run `sql` (placeholders `?`, bound in order to `params`) and call `each` on every row,
    /// in order; an error of `each` ends the query and is returned.
    fn select(
        &mut self,
        sql: &str,
        params: &[Param],
        each: &mut dyn FnMut(&dyn Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;

    /// What the store is (the file, or the database's address without its password), for
    /// messages.
    fn describe(&self) -> String;
}

/// `sql` with its `?` placeholders numbered in order: `$1`, `$2`, … (PostgreSQL's). The
/// queries' SQL has no `?` inside a literal.
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(
            super::numbered("a >= ? AND b = ? LIMIT 5"),
            "a >= $1 AND b = $2 LIMIT 5"
        );
        assert_eq!(super::numbered("no params"), "no params");
    }
}
