"""DICOM router: receive, route by rules, deliver with retries; every step an event."""
