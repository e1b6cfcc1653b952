"""Who is on the other end of a connection the front door hands to a receiver: its id (for
counting it back), its address as we believe it (after a trusted PROXY header) and, over TLS,
the subject of its verified certificate. Travels with the descriptor as one short text line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    conn_id: int
    host: str
    port: int
    tls: bool = False
    tls_subject: str = ""  # "" when plain, or when the peer sent no certificate

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def encode(self) -> bytes:
        subject = self.tls_subject.replace("\t", " ").replace("\n", " ")
        return "\t".join((str(self.conn_id), self.host, str(self.port),
                          "1" if self.tls else "0", subject)).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes) -> Peer:
        conn_id, host, port, tls, subject = raw.decode("utf-8").split("\t", 4)
        return cls(int(conn_id), host, int(port), tls == "1", subject)
