"""Seed inputs: one realistic stream per target, with the parameter bytes each expects."""

from __future__ import annotations

from proxy import proxyproto

_SESSION = (
    b"EHLO client.test\r\nMAIL FROM:<a@b.test> SIZE=100\r\nRCPT TO:<c@dest.test>\r\n"
    b"DATA\r\nSubject: x\r\n\r\n..dot\r\nbody\r\n.\r\n"
    b"BDAT 5\r\nhelloBDAT 3 LAST\r\nxyzAUTH PLAIN\r\ndGVzdA==\r\nRSET\r\nQUIT\r\n"
)
_EHLO = (
    b"250-mta.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n"
    b"250-XCLIENT NAME ADDR\r\n250-CHUNKING\r\n250 8BITMIME\r\n"
)

SEEDS: dict[str, list[bytes]] = {
    "commands": [
        b"\x03\x7f\x7f\x00" + _SESSION,
        b"\x03\x7f\x7f\x01" + _SESSION,
        b"\x03\x02\x02\x09" + _SESSION,
        b"\x01\xff\xff\x00" + b"DATA\r\nline\n.\r\n",
        b"\x00\x00\x00\x00" + proxyproto.V2_SIGNATURE + b"EHLO x\r\n",
    ],
    "replies": [
        b"\xff\x0f\x00220 mta.test ESMTP\r\n" + _EHLO + b"250 2.1.0 Ok\r\n354 go\r\n",
        b"\x08\x02\x05" + _EHLO,
    ],
    "proxy_header": [
        proxyproto.encode_v1(("192.0.2.1", 1234), ("127.0.0.1", 25)),
        proxyproto.encode_v1(("2001:db8::1", 1), ("::1", 25)) + b"EHLO x\r\n",
        b"PROXY UNKNOWN\r\n",
        proxyproto.encode_v2(("192.0.2.1", 1234), ("127.0.0.1", 25), [(0x20, b"\x01abc")]),
        proxyproto.encode_v2(("2001:db8::1", 1), ("::1", 25)),
        proxyproto.encode_v2_local([(0x04, b"")]),
    ],
    "machine": [
        # advertised, pipelining + chunking, EOF at the end; the defaults answer everything
        b"\x99\x0c\x01" + _SESSION,
        # early pipelining before the banner: EHLO + group, a message, QUIT
        b"\x99\x0c\x02"
        + b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
        + b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
        # not advertised, forward, no PIPELINING; the MTA refuses the RCPT, 421s the RSET
        b"\x84\x0c\x03"
        + b"EHLO c.test\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRSET\r\n"
        + b"||||550 5.1.1 no\n|421 4.3.2 bye\n",
        # xclient identity, a timeout and a shutdown somewhere, BDAT without CHUNKING; the
        # MTA stalls on its second command
        b"\xe9\x0d\x04" + b"EHLO c\r\nMAIL FROM:<a@b>\r\nBDAT 3 LAST\r\nxyzQUIT\r\n|||S",
        # early pipelining into an MTA without PIPELINING: replayed one command per reply
        b"\x81\x0c\x01" + b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
        # junk from the MTA, then it closes
        b"\x09\x0e\x05" + b"EHLO c\r\nNOOP\r\n" + b"|||250-a\n251 b\n|C",
    ],
    "ehlo": [
        b"\x00\x03PIPELINING\nSIZE 1000\nSTARTTLS\nXCLIENT NAME\nCHUNKING\nPIPECONNECT\n",
        b"\x03\x0fsize 5\nxforward NAME\nx_pipe_connect\n",
    ],
}
