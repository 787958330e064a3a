"""Queries mkflow's Flight SQL endpoint as a Python user would: the ADBC Flight SQL driver
(adbc-driver-flightsql + adbc-driver-manager, pyarrow, pandas; see .ci/run).

Usage: python3 tests/flight_adbc.py grpc://HOST:PORT TOKEN DOC_ID

Prints one JSON object of what it read; tests/flight_sql.rs compares it with /v1/sql.
"""

import json
import sys

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa

uri, token, doc_id = sys.argv[1:4]
out = {}
with flight_sql.connect(uri, db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {token}"}) as conn:
    with conn.cursor() as cur:
        # A search with its query text inline, then the same search prepared with the text bound.
        cur.execute("SELECT doc_id, score FROM vector_search(kb, 'protein folding in cells', 5)")
        out["inline"] = cur.fetch_arrow_table().to_pydict()
        cur.execute("SELECT doc_id, score FROM vector_search(kb, $1, 5)", parameters=("protein folding in cells",))
        out["text_parameter"] = cur.fetch_arrow_table().to_pydict()

        # A stored vector, bound as the query of a search: the document finds itself first.
        cur.execute("SELECT embedding FROM kb WHERE doc_id = $1", parameters=(doc_id,))
        vector = cur.fetch_arrow_table().column("embedding")[0].as_py()
        bound = pa.record_batch([pa.array([vector], type=pa.list_(pa.float32()))], names=["$1"])
        cur.execute("SELECT doc_id, score FROM vector_search(kb, $1, 3)", parameters=bound)
        out["vector_parameter"] = cur.fetch_arrow_table().to_pydict()

        # The README's example: a search into pandas.
        cur.execute("SELECT doc_id, title, fused_score FROM hybrid_search(kb, $1, 4)", parameters=("cell biology",))
        frame = cur.fetch_df()
        out["pandas"] = {"rows": len(frame), "columns": list(frame.columns)}

    # Catalog metadata, as tools browse it.
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    out["tables"] = sorted(
        table["table_name"]
        for catalog in objects
        for schema in catalog["catalog_db_schemas"]
        for table in schema["db_schema_tables"]
    )
    out["kb_columns"] = conn.adbc_get_table_schema("kb").names
    out["vendor"] = conn.adbc_get_info()["vendor_name"]

print(json.dumps(out))
