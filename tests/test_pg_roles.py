"""The service's PostgreSQL role as the README grants it: it ingests, answers and erases
(through the audited `mt_forget`), and cannot update or delete events itself."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from actors import Microtune
from events import Candidate, Event, Query, TuningConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = TuningConfig(version=1, dim=3)


def readme_grants() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```sql\n(-- microtune: the service's role.*?)```", text, re.S)
    assert match, "the README's grants block is gone"
    return match.group(1)


def test_the_service_role_needs_no_update_or_delete_on_the_log(pg_url):
    import psycopg

    schema = re.search(r"search_path%3D(\w+)", pg_url).group(1)
    role = f"mt_svc_{uuid.uuid4().hex[:8]}"
    dsn = pg_url.split("?")[0].replace("postgresql+psycopg://", "postgresql://")
    with Microtune.open(pg_url, CFG) as owner:  # the owner creates tables and mt_forget
        owner.track_many([Event(id="e0", user="bob", t=1.0, kind="click", item="a",
                                x=np.ones(3))])
    grants = readme_grants().replace("microtune_service", role).replace("microtune.",
                                                                         f"{schema}.")
    grants = grants.replace("SCHEMA microtune ", f"SCHEMA {schema} ")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(grants)
    service_url = pg_url.replace("postgres@", f"{role}@")
    try:
        with Microtune.open(service_url, CFG) as mt:
            outcomes = mt.track_many([Event(id=f"e{i}", user="ann", t=10.0 + i, kind="click",
                                            item="a", x=np.array([1.0, 0, 0]))
                                      for i in range(5)])
            assert {o.status for o in outcomes} == {"applied"}
            ranking = mt.rank(Query("ann", (Candidate("a", np.array([1.0, 0, 0])),
                                            Candidate("b", np.array([0, 1.0, 0])))))
            assert ranking.items == ("a", "b") and ranking.seq == 5
            mt.catalog.upsert([("c", np.zeros(3))])
            mt.start_experiment("x", [("control", "no-adjust"), ("b", "current")])
            logged = mt.rank(Query("ann", (Candidate("a", np.array([1.0, 0, 0])),), log=True))
            assert logged.rid is not None and logged.arm is not None
            mt.stop_experiment("x")
            erased = mt.forget("bob", by="test", why="grants")
            assert erased["events"] == 1
        with psycopg.connect(dsn.replace("postgres@", f"{role}@"), autocommit=True) as svc:
            svc.execute(f"SET search_path TO {schema}")
            for statement in ("DELETE FROM mt_events", "UPDATE mt_events SET body = ''",
                              "DELETE FROM mt_audit", "TRUNCATE mt_events",
                              "DELETE FROM mt_experiments",
                              "UPDATE mt_experiments SET body = ''"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    svc.execute(statement)
            assert svc.execute("SELECT count(*) FROM mt_events").fetchone()[0] == 6
        with psycopg.connect(dsn, autocommit=True) as admin:  # nobody else may erase
            other = f"mt_other_{uuid.uuid4().hex[:8]}"
            admin.execute(f"CREATE ROLE {other} LOGIN")
            admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {other}")
        try:
            with psycopg.connect(dsn.replace("postgres@", f"{other}@"), autocommit=True) as o:
                o.execute(f"SET search_path TO {schema}")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    o.execute("SELECT * FROM mt_forget('ann', '')")
        finally:
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute(f"DROP OWNED BY {other}")
                admin.execute(f"DROP ROLE {other}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
