"""Models: what one served model is (spec.py, an entry of the configuration's `models`) and the
artefacts the project builds itself (no hub download is possible offline)."""
