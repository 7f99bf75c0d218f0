"""Standing attack suite: hostile clients and backends against a real ftpfix process."""
