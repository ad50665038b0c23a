"""The ledger: every account's history in PostgreSQL, and the statistics built from it."""
