"""Customers and their one-time login codes: by SMS, by e-mail when the SMS does not arrive."""
