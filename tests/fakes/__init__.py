"""Fakes shared by the unit tests (imported as ``tests.fakes.<name>``): a fake worker and helpers
for the scheduler core (``scheduler``), a scheduler over real sockets (``scheduler_loop``), a
prefill/decode cluster of cores (``disagg``) and fake instances behind a real front end
(``frontend``)."""
