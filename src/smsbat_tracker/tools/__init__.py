"""The tools, apart from the product: the sandbox API, the demo, an embedded Redis."""
