"""stoQ v2's ``stoq.helpers``."""

from stoqd.framework.helpers import *  # noqa: F403
from stoqd.framework.helpers import (  # noqa: F401
    StoqConfigParser,
    dumps,
    get_md5,
    get_sha1,
    get_sha256,
    get_sha512,
    parse_bool,
    parse_list,
)
