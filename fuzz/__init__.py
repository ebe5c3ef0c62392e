"""Fuzzing Orbited's parsers: shared property checks (fuzz.targets) and an atheris
coverage-guided runner (``python -m fuzz``). See docs/fuzzing.md."""
