"""TLS for DICOM (PS3.15 annex B, the BCP 195 profiles): the server context of our TLS
listener, the client contexts of our SCUs, and plain-language reasons for failed handshakes.

Profiles (``[dicom] tls_profile``, per destination ``tls_profile``):

* ``bcp195`` (default): TLS 1.2 and 1.3, never older (RFC 8996); TLS 1.2 limited to the
  AEAD suites with forward secrecy that BCP 195 recommends (ECDHE/DHE with AES-GCM, and
  ECDHE with ChaCha20-Poly1305). TLS 1.3 is preferred whenever the peer has it.
* ``non-downgrading``: TLS 1.2 and 1.3; TLS 1.2 limited to the four ECDHE AES-GCM suites of
  the Non-downgrading BCP 195 profile (what DCMTK proposes by default).
* ``tls13``: TLS 1.3 only.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from router.settings import TLS_PROFILES, TlsServerSettings

BCP195_SUITES = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
NON_DOWNGRADING_SUITES = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
))


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used (named, without its contents)."""


def _apply_profile(context: ssl.SSLContext, profile: str) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    if profile == "tls13":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    elif profile == "non-downgrading":
        context.set_ciphers(NON_DOWNGRADING_SUITES)
    elif profile == "bcp195":
        context.set_ciphers(BCP195_SUITES)
    else:
        raise TlsConfigError(f"unknown TLS profile {profile!r}")
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load_chain(context: ssl.SSLContext, certificate: Path | None,
                private_key: Path | None) -> None:
    if certificate is None and private_key is None:
        return
    if certificate is None or private_key is None:
        raise TlsConfigError("a TLS certificate needs its private key, and the other way round")
    try:
        context.load_cert_chain(certificate, private_key)
    except FileNotFoundError as exc:
        raise TlsConfigError(f"{exc.filename}: no such file") from None
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{certificate} / {private_key}: not a matching PEM certificate "
                             f"and private key ({exc.reason or exc})") from None


def _load_cas(context: ssl.SSLContext, ca_certificates: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except FileNotFoundError:
        raise TlsConfigError(f"{ca_certificates}: no such file") from None
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{ca_certificates}: not a PEM CA bundle "
                             f"({exc.reason or exc})") from None


def server_context(certificate: Path, private_key: Path, ca_certificates: Path | None,
                   verify_clients: bool, profile: str) -> ssl.SSLContext:
    """Our listener's context. With ``ca_certificates``, a client certificate is asked for and
    verified when sent; with ``verify_clients`` one is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_profile(context, profile)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, certificate, private_key)
    if ca_certificates is not None:
        _load_cas(context, ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if verify_clients else ssl.CERT_OPTIONAL
    return context


def client_context(ca_certificates: Path | None, certificate: Path | None = None,
                   private_key: Path | None = None, profile: str = "bcp195",
                   verify_hostname: bool = True) -> ssl.SSLContext:
    """A context for connecting to a TLS peer: its certificate is always verified (against
    ``ca_certificates``, else the system's CAs) and, by default, its host name too."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_profile(context, profile)
    if ca_certificates is not None:
        _load_cas(context, ca_certificates)
    else:
        context.load_default_certs()
    context.check_hostname = verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_chain(context, certificate, private_key)
    return context


def peer_subject(sock: ssl.SSLSocket) -> str:
    """The verified peer certificate's subject as ``CN=...,O=...`` ("" when none was sent)."""
    try:
        cert = sock.getpeercert()
    except (ValueError, ssl.SSLError):
        return ""
    if not cert:
        return ""
    parts = []
    for rdn in cert.get("subject", ()):
        for pair in rdn:
            key, value = str(pair[0]), str(pair[1])
            parts.append(f"{_SHORT_NAMES.get(key, key)}={_printable(value)}")
    return ",".join(parts)


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
                "emailAddress": "emailAddress", "serialNumber": "serialNumber"}


def _printable(text: str) -> str:
    """A subject value with control characters and separators made harmless for logs."""
    return "".join(c if c.isprintable() and c not in ",=\\" else "?" for c in text)[:128]


def describe_failure(exc: BaseException) -> str:
    """A plain-language reason for a failed handshake or verification (no secrets)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = str(exc.verify_message or exc.reason or "verification failed")
        return f"peer certificate refused: {message}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "").lower().replace("_", " ")
        if "alert" in reason and ("certificate" in reason or "unknown ca" in reason):
            return f"the peer refused our certificate ({reason})"
        if "alert" in reason:
            return f"the peer ended the handshake ({reason})"
        if "peer did not return a certificate" in reason or "certificate required" in reason:
            return "no client certificate sent (this listener requires one)"
        if "version" in reason or "protocol" in reason:
            return f"no TLS version in common ({reason})"
        if "cipher" in reason or "handshake failure" in reason:
            return f"no cipher suite in common ({reason})"
        return f"TLS handshake failed ({reason or type(exc).__name__})"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return f"TLS connection failed ({type(exc).__name__})"


def listener_context(settings: TlsServerSettings) -> ssl.SSLContext:
    """The context of the DICOM TLS listener described by ``[dicom] tls_*``."""
    return server_context(settings.certificate, settings.private_key, settings.ca_certificates,
                          settings.verify_clients, settings.profile)


@dataclass(frozen=True)
class TlsClientSettings:
    """How we open a TLS association to a peer (a DICOM destination or a remote node), from
    its ``tls_*`` settings; the peer's certificate and host name are always verified."""

    ca_certificates: str = ""  # PEM bundle its certificate chains to; "": the system's CAs
    certificate: str = ""  # ours, when the peer asks for a client certificate (PEM)
    private_key: str = ""
    profile: str = "bcp195"
    server_name: str = ""  # the name its certificate carries, if not the configured host

    @classmethod
    def of(cls, settings: object) -> TlsClientSettings | None:
        """From an object with ``tls`` and ``tls_*`` attributes; None when TLS is off."""
        if not getattr(settings, "tls", False):
            return None
        return cls(**{key: str(getattr(settings, f"tls_{key}", "") or default)
                      for key, default in (("ca_certificates", ""), ("certificate", ""),
                                           ("private_key", ""), ("profile", "bcp195"),
                                           ("server_name", ""))})

    def problems(self) -> dict[str, str]:
        """``tls_<field>`` -> what is wrong, checked by building the context once."""
        if self.profile not in TLS_PROFILES:
            return {"tls_profile": f"one of {', '.join(TLS_PROFILES)}"}
        if bool(self.certificate) != bool(self.private_key):
            missing = "tls_private_key" if self.certificate else "tls_certificate"
            return {missing: "a client certificate needs both tls_certificate and "
                             "tls_private_key"}
        try:
            self.context()
        except TlsConfigError as exc:
            field = ("tls_ca_certificates" if self.ca_certificates and
                     self.ca_certificates in str(exc) else "tls_certificate")
            return {field: str(exc)}
        return {}

    def context(self) -> ssl.SSLContext:
        def path(text: str) -> Path | None:
            return Path(text).expanduser() if text else None

        return client_context(path(self.ca_certificates), path(self.certificate),
                              path(self.private_key), self.profile)
