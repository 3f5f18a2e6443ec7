"""The one error type for input a user can fix (a file, a field, an option): every CLI reports it as one
`error: ...` line and exits with 2. Each room's own errors (ConfigError, CheckpointError, ...) derive from it."""


class UserError(ValueError):
    """Bad input, with a message that names the file, field or option at fault and how to fix it."""
