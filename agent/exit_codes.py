"""Named process exit codes (values from BSD sysexits.h, like flower's ``common/exit``).

The service unit lists the codes a restart cannot fix in ``RestartPreventExitStatus=``:
CONFIG_ERROR and BUNDLE_ERROR. Everything else is worth another try after ``RestartSec=``.
"""

from __future__ import annotations

OK = 0
# Unexpected failure (an unhandled exception): systemd restarts the service.
FAILURE = 1
# Bad command line.
USAGE = 64
# The model bundle is missing or broken: restarting will not mend it (EX_NOINPUT).
BUNDLE_ERROR = 66
# The SQLite store cannot be opened or migrated (EX_CANTCREAT); a full disk may clear, so restart.
STORE_ERROR = 73
# The bootstrap config file is missing or invalid (EX_CONFIG): restarting will not mend it.
CONFIG_ERROR = 78

NAMES = {
    OK: "OK",
    FAILURE: "FAILURE",
    USAGE: "USAGE",
    BUNDLE_ERROR: "BUNDLE_ERROR",
    STORE_ERROR: "STORE_ERROR",
    CONFIG_ERROR: "CONFIG_ERROR",
}

# Exit codes the unit file must list in RestartPreventExitStatus= (a test checks the unit file).
NO_RESTART = (CONFIG_ERROR, BUNDLE_ERROR)
