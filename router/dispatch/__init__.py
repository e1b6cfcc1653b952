"""Delivery adapters (one per destination kind) and the dispatcher that drives them."""
