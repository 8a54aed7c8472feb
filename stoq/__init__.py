"""stoQ v2's import name, so existing plugins and scripts load unchanged under stoqd."""

from stoqd.framework import *  # noqa: F403
from stoqd.framework import __all__  # noqa: F401
