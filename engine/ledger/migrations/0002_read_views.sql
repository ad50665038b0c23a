-- The ledger's read contract: views other services read instead of its tables. Their columns
-- are stable (new ones may be added at the end, none renamed or retyped); the tables behind
-- them may change. Payloads are the contract's msgpack (schemas.codec decodes them).
--
-- tradecopy_ledger_reader may SELECT the views and nothing else of the ledger. A service
-- whose database role is a member of it (the API's migrations grant it to tradecopy_api)
-- reads through the views; a view reads the tables with its owner's rights, so the member
-- needs no right on any table.

DO $$
BEGIN
    CREATE ROLE tradecopy_ledger_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- made by an earlier database of this cluster (roles are cluster-wide)
END
$$;

-- Every fact of an account in time order: the master events it published, the follower
-- orders sent to it, their execution reports, the copy decisions about it and its account
-- states. kind is master_event | follower_order | execution_report | decision |
-- account_state. Filter on account: the filter reaches each table's (account, ts_ns) index.
-- stored_at is when the ledger stored the row: a reader caching what it folded from an
-- account's facts can tell by (count, max(stored_at), sum(stream_seq)) whether any changed.
CREATE VIEW ledger_account_facts AS
    SELECT master AS account, 'master_event'::text AS kind, ts_ns, stream_seq, stored_at,
           payload
      FROM ledger_master_events
    UNION ALL
    SELECT follower, 'follower_order', ts_ns, stream_seq, stored_at, payload
      FROM ledger_follower_orders
    UNION ALL
    SELECT follower, 'execution_report', ts_ns, stream_seq, stored_at, payload
      FROM ledger_execution_reports
    UNION ALL
    SELECT follower, 'decision', ts_ns, stream_seq, stored_at, payload
      FROM ledger_decisions
    UNION ALL
    SELECT account, 'account_state', ts_ns, stream_seq, stored_at, payload
      FROM ledger_account_states;

-- Copy decisions (why a copy was skipped, reduced, or a link paused), one row each, about
-- the follower account they concern; the reason in words is the payload's message.
CREATE VIEW ledger_copy_decisions AS
    SELECT decision_id, follower AS account, master, link_id, outcome, rule, master_event_id,
           ts_ns, stream_seq, payload
      FROM ledger_decisions;

-- Balance and equity of an account over time, in integer minor units of its currency
-- (NULL where the terminal sent a value that is not an amount).
CREATE VIEW ledger_account_balances AS
    SELECT account, ts_ns, currency, balance_minor, equity_minor
      FROM ledger_account_states;

GRANT SELECT ON ledger_account_facts, ledger_copy_decisions, ledger_account_balances
    TO tradecopy_ledger_reader;
