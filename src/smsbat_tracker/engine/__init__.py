"""The engine: a tracking's session, a check, settle and dispatch, campaigns. Celery-free."""
