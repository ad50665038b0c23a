"""Bridge protocol conformance suite: what every terminal-side implementation must do."""
