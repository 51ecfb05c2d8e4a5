"""The History of answers: each answer's `Result` as JSON, with its question and collection. `Store` inherits it."""
from __future__ import annotations

import json
import time


class RunsMixin:
    """Recorded answers in a `Store` (its `rows` and `transaction`)."""

    def add_run(self, collection_id: int | None, question: str, result: dict) -> None:
        with self.transaction():
            self.db.execute("INSERT INTO runs (collection_id, question, method, model, result, created) VALUES (?,?,?,?,?,?)",
                            (collection_id, question, result.get("method", ""), result.get("model", ""),
                             json.dumps(result), time.time()))

    def runs(self, collection_id: int | None = None, limit: int = 50) -> list[dict]:
        where, params = ("WHERE collection_id = ?", (collection_id,)) if collection_id is not None else ("", ())
        rows = self.rows(f"SELECT id, question, method, model, result, created FROM runs {where} ORDER BY id DESC LIMIT ?",
                         (*params, limit))
        for row in rows:
            row["result"] = json.loads(row["result"])
        return rows
