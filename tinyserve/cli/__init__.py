"""The command line: python -m tinyserve generate|chat|bench|serve."""
