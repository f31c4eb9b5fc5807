from . import show_config

print(show_config())
