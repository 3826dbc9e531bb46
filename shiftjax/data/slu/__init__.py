"""Spoken language understanding data: FSC's intent vocabulary, the Fluent Speech Commands
tfds builder (``fsc``) and its offline synthesized stand-in ``synthetic_slu``
(``synthetic``)."""
