"""stoQ v2's exception names, so plugins that raise or catch them keep working."""


class StoqException(Exception):
    """Something went wrong in the framework itself."""


class StoqPluginException(StoqException):
    """A plugin failed, or was configured wrongly."""


class StoqPluginNotFound(StoqPluginException):
    """No plugin of that name is known."""
