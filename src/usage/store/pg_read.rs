//! The queries' connection to PostgreSQL (`usage_store.backend: postgres`): the [`Db`] the
//! query model runs on, made at the first query and again after it is lost.

use super::db::{numbered, Db, Param, Row};
use super::postgres::{connect, kept, settings};
use super::StoreError;
use ::postgres::types::ToSql;
use ::postgres::{Client, Statement};
use std::collections::HashMap;

/// A query of the admin or key-holder routes may run this long.
const QUERY_TIMEOUT: &str = "30s";

/// A connection for the queries: made at the first query and again after it is lost; its
/// statements prepared once (at most [`PgReader::STATEMENTS`] kept).
pub struct PgReader {
    config: ::postgres::Config,
    at: String,
    client: Option<Client>,
    statements: HashMap<String, Statement>,
}

impl PgReader {
    /// Statements kept prepared at most (past it, all are forgotten).
    pub const STATEMENTS: usize = 64;

    /// A reader for `url` (checked here; connected at the first query).
    pub fn new(url: &str) -> Result<PgReader, StoreError> {
        let (config, at) = settings(url)?;
        Ok(PgReader {
            config,
            at,
            client: None,
            statements: HashMap::new(),
        })
    }

    fn error(&self, source: ::postgres::Error) -> StoreError {
        StoreError::Postgres {
            at: self.at.clone(),
            source,
        }
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<::postgres::Row>, QueryFailed> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            self.statements.clear();
            let mut c = connect(&self.config).map_err(QueryFailed::Connect)?;
            c.batch_execute(&format!("SET statement_timeout = '{QUERY_TIMEOUT}'"))
                .map_err(QueryFailed::Postgres)?;
            self.client = Some(c);
        }
        let Some(client) = self.client.as_mut() else {
            return Err(QueryFailed::Connect("no connection".into()));
        };
        let stmt = match self.statements.get(sql) {
            Some(s) => s.clone(),
            None => {
                let s = client.prepare(sql).map_err(QueryFailed::Postgres)?;
                if self.statements.len() >= Self::STATEMENTS {
                    self.statements.clear();
                }
                self.statements.insert(sql.to_string(), s.clone());
                s
            }
        };
        client.query(&stmt, params).map_err(QueryFailed::Postgres)
    }
}

enum QueryFailed {
    Connect(String),
    Postgres(::postgres::Error),
}

impl Row for ::postgres::Row {
    fn int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        self.try_get(i)
            .map_err(|e| StoreError::Other(format!("column {i}: {e}")))
    }

    fn text(&self, i: usize) -> Result<Option<String>, StoreError> {
        self.try_get(i)
            .map_err(|e| StoreError::Other(format!("column {i}: {e}")))
    }

    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        self.try_get(i)
            .map_err(|e| StoreError::Other(format!("column {i}: {e}")))
    }
}

impl Db for PgReader {
    fn select(
        &mut self,
        sql: &str,
        params: &[Param],
        each: &mut dyn FnMut(&dyn Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let sql = numbered(sql);
        let values: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| match p {
                Param::Int(v) => v as &(dyn ToSql + Sync),
                Param::Text(v) => v as &(dyn ToSql + Sync),
            })
            .collect();
        let mut answer = self.query(&sql, &values);
        // A connection lost since the last query (PostgreSQL restarted): once more, anew.
        if let Err(QueryFailed::Postgres(e)) = &answer {
            if kept(e).0 {
                self.client = None;
                answer = self.query(&sql, &values);
            }
        }
        let rows = match answer {
            Ok(rows) => rows,
            Err(QueryFailed::Connect(e)) => {
                return Err(StoreError::Other(format!(
                    "PostgreSQL {}: cannot connect: {e}",
                    self.at
                )))
            }
            Err(QueryFailed::Postgres(e)) => {
                if kept(&e).0 {
                    self.client = None;
                }
                return Err(self.error(e));
            }
        };
        for r in &rows {
            each(r)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.at.clone()
    }
}
