"""Configuration: TOML -> frozen dataclasses; every error names its dotted key."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy import tls as tls_module
from proxy.config import (
    MOZILLA_INTERMEDIATE_CIPHERS,
    TLS_MIN_VERSIONS,
    Address,
    Config,
    ConfigError,
    ConfigErrors,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    MetricsConfig,
    OutboundConfig,
    PipeConnectConfig,
    ServerConfig,
    TimeoutsConfig,
    TLSConfig,
    UpstreamConfig,
    load_config,
    parse_config,
)
from proxy.hosts import HostList
from proxy.smtp import Reply, ehlo_keywords, rewrite_ehlo
from proxy.tls import TLS_VERSIONS

MINIMUM = (
    '[listen]\nplain = ["127.0.0.1:2587"]\n[upstream]\naddress = "127.0.0.1:2525"\n'
    'client_identity = "proxy-v2"\n[pipe_connect]\nadvertise_hosts = ["*"]'
)


def base(**sections: dict[str, Any]) -> dict[str, Any]:
    """The smallest valid dict, with ``sections`` merged in (a section value of None deletes)."""
    data: dict[str, Any] = {
        "listen": {"plain": ["127.0.0.1:2587"]},
        "upstream": {"address": "127.0.0.1:2525"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def error_keys(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(data)
    return [e.key for e in info.value.errors]


def write(tmp_path: Path, text: str, name: str = "proxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- loading what must load --------------------------------------------------------------------


def test_minimum_file_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMUM))
    assert config.listen == ListenConfig(plain=(Address("127.0.0.1", 2587),))
    assert config.upstream == UpstreamConfig(Address("127.0.0.1", 2525), "proxy-v2", 10.0)
    assert config.pipe_connect.advertise_hosts.matches("203.0.113.1")
    # Everything not given is the default.
    defaults = Config.default()
    for name in ("limits", "timeouts", "tls", "metrics", "log"):
        assert getattr(config, name) == getattr(defaults, name)
    assert config.pipe_connect == defaults.pipe_connect


def test_load_config_accepts_str_path(tmp_path: Path) -> None:
    assert load_config(str(write(tmp_path, MINIMUM))).listen.plain == (Address("127.0.0.1", 2587),)


def test_design_sketch_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [listen]
        plain = ["0.0.0.0:25"]
        tls_on_connect = ["0.0.0.0:465"]

        [upstream]
        address = "127.0.0.1:2525"
        client_identity = "proxy-v2"      # proxy-v1 | proxy-v2 | xclient | none

        [pipe_connect]
        advertise_hosts = ["*", "!192.0.2.0/24"]
        keywords = ["PIPECONNECT", "PIPE_CONNECT", "X_PIPE_CONNECT"]
        unadvertised_early_input = "defer"  # defer (421) | reject (554) | forward | accept

        [tls]
        certificate = "/etc/pipeconnect/cert.pem"
        key = "/etc/pipeconnect/key.pem"

        [metrics]
        listen = "127.0.0.1:9464"
        """,
    )
    config = load_config(path)
    assert config.listen.tls_on_connect == (Address("0.0.0.0", 465),)
    assert config.tls == TLSConfig("/etc/pipeconnect/cert.pem", "/etc/pipeconnect/key.pem")
    # "*" comes first, so the negation after it is never reached.
    assert config.pipe_connect.advertise_hosts.matches("192.0.2.1")


NEED_LISTENER = (
    "at least one listener is required (plain, tls_on_connect, or outbound.listen with"
    " outbound.enabled)"
)

FULL = """
[listen]
plain = ["127.0.0.1:2587", "[::1]:2587"]
tls_on_connect = ["0.0.0.0:2465"]
tcp_fastopen = false
tcp_fastopen_queue = 16
[upstream]
address = "mta.internal:25"
client_identity = "xclient"
connect_timeout = 2.5
tls = "starttls"
tls_verify = false
tls_ca = "mta-ca.pem"
tls_server_name = "mta.internal"
ehlo_name = "proxy.example"
[pipe_connect]
advertise_hosts = ["!192.0.2.0/24", "192.0.2.0/23", "2001:db8::/32"]
keywords = ["X_PIPE_CONNECT"]
unadvertised_early_input = "forward"
max_early_bytes = 4096
[limits]
max_command_line = 1024
max_text_line = 2000
max_reply_line = 8192
max_pipelined_commands = 10
max_sessions = 20
max_sessions_per_client = 5
bare_newline = "normalize"
[timeouts]
banner = 1
command = 2.0
mail = 3
rcpt = 4
data_init = 5
data_block = 6
data_term = 7
reply = 8
early_drain = 0.25
[tls]
certificate = "cert.pem"
key = "key.pem"
min_version = "TLSv1.3"
ciphers = "ECDHE+AESGCM:!AES128"
session_tickets = false
[metrics]
listen = "[::]:9100"
[log]
format = "json"
[server]
shutdown_grace = 45
workers = 2

[outbound]
enabled = true
listen = ["127.0.0.1:10025", "[::1]:10025"]
hosts = ["!192.0.2.9", "*"]
cache = "/var/tmp/out.sqlite"
cache_ttl = 172800
tls = "passthrough"
tcp_fastopen = true
socket_mark = 4242
bind_source = false
"""


def test_every_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert config.listen == ListenConfig(
        plain=(Address("127.0.0.1", 2587), Address("::1", 2587)),
        tls_on_connect=(Address("0.0.0.0", 2465),),
        tcp_fastopen=False,
        tcp_fastopen_queue=16,
    )
    assert config.upstream == UpstreamConfig(
        Address("mta.internal", 25),
        "xclient",
        2.5,
        tls="starttls",
        tls_verify=False,
        tls_ca="mta-ca.pem",
        tls_server_name="mta.internal",
        ehlo_name="proxy.example",
    )
    pc = config.pipe_connect
    assert pc.advertise_hosts == HostList.parse(
        ["!192.0.2.0/24", "192.0.2.0/23", "2001:db8::/32"], "x"
    )
    assert (pc.keywords, pc.unadvertised_early_input, pc.max_early_bytes) == (
        ("X_PIPE_CONNECT",),
        "forward",
        4096,
    )
    assert config.limits == LimitsConfig(1024, 2000, 8192, 10, 20, 5, "normalize")
    assert config.timeouts == TimeoutsConfig(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.25)
    assert all(
        type(getattr(config.timeouts, f.name)) is float for f in dataclasses.fields(TimeoutsConfig)
    )
    assert config.tls == TLSConfig(
        "cert.pem",
        "key.pem",
        min_version="TLSv1.3",
        ciphers="ECDHE+AESGCM:!AES128",
        session_tickets=False,
    )
    assert config.metrics == MetricsConfig(Address("::", 9100))
    assert config.log == LogConfig("json")
    assert config.server == ServerConfig(shutdown_grace=45.0, workers=2)
    assert config.outbound == OutboundConfig(
        enabled=True,
        listen=(Address("127.0.0.1", 10025), Address("::1", 10025)),
        hosts=HostList.parse(["!192.0.2.9", "*"], "x"),
        cache="/var/tmp/out.sqlite",
        cache_ttl=172800.0,
        tls="passthrough",
        tcp_fastopen=True,
        socket_mark=4242,
        bind_source=False,
    )


def test_outbound_only_and_its_checks(tmp_path: Path) -> None:
    base = '[upstream]\naddress = "127.0.0.1:25"\n'
    only = load_config(write(tmp_path, base + "[outbound]\nenabled = true\n"))
    assert only.outbound.listen == (Address("127.0.0.1", 10025),)
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, base + "[outbound]\nenabled = false\n"))
    assert "at least one listener" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, base + "[outbound]\nenabled = true\nlisten = []\n"))
    assert "outbound.listen" in str(exc.value)
    clash = base + '[listen]\nplain = ["127.0.0.1:10025"]\n[outbound]\nenabled = true\n'
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, clash))
    assert "outbound.listen[0]" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, base + '[outbound]\nenabled = true\ntls = "terminate"\n'))
    assert "outbound.tls" in str(exc.value)


def test_every_dataclass_field_is_a_config_key(tmp_path: Path) -> None:
    # FULL sets every key; if a field had no parser, loading FULL would have said "unknown key"
    # and if a parser had no field, the dataclass constructor would fail. Check FULL is complete.
    import tomllib

    data = tomllib.loads(FULL)
    config = Config.default()
    assert set(data) == {f.name for f in dataclasses.fields(Config)}
    for section, values in data.items():
        assert set(values) == {f.name for f in dataclasses.fields(getattr(config, section))}


# --- defaults --------------------------------------------------------------------------------


def test_defaults() -> None:
    config = Config.default()
    assert config.listen == ListenConfig((), ())
    assert config.upstream == UpstreamConfig(Address("127.0.0.1", 2525), "proxy-v2", 10.0)
    assert config.pipe_connect == PipeConnectConfig(
        HostList.parse(["*"], "x"),
        ("PIPECONNECT", "PIPE_CONNECT", "X_PIPE_CONNECT"),
        "defer",
        65536,
    )
    assert config.limits == LimitsConfig(512, None, 4096, 100, 1000, 50, "normalize")
    # RFC 5321 4.5.3.2: 5 min banner/MAIL/RCPT/server, 2 min DATA init, 3 min block, 10 min end
    assert config.timeouts == TimeoutsConfig(
        banner=300.0,
        command=300.0,
        mail=300.0,
        rcpt=300.0,
        data_init=120.0,
        data_block=180.0,
        data_term=600.0,
        reply=300.0,
        early_drain=2.0,
    )
    assert config.tls == TLSConfig("", "")
    assert (config.tls.min_version, config.tls.session_tickets) == ("TLSv1.2", True)
    assert config.tls.ciphers == MOZILLA_INTERMEDIATE_CIPHERS
    assert config.metrics == MetricsConfig(Address("127.0.0.1", 9464))
    assert config.log == LogConfig("text")


def test_default_allows_everyone() -> None:
    hosts = Config.default().pipe_connect.advertise_hosts
    assert hosts.matches("192.0.2.1") and hosts.matches("2001:db8::1")


def test_default_keywords_reach_every_exim_generation() -> None:
    # Each Exim looks for its own name only: 4.96+ PIPECONNECT, 4.94.1-4.95 (Debian 11,
    # Ubuntu 22.04) PIPE_CONNECT, 4.92-4.94 X_PIPE_CONNECT. Leaving one out silently
    # costs those clients early pipelining (issue #11, item 8).
    pc = parse_config(base(pipe_connect={"advertise_hosts": ["*"]})).pipe_connect
    assert pc.advertise_hosts.matches("192.0.2.1")
    mta = Reply(250, (b"mx.test", b"SIZE 1000", b"PIPELINING", b"8BITMIME"))
    advertised = ehlo_keywords(rewrite_ehlo(mta, keywords=pc.keywords))
    for keyword in ("PIPECONNECT", "PIPE_CONNECT", "X_PIPE_CONNECT"):
        assert keyword in pc.keywords and keyword in advertised, keyword


def test_default_is_replaceable_like_the_demo_does() -> None:
    base_config = Config.default()
    config = dataclasses.replace(
        base_config,
        listen=dataclasses.replace(base_config.listen, plain=(Address("127.0.0.1", 0),)),
    )
    assert config.listen.plain == (Address("127.0.0.1", 0),)
    assert base_config.listen.plain == ()


def test_frozen() -> None:
    config = Config.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log = LogConfig("json")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.max_sessions = 1  # type: ignore[misc]
    hash(parse_config(base()))  # immutable all the way down, so hashable


def test_lists_become_tuples() -> None:
    config = parse_config(base())
    assert isinstance(config.listen.plain, tuple)
    assert isinstance(config.pipe_connect.keywords, tuple)


# --- Address -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:2587", Address("127.0.0.1", 2587)),
        ("0.0.0.0:25", Address("0.0.0.0", 25)),
        ("[::1]:25", Address("::1", 25)),
        ("[::]:25", Address("::", 25)),
        ("[2001:db8::1]:65535", Address("2001:db8::1", 65535)),
        ("[::ffff:192.0.2.1]:25", Address("::ffff:192.0.2.1", 25)),
        ("localhost:25", Address("localhost", 25)),
        ("mta.example.:25", Address("mta.example.", 25)),
        ("mail-1.example.com:2525", Address("mail-1.example.com", 2525)),
        ("127.0.0.1:0", Address("127.0.0.1", 0)),
    ],
)
def test_listen_address(text: str, address: Address) -> None:
    assert parse_config(base(listen={"plain": [text]})).listen.plain == (address,)


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address("127.0.0.1", 25), "127.0.0.1:25"),
        (Address("::1", 25), "[::1]:25"),
        (Address("mta", 2525), "mta:2525"),
    ],
)
def test_address_str(address: Address, text: str) -> None:
    assert str(address) == text
    assert address.host == text.rsplit(":", 1)[0].strip("[]")
    assert address.port == int(text.rsplit(":", 1)[1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "'127.0.0.1' is not host:port (IPv6: [addr]:port)"),
        (":25", "':25' is not host:port (IPv6: [addr]:port)"),
        ("", "'' is not host:port (IPv6: [addr]:port)"),
        ("::1:25", "'::1:25': an IPv6 address needs brackets, e.g. [::1]:25"),
        ("[::1]", "'[::1]': an IPv6 address needs brackets, e.g. [::1]:25"),
        ("[localhost]:25", "'[localhost]:25': 'localhost' is not an IPv6 address"),
        ("[192.0.2.1]:25", "'[192.0.2.1]:25': '192.0.2.1' is not an IPv6 address"),
        ("[fe80::1%eth0]:25", "'[fe80::1%eth0]:25': 'fe80::1%eth0' is not an IPv6 address"),
        ("10.0.0.300:25", "'10.0.0.300:25': '10.0.0.300' is not an IPv4 address"),
        ("1.2.3:25", "'1.2.3:25': '1.2.3' is not an IPv4 address"),
        ("mail_host:25", "'mail_host:25': 'mail_host' is not a valid host name"),
        ("-mta:25", "'-mta:25': '-mta' is not a valid host name"),
        ("mta..example:25", "'mta..example:25': 'mta..example' is not a valid host name"),
        ("m ta:25", "'m ta:25': 'm ta' is not a valid host name"),
        ("127.0.0.1:", "'127.0.0.1:': port '' is not a number"),
        ("127.0.0.1:smtp", "'127.0.0.1:smtp': port 'smtp' is not a number"),
        ("127.0.0.1:-1", "'127.0.0.1:-1': port '-1' is not a number"),
        ("127.0.0.1:+25", "'127.0.0.1:+25': port '+25' is not a number"),
        ("127.0.0.1:٢٥", "'127.0.0.1:٢٥': port '٢٥' is not a number"),  # non-ASCII digits
        ("127.0.0.1:65536", "'127.0.0.1:65536': port must be in 0..65535"),
    ],
)
def test_bad_listen_address(text: str, message: str) -> None:
    assert error(base(listen={"plain": ["127.0.0.1:2587", text]})) == f"listen.plain[1]: {message}"


def test_bad_tls_on_connect_address() -> None:
    data = base(listen={"tls_on_connect": ["nope"]}, tls={"certificate": "c", "key": "k"})
    assert error(data).startswith("listen.tls_on_connect[0]: 'nope' is not host:port")


def test_upstream_port_zero_is_refused() -> None:
    assert (
        error(base(upstream={"address": "127.0.0.1:0"}))
        == "upstream.address: '127.0.0.1:0': port must be in 1..65535"
    )


def test_upstream_address_forms() -> None:
    config = parse_config(base(upstream={"address": "[2001:db8::25]:25"}))
    assert config.upstream.address == Address("2001:db8::25", 25)
    assert str(config.upstream.address) == "[2001:db8::25]:25"


def test_metrics_listen_empty_disables() -> None:
    assert parse_config(base(metrics={"listen": ""})).metrics.listen is None


def test_metrics_listen_bad() -> None:
    assert error(base(metrics={"listen": "9464"})).startswith("metrics.listen: '9464' is not")
    assert error(base(metrics={"listen": 9464})) == "metrics.listen: must be a string, not integer"


# --- required keys and cross-key rules ---------------------------------------------------------


def test_listen_section_required() -> None:
    data = base()
    del data["listen"]
    assert error(data) == "listen: " + NEED_LISTENER


@pytest.mark.parametrize("listen", [{}, {"plain": []}, {"plain": [], "tls_on_connect": []}])
def test_at_least_one_listener(listen: dict[str, Any]) -> None:
    data = base()
    data["listen"] = listen
    assert error(data) == "listen: " + NEED_LISTENER


def test_tls_on_connect_alone_is_enough() -> None:
    data = base(tls={"certificate": "c.pem", "key": "k.pem"})
    data["listen"] = {"tls_on_connect": ["127.0.0.1:2465"]}
    assert parse_config(data).listen.plain == ()


def test_upstream_section_required() -> None:
    data = base()
    del data["upstream"]
    assert error(data) == "upstream.address: is required"


def test_upstream_address_required() -> None:
    data = base()
    data["upstream"] = {"client_identity": "none"}
    assert error(data) == "upstream.address: is required"


def test_duplicate_listener() -> None:
    data = base(listen={"plain": ["127.0.0.1:2587", "127.0.0.1:2588", "127.0.0.1:2587"]})
    assert error(data) == "listen.plain[2]: '127.0.0.1:2587' is already used by listen.plain[0]"


def test_duplicate_across_listener_kinds() -> None:
    data = base(listen={"tls_on_connect": ["127.0.0.1:2587"]}, tls={"certificate": "c", "key": "k"})
    assert error(data) == (
        "listen.tls_on_connect[0]: '127.0.0.1:2587' is already used by listen.plain[0]"
    )


def test_metrics_on_a_listener_address() -> None:
    data = base(metrics={"listen": "127.0.0.1:2587"})
    assert error(data) == "metrics.listen: '127.0.0.1:2587' is already used by listen.plain[0]"


def test_port_zero_never_conflicts() -> None:
    data = base(listen={"plain": ["127.0.0.1:0", "127.0.0.1:0"]}, metrics={"listen": "127.0.0.1:0"})
    assert len(parse_config(data).listen.plain) == 2


def test_tls_certificate_without_key() -> None:
    assert error(base(tls={"certificate": "c.pem"})) == (
        "tls.key: is required when tls.certificate is set"
    )


def test_tls_key_without_certificate() -> None:
    assert error(base(tls={"key": "k.pem"})) == ("tls.certificate: is required when tls.key is set")


def test_tls_on_connect_needs_tls() -> None:
    data = base(listen={"tls_on_connect": ["127.0.0.1:2465"]})
    assert error(data) == "listen.tls_on_connect: needs tls.certificate and tls.key"


def test_tls_paths_are_only_strings_for_now(tmp_path: Path) -> None:
    # Not checked for existence yet: the TLS issue will load them.
    missing = str(tmp_path / "missing.pem")
    assert parse_config(base(tls={"certificate": missing, "key": missing})).tls.key == missing


# --- unknown keys ------------------------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    assert error({**base(), "upstreem": {}}) == "upstreem: unknown key (did you mean 'upstream'?)"


def test_unknown_top_level_key_without_suggestion() -> None:
    message = error({**base(), "zzz": 1})
    assert message == (
        "zzz: unknown key (known: listen, upstream, pipe_connect, limits, timeouts, tls, "
        "metrics, log, server, outbound)"
    )


@pytest.mark.parametrize(
    ("section", "key", "hint"),
    [
        ("listen", "plane", "did you mean 'plain'?"),
        ("listen", "tls", "known: plain, tls_on_connect, tcp_fastopen, tcp_fastopen_queue"),
        ("upstream", "adress", "did you mean 'address'?"),
        (
            "upstream",
            "host",
            "known: address, client_identity, connect_timeout, tls, tls_verify, tls_ca, "
            "tls_server_name, ehlo_name",
        ),
        ("pipe_connect", "advertise_host", "did you mean 'advertise_hosts'?"),
        ("pipe_connect", "keyword", "did you mean 'keywords'?"),
        ("limits", "max_session", "did you mean 'max_sessions'?"),
        ("timeouts", "datablock", "did you mean 'data_block'?"),
        ("tls", "cert", "known: certificate, key, min_version, ciphers, session_tickets"),
        ("metrics", "address", "known: listen"),
        ("log", "level", "known: format"),
    ],
)
def test_unknown_key_in_section(section: str, key: str, hint: str) -> None:
    assert error(base(**{section: {key: 1}})) == f"{section}.{key}: unknown key ({hint})"


def test_unknown_key_in_a_subtable() -> None:
    # [upstream.extra] is a table inside [upstream]: still an unknown key of upstream.
    data = base(upstream={"extra": {"x": 1}})
    assert error(data).startswith("upstream.extra: unknown key")


# --- wrong types and values --------------------------------------------------------------------


@pytest.mark.parametrize("section", ["listen", "upstream", "pipe_connect", "log", "tls"])
@pytest.mark.parametrize(("value", "tname"), [(1, "integer"), ("x", "string"), ([], "array")])
def test_section_must_be_a_table(section: str, value: Any, tname: str) -> None:
    data = base()
    data[section] = value
    assert error(data) == f"{section}: must be a table, not {tname}"


def test_top_level_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([], "x.toml")  # type: ignore[arg-type]
    assert str(info.value) == "x.toml: must be a table, not array"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("listen", "plain", "127.0.0.1:25", "must be an array, not string"),
        ("listen", "plain", [25], None),  # -> listen.plain[0]: must be a string, not integer
        ("listen", "tls_on_connect", {}, "must be an array, not table"),
        ("upstream", "address", ["127.0.0.1:25"], "must be a string, not array"),
        ("upstream", "address", 25, "must be a string, not integer"),
        ("upstream", "client_identity", "proxy-v3", "must be one of " + "IDS"),
        ("upstream", "client_identity", "PROXY-V2", "must be one of " + "IDS"),
        ("upstream", "client_identity", True, "must be one of " + "IDS"),
        ("upstream", "connect_timeout", "10", "must be a number of seconds, not string"),
        ("upstream", "connect_timeout", True, "must be a number of seconds, not boolean"),
        ("upstream", "connect_timeout", 0, "must be a positive, finite number of seconds, not 0"),
        (
            "upstream",
            "connect_timeout",
            -1.5,
            "must be a positive, finite number of seconds, not -1.5",
        ),
        (
            "upstream",
            "connect_timeout",
            math.inf,
            "must be a positive, finite number of seconds, not inf",
        ),
        (
            "upstream",
            "connect_timeout",
            math.nan,
            "must be a positive, finite number of seconds, not nan",
        ),
        ("listen", "tcp_fastopen", "yes", "must be true or false, not string"),
        ("listen", "tcp_fastopen", 1, "must be true or false, not integer"),
        ("listen", "tcp_fastopen_queue", 0, "must be positive, not 0"),
        ("listen", "tcp_fastopen_queue", True, "must be an integer, not boolean"),
        ("pipe_connect", "advertise_hosts", "*", "must be an array, not string"),
        ("pipe_connect", "advertise_hosts", ["*", 1], None),
        ("pipe_connect", "keywords", "PIPECONNECT", "must be an array, not string"),
        ("pipe_connect", "keywords", [], "must not be empty"),
        (
            "pipe_connect",
            "unadvertised_early_input",
            "drop",
            "must be one of defer, reject, forward, accept",
        ),
        ("pipe_connect", "max_early_bytes", 0, "must be positive, not 0"),
        ("pipe_connect", "max_early_bytes", -1, "must be positive, not -1"),
        ("pipe_connect", "max_early_bytes", 1024.0, "must be an integer, not float"),
        ("pipe_connect", "max_early_bytes", True, "must be an integer, not boolean"),
        ("pipe_connect", "max_early_bytes", "64k", "must be an integer, not string"),
        ("limits", "max_command_line", 511, "must be >= 512, not 511"),
        ("limits", "max_text_line", 999, "must be >= 1000, not 999"),
        ("limits", "max_reply_line", 511, "must be >= 512, not 511"),
        ("limits", "max_pipelined_commands", 0, "must be positive, not 0"),
        ("limits", "max_sessions", 0, "must be positive, not 0"),
        ("limits", "max_sessions", False, "must be an integer, not boolean"),
        ("limits", "max_sessions_per_client", -3, "must be positive, not -3"),
        ("limits", "max_sessions_per_client", 1.5, "must be an integer, not float"),
        ("limits", "bare_newline", "accept", "must be one of reject, normalize"),
        ("limits", "bare_newline", 0, "must be one of reject, normalize"),
        ("timeouts", "banner", 0, "must be a positive, finite number of seconds, not 0"),
        ("timeouts", "command", -300, "must be a positive, finite number of seconds, not -300"),
        ("timeouts", "mail", "5m", "must be a number of seconds, not string"),
        ("timeouts", "rcpt", [1], "must be a number of seconds, not array"),
        ("timeouts", "data_init", None, "must be a number of seconds, not NoneType"),
        ("timeouts", "data_block", False, "must be a number of seconds, not boolean"),
        (
            "timeouts",
            "data_term",
            math.inf,
            "must be a positive, finite number of seconds, not inf",
        ),
        ("timeouts", "reply", 0.0, "must be a positive, finite number of seconds, not 0.0"),
        ("timeouts", "early_drain", -0.1, "must be a positive, finite number of seconds, not -0.1"),
        ("tls", "certificate", 1, "must be a string, not integer"),
        ("tls", "key", ["k"], "must be a string, not array"),
        ("tls", "min_version", "TLSv1.1", "must be one of TLSv1.2, TLSv1.3"),
        ("tls", "min_version", "tlsv1.3", "must be one of TLSv1.2, TLSv1.3"),
        ("tls", "min_version", 1.3, "must be one of TLSv1.2, TLSv1.3"),
        ("tls", "ciphers", ["AES256"], "must be a string, not array"),
        (
            "tls",
            "ciphers",
            "",
            "'' is not an OpenSSL cipher string (e.g. 'ECDHE+AESGCM:ECDHE+CHACHA20')",
        ),
        (
            "tls",
            "ciphers",
            "AES256;rm",
            "'AES256;rm' is not an OpenSSL cipher string (e.g. 'ECDHE+AESGCM:ECDHE+CHACHA20')",
        ),
        (
            "tls",
            "ciphers",
            "NOPE",
            "'NOPE': OpenSSL knows no TLS 1.2 cipher by that (see `openssl ciphers`)",
        ),
        (
            "tls",
            "ciphers",
            "TLS_AES_128_GCM_SHA256",  # a TLS 1.3 suite: not set by this key
            "'TLS_AES_128_GCM_SHA256': OpenSSL knows no TLS 1.2 cipher by that"
            " (see `openssl ciphers`)",
        ),
        ("tls", "session_tickets", "no", "must be true or false, not string"),
        ("tls", "session_tickets", 0, "must be true or false, not integer"),
        ("log", "format", "JSON", "must be one of text, json"),
        ("log", "format", "syslog", "must be one of text, json"),
    ],
)
def test_bad_value(section: str, key: str, value: Any, message: str | None) -> None:
    message = (message or "").replace("IDS", "proxy-v1, proxy-v2, xclient, none")
    got = error(base(**{section: {key: value}}))
    if message:
        assert got == f"{section}.{key}: {message}"
    else:
        assert got.startswith(f"{section}.{key}[")


def test_tls_settings_errors_come_together() -> None:
    data = base(
        tls={
            "certificate": "c.pem",
            "key": "k.pem",
            "min_version": "SSLv3",
            "ciphers": "NOPE",
            "session_tickets": "off",
        }
    )
    assert error_keys(data) == ["tls.min_version", "tls.ciphers", "tls.session_tickets"]


def test_tls_min_versions_are_the_ones_tls_knows() -> None:
    assert set(TLS_MIN_VERSIONS) == set(TLS_VERSIONS)
    assert tls_module.MOZILLA_INTERMEDIATE_CIPHERS is MOZILLA_INTERMEDIATE_CIPHERS


def test_brief_example_message() -> None:
    assert error(base(upstream={"client_identity": "haproxy"})) == (
        "upstream.client_identity: must be one of proxy-v1, proxy-v2, xclient, none"
    )


def test_list_element_types_name_the_index() -> None:
    assert error(base(listen={"plain": ["127.0.0.1:2587", 25]})) == (
        "listen.plain[1]: must be a string, not integer"
    )
    assert error(base(pipe_connect={"advertise_hosts": ["*", 1]})) == (
        "pipe_connect.advertise_hosts[1]: must be a string, not integer"
    )
    assert error(base(pipe_connect={"keywords": ["PIPECONNECT", 1]})) == (
        "pipe_connect.keywords[1]: must be a string, not integer"
    )


def test_bad_host_list_entry_names_the_key() -> None:
    data = base(pipe_connect={"advertise_hosts": ["*", "!192.0.2.0/24", "10.0.0.300"]})
    assert error(data) == (
        "pipe_connect.advertise_hosts[2]: '10.0.0.300' is not an address or CIDR"
    )


def test_empty_host_list_is_allowed_and_matches_nobody() -> None:
    config = parse_config(base(pipe_connect={"advertise_hosts": []}))
    assert config.pipe_connect.advertise_hosts.matches("127.0.0.1") is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (512, 512),
        (2**40, 2**40),
    ],
)
def test_positive_integers(value: int, expected: int) -> None:
    assert (
        parse_config(base(pipe_connect={"max_early_bytes": value})).pipe_connect.max_early_bytes
        == expected
    )


def test_limits_at_their_minimums() -> None:
    limits = parse_config(
        base(limits={"max_command_line": 512, "max_text_line": 1000, "max_reply_line": 512})
    ).limits
    assert (limits.max_command_line, limits.max_text_line, limits.max_reply_line) == (
        512,
        1000,
        512,
    )


def test_integer_seconds_become_float() -> None:
    timeouts = parse_config(base(timeouts={"banner": 30})).timeouts
    assert timeouts.banner == 30.0 and type(timeouts.banner) is float


@pytest.mark.parametrize("identity", ["proxy-v1", "proxy-v2", "xclient", "none"])
def test_client_identities(identity: str) -> None:
    assert (
        parse_config(base(upstream={"client_identity": identity})).upstream.client_identity
        == identity
    )


@pytest.mark.parametrize("policy", ["defer", "reject", "forward", "accept"])
def test_early_input_policies(policy: str) -> None:
    config = parse_config(base(pipe_connect={"unadvertised_early_input": policy}))
    assert config.pipe_connect.unadvertised_early_input == policy


@pytest.mark.parametrize("policy", ["reject", "normalize"])
def test_bare_newline_policies(policy: str) -> None:
    assert parse_config(base(limits={"bare_newline": policy})).limits.bare_newline == policy


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_formats(fmt: str) -> None:
    assert parse_config(base(log={"format": fmt})).log.format == fmt


# --- keywords ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keywords",
    [["PIPECONNECT"], ["X_PIPE_CONNECT"], ["X-EARLY", "x_early2"], ["9LIVES"], ["A"]],
)
def test_good_keywords(keywords: list[str]) -> None:
    assert parse_config(base(pipe_connect={"keywords": keywords})).pipe_connect.keywords == tuple(
        keywords
    )


@pytest.mark.parametrize("word", ["", "_X", "-X", "PIPE CONNECT", "PIPE.CONNECT", "PIPÉ", "X=1"])
def test_bad_keyword(word: str) -> None:
    data = base(pipe_connect={"keywords": ["PIPECONNECT", word]})
    assert error(data) == (
        f"pipe_connect.keywords[1]: {word!r} is not an EHLO keyword ([A-Za-z0-9_-])"
    )


def test_duplicate_keyword_is_case_insensitive() -> None:
    data = base(pipe_connect={"keywords": ["PIPECONNECT", "X_PIPE_CONNECT", "pipeconnect"]})
    assert error(data) == "pipe_connect.keywords[2]: 'pipeconnect' is listed twice"


# --- files -------------------------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_position(tmp_path: Path) -> None:
    path = write(tmp_path, '[listen]\nplain = ["127.0.0.1:2587"]\nfoo = bar\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: TOML syntax error: ")
    assert "Invalid value (at line 3, column 7)" in message  # tomllib's words and position
    assert info.value.key == str(path)


def test_duplicate_toml_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMUM + '\n[upstream]\naddress = "x:1"\n')
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read: Is a directory"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMUM.encode() + b'\n[tls]\ncertificate = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not valid UTF-8: ")


def test_validation_error_from_file_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMUM.replace("proxy-v2", "proxy-v9"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        "upstream.client_identity: must be one of proxy-v1, proxy-v2, xclient, none"
    )
    assert info.value.key == "upstream.client_identity"
    assert info.value.source == str(path)


def test_parse_config_records_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"bogus": 1}, "reload #3")
    assert info.value.source == "reload #3"
    with pytest.raises(ConfigError) as info:
        parse_config({"bogus": 1})
    assert info.value.source == "<config>"


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""))
    assert [str(e) for e in info.value.errors] == [
        "upstream.address: is required",
        "listen: " + NEED_LISTENER,
    ]


def test_toml_datetime_value_is_a_type_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMUM + "\n[tls]\ncertificate = 1979-05-27\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "tls.certificate: must be a string, not date"


# --- every error at once -----------------------------------------------------------------------

# Thirteen errors in eight tables: per-value errors, unknown keys, a missing required key and
# two cross-key rules.
MANY_ERRORS = """\
[listen]
plain = ["127.0.0.1:2587", "127.0.0.1:99999", "localhost"]
tls_on_connect = ["127.0.0.1:2465"]
tcp_fastopen = "yes"

[upstream]
client_identity = "haproxy"
conect_timeout = 5

[pipe_connect]
advertise_hosts = ["10.0.0.1/8", "*", "nope"]

[limits]
max_sessions = 0
bare_newline = "strip"

[timeouts]
banner = -1

[loggin]
format = "json"

[tls]
certificate = "cert.pem"

[metrics]
listen = "127.0.0.1:2465"
"""

# File order (tables and keys as they first appear, array items by index); then the required
# keys of tables the file lacks; then the cross-key rules.
MANY_ERRORS_EXPECTED = [
    "listen.plain[1]: '127.0.0.1:99999': port must be in 0..65535",
    "listen.plain[2]: 'localhost' is not host:port (IPv6: [addr]:port)",
    "listen.tcp_fastopen: must be true or false, not string",
    "upstream.client_identity: must be one of proxy-v1, proxy-v2, xclient, none",
    "upstream.conect_timeout: unknown key (did you mean 'connect_timeout'?)",
    "upstream.address: is required",
    "pipe_connect.advertise_hosts[0]: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
    "pipe_connect.advertise_hosts[2]: 'nope' is not an address or CIDR",
    "limits.max_sessions: must be positive, not 0",
    "limits.bare_newline: must be one of reject, normalize",
    "timeouts.banner: must be a positive, finite number of seconds, not -1",
    "loggin: unknown key (did you mean 'log'?)",
    "metrics.listen: '127.0.0.1:2465' is already used by listen.tls_on_connect[0]",
    "tls.key: is required when tls.certificate is set",
]


def test_every_error_at_once_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, MANY_ERRORS)
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    exc = info.value
    assert [str(e) for e in exc.errors] == MANY_ERRORS_EXPECTED
    assert str(exc) == "; ".join(MANY_ERRORS_EXPECTED)  # one log line; match= sees them all
    assert (exc.key, exc.source) == ("listen.plain[1]", str(path))  # key: the first error's
    assert [e.key for e in exc.errors][-2:] == ["metrics.listen", "tls.key"]


def test_order_follows_the_file_not_the_sections() -> None:
    data = {"log": {"format": "xml"}, **base(upstream={"tls": "yes"})}
    assert error_keys(data) == ["log.format", "upstream.tls"]


def test_a_single_error_is_still_a_config_errors() -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_config(base(log={"format": "xml"}))
    assert str(info.value) == "log.format: must be one of text, json"
    assert info.value.errors == (info.value.errors[0],)


def test_rules_skip_keys_that_are_themselves_bad() -> None:
    # plain[1] is bad, so plain stays empty: neither "no listener" nor a duplicate of plain[0].
    data = base(listen={"plain": ["127.0.0.1:2587", 25]}, metrics={"listen": "127.0.0.1:2587"})
    assert error(data) == "listen.plain[1]: must be a string, not integer"
    data = base(listen={"tls_on_connect": ["127.0.0.1:2465"]}, tls={"certificate": 1})
    assert error(data) == "tls.certificate: must be a string, not integer"


def test_every_bad_array_item_is_reported() -> None:
    data = base(pipe_connect={"keywords": ["PIPECONNECT", "bad word", 7, "pipeconnect"]})
    assert error(data) == (
        "pipe_connect.keywords[1]: 'bad word' is not an EHLO keyword ([A-Za-z0-9_-]); "
        "pipe_connect.keywords[2]: must be a string, not integer; "
        "pipe_connect.keywords[3]: 'pipeconnect' is listed twice"
    )


def test_every_duplicate_address_is_reported() -> None:
    data = base(listen={"plain": ["127.0.0.1:2587"] * 3}, metrics={"listen": "127.0.0.1:2587"})
    assert error_keys(data) == ["listen.plain[1]", "listen.plain[2]", "metrics.listen"]


def test_config_errors_needs_an_error_and_flattens() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ConfigErrors([])
    inner = ConfigErrors([ConfigError("a", "1"), ConfigError("b", "2")])
    outer = ConfigErrors([inner, ConfigError("c", "3")])
    assert [e.key for e in outer.errors] == ["a", "b", "c"]
    assert isinstance(outer, ConfigError) and isinstance(outer, ValueError)
