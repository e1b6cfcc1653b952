"""ATNA: DICOM audit messages (PS3.15 A.5) built from the audit view and sent to an audit
record repository by syslog (RFC 5424 over TLS, RFC 5425, or UDP, RFC 5426)."""
