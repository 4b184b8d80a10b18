"""The Celery face: the tracker on an app, task names, the tasks, the re-driver, patches."""
