//! The catalog metadata Flight SQL clients ask for before they query (a driver's
//! `get_objects`, a BI tool's table tree): catalogs, schemas, tables with their Arrow schemas
//! and table types, read from the asking connection's session, and what the server is
//! (`GetSqlInfo`). The filters a client sends (catalog, name patterns, table types) are applied
//! by arrow-flight's builders.

use std::sync::LazyLock;

use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{
    GetCatalogsBuilder, GetDbSchemasBuilder, GetTablesBuilder, SqlInfoData, SqlInfoDataBuilder,
};
use arrow_flight::sql::{SqlInfo, SqlSupportedTransaction};
use datafusion::arrow::array::RecordBatch;
use datafusion::datasource::TableType;
use datafusion::prelude::SessionContext;

/// What `GetSqlInfo` answers.
pub static SQL_INFO: LazyLock<SqlInfoData> = LazyLock::new(|| {
    let mut info = SqlInfoDataBuilder::new();
    info.append(SqlInfo::FlightSqlServerName, "mkflow");
    info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    // The Arrow format version (Schema.fbs), as the Flight SQL specification asks.
    info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    // Writes are allowed to admin tokens.
    info.append(SqlInfo::FlightSqlServerReadOnly, false);
    info.append(SqlInfo::FlightSqlServerSql, true);
    info.append(SqlInfo::FlightSqlServerSubstrait, false);
    info.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    info.append(SqlInfo::FlightSqlServerCancel, false);
    info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    info.append(SqlInfo::SqlDdlCatalog, false);
    info.append(SqlInfo::SqlDdlSchema, false);
    info.append(SqlInfo::SqlDdlTable, true);
    info.build().expect("the server's SqlInfo is well formed")
});

/// The name a Flight SQL client expects for a table type.
pub fn table_type_name(table_type: TableType) -> &'static str {
    match table_type {
        TableType::Base => "TABLE",
        TableType::View => "VIEW",
        TableType::Temporary => "LOCAL TEMPORARY",
    }
}

/// Every catalog of `ctx`.
pub fn catalogs(ctx: &SessionContext, mut builder: GetCatalogsBuilder) -> Result<RecordBatch, FlightError> {
    for catalog in ctx.catalog_names() {
        builder.append(catalog);
    }
    builder.build()
}

/// Every schema of every catalog of `ctx`.
pub fn schemas(ctx: &SessionContext, mut builder: GetDbSchemasBuilder) -> Result<RecordBatch, FlightError> {
    for catalog_name in ctx.catalog_names() {
        let Some(catalog) = ctx.catalog(&catalog_name) else {
            continue;
        };
        for schema in catalog.schema_names() {
            builder.append(&catalog_name, schema);
        }
    }
    builder.build()
}

/// Every table of `ctx`, with its type and Arrow schema.
pub async fn tables(ctx: &SessionContext, mut builder: GetTablesBuilder) -> Result<RecordBatch, FlightError> {
    for catalog_name in ctx.catalog_names() {
        let Some(catalog) = ctx.catalog(&catalog_name) else {
            continue;
        };
        for schema_name in catalog.schema_names() {
            let Some(schema) = catalog.schema(&schema_name) else {
                continue;
            };
            for table_name in schema.table_names() {
                // A table dropped meanwhile is no longer listed.
                let Ok(Some(table)) = schema.table(&table_name).await else {
                    continue;
                };
                builder.append(
                    &catalog_name,
                    &schema_name,
                    &table_name,
                    table_type_name(table.table_type()),
                    &table.schema(),
                )?;
            }
        }
    }
    builder.build()
}

/// The table types [`tables`] reports.
pub const TABLE_TYPES: [&str; 3] = ["LOCAL TEMPORARY", "TABLE", "VIEW"];
