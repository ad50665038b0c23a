"""Signal sources beyond terminals: TradingView alerts and candle strategies driving paper masters."""
