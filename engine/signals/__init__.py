"""Signal sources beyond terminals: TradingView alerts and strategies run once per candle."""
