"""Keel's base package: the vocabulary every other package shares.

Errors and their wire codes (:mod:`keel.errors`), id rules
(:mod:`keel.ids`), process lifecycle states (:mod:`keel.lifecycle`),
procfs and pidfd helpers (:mod:`keel.procfs`), peer credentials
(:mod:`keel.peercred`), retry policies (:mod:`keel.retry`), timestamps
and log tails (:mod:`keel.clock`, :mod:`keel.logs`) and the grpclib
settings both ends of every gRPC channel use (:mod:`keel.grpc`).

It sits at the bottom of the import graph: nothing here imports ``shim``,
``agent``, ``opsd``, ``upgrade`` or ``observability``
(``tests/unit/test_imports.py`` holds every package to its rules).  It is
imported on the container start path, so its modules import only the
standard library, grpclib and tenacity, and import nothing at package
level.
"""
