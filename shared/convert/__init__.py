"""Dataset and model-layout converters (medalign-data)."""
