"""The store: Redis connections, key names, the Lua scripts, the status cache and rate limit."""
