"""The test broker: ``tools.broker`` (moved there so that `make demo` and the benchmarks need no
test code), re-exported under its old name for the tests."""

from tools.broker import (  # noqa: F401
    EXAMPLES,
    MOSQUITTO,
    SECURE_CONF,
    SHIPPED_ACL,
    SHIPPED_CONF,
    SITE_KEYS,
    SITE_SECTION,
    Mosquitto,
    conf_keys,
    configure,
    derive_conf,
    free_port,
    make_tls_files,
    secured_conf,
    shipped_sections,
    write_passwords,
)
