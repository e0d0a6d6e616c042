"""vLLM patches, one module per concern, grouped by when they apply; tables.py assembles them per release."""
