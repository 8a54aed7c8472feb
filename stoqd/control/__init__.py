"""The control socket: protocol, server and the commands stoqctl sends."""
