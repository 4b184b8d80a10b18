"""The tools, apart from the product: the sandbox API, the demo, a local Redis, a worker process."""
