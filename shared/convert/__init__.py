"""Dataset converters: public VQA and report releases -> LLaVA-style JSON (``medalign-data convert``;
the command line itself lives in :mod:`student_train.convert.cli`, which also converts student models)."""
