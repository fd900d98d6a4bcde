"""kbfs.tlsconf.advice: the one line for a refused certificate, and None for anything else.

advice() walks an exception's causes, context, args and `reason` looking for an
ssl.SSLCertVerificationError. What it walks comes from other libraries: trio-websocket's
ConnectionClosed carries a CloseReason (not an exception) as its arg and its `reason`; the
share's reconnect loop passes such errors to advice() when a relay restarts, and an
AttributeError there killed the share (test_share::test_relay_restart_share_comes_back).
The real handshakes are in tests/test_deploy_tls.py; these are the walk's odd shapes.
"""

from __future__ import annotations

import ssl

import trio_websocket

from kbfs import tlsconf


def _refused(message: str) -> ssl.SSLCertVerificationError:
    err = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    err.verify_message = message
    return err


def test_a_closed_websocket_is_no_certificate_failure() -> None:
    closed = trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1006, "relay went away"))
    assert tlsconf.advice(closed) is None
    assert tlsconf.advice(trio_websocket.ConnectionClosed(None)) is None
    try:                                  # as the share sees it: raised while handling another
        try:
            raise closed
        except trio_websocket.ConnectionClosed as inner:
            raise OSError("reconnect failed") from inner
    except OSError as outer:
        assert tlsconf.advice(outer) is None


def test_odd_args_and_cycles_are_walked_safely() -> None:
    odd = ValueError(object(), None, 3, "text")
    assert tlsconf.advice(odd) is None
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a   # a cycle ends
    assert tlsconf.advice(a) is None


def test_a_refused_certificate_anywhere_in_the_chain_says_what_to_do() -> None:
    err = _refused("self-signed certificate in certificate chain")
    group = ExceptionGroup("connect", [trio_websocket.ConnectionClosed(None), OSError(err)])
    line = tlsconf.advice(group, "relay https://127.0.0.1:1")
    assert line is not None and line.startswith("relay https://127.0.0.1:1: TLS certificate refused")
    assert "SSL_CERT_FILE" in line and "\n" not in line
    expired = tlsconf.advice(_refused("certificate has expired"))
    assert expired is not None and "renew" in expired
