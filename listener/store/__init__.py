"""Persistence in PostgreSQL: connections, schema migrations, tiles, processed_log."""
