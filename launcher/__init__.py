"""The launcher's parts (``launch.py`` is its entry point): the command line (``flags``)."""
