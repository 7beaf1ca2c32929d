"""Pieces shared by the UPMT daemons: the project's error types and the control-socket protocol."""
