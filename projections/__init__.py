"""Read side: SQL views built from the event log, the projection runner, rebuilds."""
