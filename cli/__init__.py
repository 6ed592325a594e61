"""The ``fedmoe`` command-line tool (installed as the ``fedmoe_cli`` package).

``app.py`` only wires the commands; each command lives in its own module with its examples;
``common.py`` holds the contract every command keeps (streams, errors, exit codes, options).
"""
