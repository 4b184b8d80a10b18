"""Orders: placing one sends its confirmation by SMS, tracked to delivery."""
