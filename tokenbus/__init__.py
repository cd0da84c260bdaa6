"""tokenbus: LangGraph tokens to Redis streams and on to every service that wants them.

One package: ``tokenbus.schemas`` (the wire contract), ``tokenbus.consumer`` (the reading side),
``tokenbus.worker`` (the producing side), and the application shell beside them (settings, CLI,
demo, offline model, private Redis).
"""
