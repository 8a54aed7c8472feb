"""stoQ v2's ``stoq.exceptions``."""

from stoqd.framework.exceptions import (  # noqa: F401
    StoqException,
    StoqPluginException,
    StoqPluginNotFound,
)
