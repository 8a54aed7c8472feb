"""stoQ v2's ``stoq.data_classes``."""

from stoqd.framework.data import *  # noqa: F403
