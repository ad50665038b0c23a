"""Paper venue: a hedging MetaTrader-5-like account engine driven by real price data."""
