"""A config file with a syntax error (tests/test_cli_errors.py)."""

def get_config(arg:
  return None
